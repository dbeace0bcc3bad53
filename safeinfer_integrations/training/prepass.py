"""The calibration sweep's shared prompt pre-pass: the SA and vanilla settings of a sweep differ only from the
last prompt token on (steering starts there), so the prompts' KV cache up to the last token and the unsteered
gate hidden states are computed once (`HeldIn`, in groups of like lengths), and each setting runs only the last
prompt token and the greedy decode (`HeldIn.generate`, tested token for token against the engine's
``mode="sa"``). Perplexity reruns the last prompt token, unsteered, on a copy of that cache."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..method.steering import attach
from ..method.vector import SafetyVector
from ..models.batching import left_pad, pad_id_of, right_pad, token_nll
from ..models.compat import cache_kwarg

Chat = list[dict[str, str]]


class _Part:
    """One pre-pass over a group of prompts of like lengths (left-padded together)."""

    @torch.inference_mode()
    def __init__(self, model: Any, prompts: list[list[int]], pad_id: int) -> None:
        from transformers import DynamicCache

        self.model = model
        self.pad_id = pad_id
        device = next(model.parameters()).device
        self.ids, self.mask, self.positions = left_pad(prompts, pad_id, device)
        self.prefix = DynamicCache(config=model.config)
        out = model(
            input_ids=self.ids,
            attention_mask=self.mask,
            position_ids=self.positions,
            **cache_kwarg(self.prefix),
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        self.hidden = [h[:, -1, :] for h in out.hidden_states]  # [i] = after decoder layer i - 1
        self.prefix.crop(-1)  # drop the last prompt token: steering starts there (one cache kept, not two)

    @torch.inference_mode()
    def generate(self, steerer: Any, coef: torch.Tensor, eos: set[int], max_new_tokens: int) -> list[list[int]]:
        rows = self.ids.shape[0]
        cache = copy.deepcopy(self.prefix)
        coef = coef.to(self.ids.device)
        tokens: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        mask, position, step_ids = self.mask, self.positions[:, -1:], self.ids[:, -1:]
        for step in range(max_new_tokens):
            with steerer.active(coef):
                logits = (
                    self.model(
                        input_ids=step_ids,
                        attention_mask=mask,
                        position_ids=position,
                        **cache_kwarg(cache),
                        use_cache=True,
                    )
                    .logits[:, -1, :]
                    .float()
                )
            chosen = torch.log_softmax(logits, dim=-1).argmax(dim=-1)
            for row, token in enumerate(chosen.tolist()):
                if not done[row]:
                    tokens[row].append(int(token))
                    done[row] = token in eos
            if all(done) or step == max_new_tokens - 1:
                break
            step_ids = chosen[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            position = position + 1
        return tokens

    @torch.inference_mode()
    def nll(self, answers: Sequence[Sequence[int]]) -> float:
        """Summed negative log-likelihood of the answers under the unsteered model: the last prompt token and
        the answers (but their last tokens) run on a copy of the prompt cache."""
        if not any(answers):
            return 0.0
        device = self.ids.device
        last = self.ids[:, -1].tolist()
        feed, feed_mask = right_pad([[t, *a[:-1]] for t, a in zip(last, answers)], self.pad_id, device)
        mask = torch.cat([self.mask[:, :-1], feed_mask], dim=-1)
        positions = self.positions[:, -1:] + torch.arange(feed.shape[1], device=device)[None, :]
        logits = self.model(
            input_ids=feed,
            attention_mask=mask,
            position_ids=positions,
            **cache_kwarg(copy.deepcopy(self.prefix)),
            use_cache=True,
        ).logits
        # row by row: all rows in float64 at once take gigabytes
        return float(sum(token_nll(logits[row, : len(answer)], answer) for row, answer in enumerate(answers) if answer))


class HeldIn:
    """One pre-pass over a fixed set of chat prompts, shared by every vanilla/SA setting of a sweep. Prompts
    run in groups of like lengths (at most ``group_tokens`` padded tokens each), so a few long retrieval prompts
    do not pad every short chat; results come back in input order."""

    def __init__(self, engine: Any, chats: Sequence[Chat], *, group_tokens: int = 8192) -> None:
        self.model = engine.model
        self.tokenizer = engine.tokenizer
        self.prompts = [engine.formatter.encode(chat) for chat in chats]
        self.eos = set(engine.eos_ids)
        pad_id = pad_id_of(engine.tokenizer)
        order = sorted(range(len(self.prompts)), key=lambda i: len(self.prompts[i]))
        self.groups: list[list[int]] = []
        for i in order:
            group = self.groups[-1] if self.groups else None
            if group is not None and (len(group) + 1) * len(self.prompts[i]) <= group_tokens:
                group.append(i)
            else:
                self.groups.append([i])
        self.parts = [_Part(self.model, [self.prompts[i] for i in group], pad_id) for group in self.groups]

    def gate_weights(self, vector: SafetyVector) -> torch.Tensor | None:
        if vector.gate is None:
            return None
        weights = torch.empty(len(self.prompts))
        for group, part in zip(self.groups, self.parts):
            weights[group] = vector.gate.weight(part.hidden[vector.gate.layer + 1]).cpu()
        return weights

    def generate(
        self, vector: SafetyVector | None, *, gate: bool, max_new_tokens: int
    ) -> tuple[list[list[int]], torch.Tensor | None]:
        """Greedy SA generation for every prompt (``vector`` None: unsteered). Returns the generated token
        ids of each row (up to and including its first end token) and the gate weights used."""
        rows = len(self.prompts)
        weights = self.gate_weights(vector) if (vector is not None and gate) else None
        if vector is None:
            coef = torch.zeros(rows)
        else:
            coef = vector.scale * (weights if weights is not None else torch.ones(rows))
        layer = vector.layer if vector is not None else 0
        direction = vector.vector if vector is not None else torch.zeros(self.model.config.hidden_size)
        tokens: list[list[int]] = [[] for _ in range(rows)]
        with attach(self.model, layer, direction) as steerer:
            for group, part in zip(self.groups, self.parts):
                for i, answer in zip(group, part.generate(steerer, coef[group], self.eos, max_new_tokens)):
                    tokens[i] = answer
        return tokens, weights

    def perplexity(self, answers: Sequence[Sequence[int]]) -> float:
        """Perplexity of the answers' tokens under the unsteered model (pooled over tokens), from the shared
        prompt caches; nan when every answer is empty."""
        count = sum(len(a) for a in answers)
        if count == 0:
            return float("nan")
        nll = sum(part.nll([answers[i] for i in group]) for group, part in zip(self.groups, self.parts))
        return math.exp(nll / count)
