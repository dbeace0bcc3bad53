"""The decode loop behind every mode: prefill, then one step per token, each step a few named parts.

Batch layout. Rows of the main model's batch are the safe rows and, for a same-weights unsafe expert
(``prompted`` or ``negated_vector``), one unsafe twin per *paired* safe row, after all safe rows and in the
same order. A ``model`` expert runs its own forward pass (`SeparateExpert`) over the paired rows' token ids.
Every row keeps its KV cache for the whole generation; finished rows are dropped from the caches, nothing is
recomputed. A request the harm gate weighs below ``gate_cutoff`` keeps no twin: it decodes as plain decoding.

One step (`Decoder.run`): `_check_finite` the logits, `_choose` the tokens (guided scores for paired rows,
plain scores for the rest), `_emit` them (text pieces, finish reasons), `_drop` the finished rows, `_advance`
every cache by one token.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from ..errors import NumericalError
from ..method.guidance import guidance_weight, select_tokens, sgds_scores
from ..method.refusal import ends_refusal
from ..method.steering import Steerer, hidden_after_layer
from ..method.vector import SafetyVector
from ..models.batching import left_pad
from ..models.compat import cache_kwarg
from . import kv_cache
from .config import SafeInferConfig, SamplingSettings
from .constrain import Constraint, RefusalOpening, allowed_mask, restrict_to
from .generation import FinishReason
from .textstream import TextTracker


@dataclass(frozen=True)
class Plan:
    """Everything one call needs, validated before any hook is registered."""

    config: SafeInferConfig
    sampling: SamplingSettings
    vector: SafetyVector | None  # with the call's layer/scale applied
    expert: str | None  # None when not guided
    safe_ids: list[list[int]]
    unsafe_ids: list[list[int]] | None  # same-weights expert rows (prompted / negated_vector)
    question_ids: list[list[list[int]]] | None = None  # per request, what the gate reads besides it (gate_question)
    constraints: list[Constraint | None] | None = None  # per request, its response format's state (None: free)
    openings: tuple[tuple[int, ...], ...] = ()  # token ids of the refusal openings (``refuse_above``)
    cancel: threading.Event | None = None  # set by the caller (a cancelled async call): stop before the next pass
    deadline: float | None = None  # time.monotonic() after which no forward pass starts (``timeout``)

    @property
    def shares_weights(self) -> bool:
        return self.expert in ("prompted", "negated_vector")


@dataclass
class Row:
    """One input's progress."""

    prompt_tokens: int
    tracker: TextTracker
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    guided_changes: int = 0
    gate_weight: float | None = None
    opened: bool = False  # the answer was held to open with a refusal (``refuse_above``)


@dataclass(frozen=True)
class Target:
    """What the loop runs on: the model (and separate expert), where, and its fixed limits."""

    model: Any
    unsafe_model: Any | None
    pad_id: int
    eos: frozenset[int]
    context: int | None
    device: torch.device
    fallback_vector: SafetyVector | None  # the engine's vector, whose gate applies when the plan has none


def forward(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: Any,
    steerer: Steerer | None = None,
    coef: torch.Tensor | None = None,
) -> torch.Tensor:
    """One cached forward pass; the last position's logits in float32. Steered only inside this call."""
    scope = steerer.active(coef) if steerer is not None and coef is not None else nullcontext()
    with scope:
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            **cache_kwarg(cache),
            use_cache=True,
            logits_to_keep=1,
        )
    return out.logits[:, -1, :].float()


class SeparateExpert:
    """The ``model`` unsafe expert: its own forward passes and KV cache over the safe rows' token ids."""

    def __init__(self, model: Any, mask: torch.Tensor) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.mask = mask.to(self.device)
        self.cache = DynamicCache(config=model.config)

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return forward(self.model, ids.to(self.device), self.mask, positions.to(self.device), self.cache)

    def select(self, keep: list[int]) -> None:
        """Keep only these rows (finished rows leave the cache; nothing is recomputed)."""
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=-1)
        return forward(self.model, tokens[:, None].to(self.device), self.mask, positions.to(self.device), self.cache)


@dataclass
class _Prefilled:
    logits: torch.Tensor
    gate: torch.Tensor | None
    coef: torch.Tensor
    weight: torch.Tensor
    kept: list[int]  # requests that keep SafeInfer (at or above the gate cutoff)


class Decoder:
    """One call's decode loop over ``rows`` (see the module docstring). `run` yields (row, text piece)."""

    def __init__(self, target: Target, plan: Plan, rows: list[Row], steerer: Steerer | None) -> None:
        self.target, self.plan, self.rows, self.steerer = target, plan, rows, steerer
        self.n = len(rows)
        self.shared = plan.shares_weights
        self.device = target.device
        self.generators: list[torch.Generator] | None = None
        if not plan.sampling.greedy:
            seed = plan.sampling.seed if plan.sampling.seed is not None else secrets.randbits(62)
            self.generators = [torch.Generator().manual_seed(seed) for _ in rows]
        self.active = list(range(self.n))  # original indexes of the rows still generating
        # Set by `_start`: the main batch's cache, mask, lengths, steering coefficients, guidance weights,
        # the slots (indexes among the active safe rows) that have unsafe-expert rows, and the last logits.
        self.cache: Any = None
        self.mask = self.lengths = self.coef = self.weight = self.logits = torch.empty(0)
        self.paired: list[int] = []
        self.paired_index = torch.empty(0, dtype=torch.long)
        self.expert: SeparateExpert | None = None
        self.protected: frozenset[int] = frozenset()  # requests SafeInfer acts on (refusal_stop applies to them)
        self.openings: dict[int, RefusalOpening] = {}  # requests held to open with a refusal
        self.unsafe_logits: torch.Tensor | None = None

    # ------------------------------------------------------------------ the loop
    def run(self) -> Iterator[tuple[int, str]]:
        try:
            yield from self._loop()
        except GeneratorExit:  # the consumer closed the stream early
            self._finish_active("cancelled")
            raise

    def _loop(self) -> Iterator[tuple[int, str]]:
        reason = self._interrupted()
        if reason is not None:
            yield from self._finish_active(reason)
            return
        with torch.inference_mode():
            self._start()
        step = 0
        while True:
            with torch.inference_mode():
                self._check_finite(step)
                chosen, changed = self._choose(step)
                longest = self._pair_lengths()
            finished = []
            for slot, piece in self._emit(chosen.tolist(), changed, longest):
                if piece is None:
                    finished.append(slot)
                else:
                    yield self.active[slot], piece
            step += 1
            if len(finished) == len(self.active):
                return
            reason = self._interrupted()
            if reason is not None:  # rows that finished this step keep their own reason
                yield from self._finish_active(reason)
                return
            with torch.inference_mode():
                tokens = self._drop(finished, chosen) if finished else chosen
                self._advance(tokens)

    def _interrupted(self) -> FinishReason | None:
        """Why no further forward pass may start: the caller cancelled, or the call's time is up."""
        if self.plan.cancel is not None and self.plan.cancel.is_set():
            return "cancelled"
        if self.plan.deadline is not None and time.monotonic() >= self.plan.deadline:
            return "timeout"
        return None

    def _finish_active(self, reason: FinishReason) -> list[tuple[int, str]]:
        """End every row still generating with ``reason``; return (row, text it still held back) pieces."""
        tails = []
        for index in self.active:
            row = self.rows[index]
            if row.finish_reason is None:
                row.finish_reason = reason
                tail = row.tracker.finish()
                if tail:
                    tails.append((index, tail))
        self.active = []
        return tails

    # ------------------------------------------------------------------ prefill
    def _start(self) -> None:
        plan = self.plan
        main_sequences = plan.safe_ids + (plan.unsafe_ids or []) if self.shared else plan.safe_ids
        ids, mask, positions = left_pad(main_sequences, self.target.pad_id, self.device)
        self.cache = DynamicCache(config=self.target.model.config)
        pre = self._prefill(ids, mask, positions)
        if pre.gate is not None:
            for row, gate_weight in zip(self.rows, pre.gate.tolist()):
                row.gate_weight = gate_weight
        paired = pre.kept if plan.expert is not None else []
        # the requests SafeInfer acts on: a format's refusal branch and refusal_stop are for them alone
        acting = frozenset(pre.kept) if plan.config.amplified or plan.config.guided else frozenset()
        constraints = plan.constraints or [None] * self.n
        for request, constraint in enumerate(constraints):
            if constraint is not None and request not in acting:
                constraint.drop_refusal()
        free = [request for request in sorted(acting) if constraints[request] is None]
        if plan.config.refusal_stop:  # a constrained answer is never cut: it would break its format
            self.protected = frozenset(free)
        if pre.gate is not None and plan.openings:
            for request in free:
                row = self.rows[request]
                if row.gate_weight is not None and row.gate_weight > plan.config.refuse_above:
                    row.opened = True
                    self.openings[request] = RefusalOpening(plan.openings)
        logits, coef = pre.logits, pre.coef
        if self.shared and len(paired) < self.n:  # requests below the gate cutoff lose their twins now
            select = torch.tensor(list(range(self.n)) + [self.n + slot for slot in paired], device=self.device)
            self.cache.batch_select_indices(select)
            mask, coef, logits = mask[select], coef[select], logits[select]
        if plan.expert == "model" and paired:
            index = torch.tensor(paired, device=self.device)
            self.expert = SeparateExpert(self.target.unsafe_model, mask[index])
            self.unsafe_logits = self.expert.prefill(ids[index], positions[index]).to(self.device)
        self.mask, self.coef, self.weight, self.logits = mask, coef, pre.weight, logits
        self.lengths = mask.sum(-1)  # tokens so far per main row
        self._set_paired(paired)

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> _Prefilled:
        """Run the prompts into the cache; the last logits, gate weights, steering coefficients, guidance
        weights and the requests that keep SafeInfer. A request whose gate weight is below ``gate_cutoff``
        is treated as gate weight 0 (no steering, no guidance) and left out of ``kept``.

        Steering only touches the last prompt token, so the prompt is run in two parts: all tokens but the
        last (unsteered, once), then the last token with the steering coefficients. In between, the gate
        reads the last token's hidden state on a fork of the cache (one token, layers up to the gate's),
        and the ``negated_vector`` twins, whose prompts equal their safe rows', copy those rows' cache
        instead of recomputing it. One pass instead when some row's prompt has fewer than two tokens, when
        the cache is not made of plain `DynamicLayer`s, or when the model is not a transformers
        `PreTrainedModel` (whose cache semantics the split relies on)."""
        plan, n, cache, model = self.plan, self.n, self.cache, self.target.model
        config = plan.config
        split = (
            isinstance(model, PreTrainedModel)
            and ids.shape[1] > 1
            and int(mask.sum(-1).min()) >= 2
            and kv_cache.forkable(cache)
        )
        if split:
            twins_copy = self.shared and plan.expert == "negated_vector"
            rows = n if twins_copy else ids.shape[0]
            forward(model, ids[:rows, :-1], mask[:rows, :-1], positions[:rows, :-1], cache)
            safe_cache = kv_cache.first_rows(cache, n, rows, ids.device)
            gate = self._gate_weights(ids[:n, -1:], mask[:n], positions[:n, -1:], cache=safe_cache)
            if twins_copy:
                cache.batch_select_indices(torch.cat([torch.arange(n), torch.arange(n)]).to(self.device))
        else:
            gate = self._gate_weights(ids[:n], mask[:n], positions[:n])
        if gate is not None:
            gate = self._with_question_weights(gate)
        gate_cpu = gate.cpu() if gate is not None else torch.ones(n)
        kept = list(range(n))
        if gate is not None and config.gate_cutoff > 0.0:
            below = gate_cpu < config.gate_cutoff
            gate_cpu = gate_cpu.masked_fill(below, 0.0)
            kept = [row for row in range(n) if not bool(below[row])]
        scale = plan.vector.scale if plan.vector is not None else 0.0
        safe_coef = gate_cpu * scale if config.amplified else torch.zeros(n)
        unsafe_coef = -gate_cpu * scale if plan.expert == "negated_vector" else torch.zeros(n)
        coef = (torch.cat([safe_coef, unsafe_coef]) if self.shared else safe_coef).to(self.device)
        weight = guidance_weight(config.alpha, gate_cpu).float().to(self.device)
        if split:
            logits = forward(model, ids[:, -1:], mask, positions[:, -1:], cache, self.steerer, coef)
        else:
            logits = forward(model, ids, mask, positions, cache, self.steerer, coef)
        return _Prefilled(logits, gate, coef, weight, kept)

    def _gate_weights(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any = None
    ) -> torch.Tensor | None:
        """Per-request gate weights from the unsteered prompt's hidden state (None: no gate). With ``cache``
        (a fork of the prompt's KV cache up to its last token, which this pass extends), only the last token
        is run."""
        plan = self.plan
        vector = plan.vector if plan.vector is not None else self.target.fallback_vector
        if not plan.config.gate or vector is None or vector.gate is None:
            return None
        if not (plan.config.amplified or plan.config.guided):
            return None
        extra = {**cache_kwarg(cache), "use_cache": True} if cache is not None else {}
        hidden = hidden_after_layer(
            self.target.model, vector.gate.layer, input_ids=ids, attention_mask=mask, position_ids=positions, **extra
        )
        return vector.gate.weight(hidden[:, -1, :])

    def _with_question_weights(self, gate: torch.Tensor) -> torch.Tensor:
        """``gate`` raised to the largest weight of each request's questions read on their own (``gate_question``:
        the last user message, and turns forged inside it): a wrapper around a question cannot lower its weight."""
        found = [(row, ids) for row, questions in enumerate(self.plan.question_ids or []) for ids in questions]
        if not found:
            return gate
        rows = [row for row, _ in found]
        ids, mask, positions = left_pad([question for _, question in found], self.target.pad_id, self.device)
        vector = self.plan.vector if self.plan.vector is not None else self.target.fallback_vector
        assert vector is not None and vector.gate is not None  # noqa: S101 (there is a gate weight)
        hidden = hidden_after_layer(
            self.target.model, vector.gate.layer, input_ids=ids, attention_mask=mask, position_ids=positions
        )
        index = torch.tensor(rows, device=gate.device)
        weights = vector.gate.weight(hidden[:, -1, :]).to(gate)
        return gate.scatter_reduce(0, index, weights, reduce="amax", include_self=True)

    # ------------------------------------------------------------------ one step
    def _check_finite(self, step: int) -> None:
        logits, unsafe = self.logits, self.unsafe_logits
        if not bool(torch.isfinite(logits).all()) or (unsafe is not None and not bool(torch.isfinite(unsafe).all())):
            bad = (~torch.isfinite(logits)).any(-1).nonzero().flatten().tolist()
            vector = self.plan.vector
            steering = f"vector {vector.vector_id}, scale {vector.scale:g}" if vector is not None else "no steering"
            raise NumericalError(
                f"the model produced non-finite (NaN or infinite) logits at generation step {step} (batch rows "
                f"{bad}, {steering}); check the model's dtype ({next(self.target.model.parameters()).dtype}) and "
                "the steering scale"
            )

    def _choose(self, step: int) -> tuple[torch.Tensor, list[bool] | None]:
        """The next token of every active row, and per row whether guidance changed it (None: unguided)."""
        sampling, eos = self.plan.sampling, self.target.eos
        n_active = len(self.active)
        log_probs = torch.log_softmax(self.logits, dim=-1)
        safe = log_probs[:n_active]
        if step < sampling.min_new_tokens and eos:
            safe = safe.clone()
            safe[:, sorted(eos)] = float("-inf")  # min_new_tokens: no end of sequence yet
        allowed = self._allowed(safe.shape[-1])
        if allowed is not None:  # the response format: before guidance, so plausibility is judged among allowed
            safe = safe.masked_fill(~allowed, float("-inf"))
            done = ~torch.isfinite(safe).any(dim=-1)
            if bool(done.any()):  # a complete output allows only end-of-sequence: it beats min_new_tokens
                safe = torch.where(done[:, None] & allowed, log_probs[:n_active], safe)
        uniforms = None
        if self.generators is not None:
            uniforms = torch.stack([torch.rand((), generator=self.generators[i]) for i in self.active])
        pick = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, uniforms=uniforms)
        if not self.paired:
            return select_tokens(safe, **pick), None  # type: ignore[arg-type]
        if self.shared:
            unsafe = log_probs[n_active:]
        else:
            unsafe = torch.log_softmax(self.unsafe_logits, dim=-1)  # type: ignore[arg-type]
        tau = self.plan.config.plausibility
        if len(self.paired) == n_active:
            scores = sgds_scores(safe, unsafe, self.weight, tau)
        else:  # rows below the gate cutoff keep their plain scores
            index = self.paired_index
            scores = safe.clone()
            scores[index] = sgds_scores(safe[index], unsafe, self.weight[index], tau)
        if allowed is not None:  # and after it: the final scores keep only allowed tokens
            scores = scores.masked_fill(~allowed, float("-inf"))
        chosen = select_tokens(scores, **pick)  # type: ignore[arg-type]
        changed = chosen != select_tokens(safe, **pick)  # type: ignore[arg-type]
        return chosen, changed.tolist()

    def _allowed(self, width: int) -> torch.Tensor | None:
        """[active rows, width] mask of the tokens each active row may choose: its response format's, or the next
        tokens of its refusal opening (None: no row is restricted)."""
        mask = None
        if self.plan.constraints is not None:
            mask = allowed_mask([self.plan.constraints[index] for index in self.active], width)
        opening = {}
        for slot, index in enumerate(self.active):
            if index in self.openings and not self.openings[index].done:
                opening[slot] = self.openings[index].next_tokens()
        if opening:
            mask = restrict_to(mask, opening, (len(self.active), width))
        return mask.to(self.device) if mask is not None else None

    def _pair_lengths(self) -> list[int]:
        """Tokens so far of each active request: the longer of its safe row and its twin (the context bound)."""
        n_active = len(self.active)
        lengths = self.lengths[:n_active]
        if self.shared and self.paired:
            lengths = lengths.clone()
            lengths[self.paired_index] = torch.maximum(lengths[self.paired_index], self.lengths[n_active:])
        return lengths.tolist()  # type: ignore[no-any-return]

    def _emit(
        self, chosen: list[int], changed: list[bool] | None, longest: list[int]
    ) -> Iterator[tuple[int, str | None]]:
        """Record each active row's token; yield (slot, decided text) and (slot, None) for a row that ends."""
        sampling, eos, context = self.plan.sampling, self.target.eos, self.target.context
        for slot, index in enumerate(self.active):
            row, token = self.rows[index], int(chosen[slot])
            if changed is not None and changed[slot]:
                row.guided_changes += 1
            row.token_ids.append(token)
            piece = ""
            if token in eos:
                row.finish_reason = "stop"
            else:
                if self.plan.constraints is not None and self.plan.constraints[index] is not None:
                    self.plan.constraints[index].advance(token)  # type: ignore[union-attr]
                if index in self.openings:
                    self.openings[index].advance(token)
                piece = row.tracker.push(token)
                if row.tracker.stopped:
                    row.finish_reason = "stop_sequence"
                elif (
                    index in self.protected
                    and len(row.token_ids) >= sampling.min_new_tokens
                    and ends_refusal(row.tracker.text)
                ):
                    row.finish_reason = "stop"
                elif len(row.token_ids) >= sampling.max_new_tokens or (
                    context is not None and longest[slot] + 1 >= context
                ):
                    row.finish_reason = "length"
            if piece:
                yield slot, piece
            if row.finish_reason is not None:
                tail = row.tracker.finish()
                if tail:
                    yield slot, tail
                yield slot, None

    def _drop(self, finished: list[int], chosen: torch.Tensor) -> torch.Tensor:
        """Remove the finished rows (and their twins) from every cache and per-row tensor; return the
        tokens of the rows that go on."""
        keep = [slot for slot in range(len(self.active)) if slot not in finished]
        self.active = [self.active[slot] for slot in keep]
        width = len(chosen)  # safe rows before this selection; their twins follow them
        kept = set(keep)
        twins_kept = [j for j, slot in enumerate(self.paired) if slot in kept]
        keep_main = keep + [width + j for j in twins_kept] if self.shared else keep
        select = torch.tensor(keep_main, device=self.device)
        self.cache.batch_select_indices(select)
        self.mask, self.lengths, self.coef = self.mask[select], self.lengths[select], self.coef[select]
        keep_index = torch.tensor(keep, device=self.device)
        self.weight = self.weight[keep_index]
        new_slot = {slot: position for position, slot in enumerate(keep)}
        paired = [new_slot[self.paired[j]] for j in twins_kept]
        if self.expert is not None:
            if paired:
                self.expert.select(twins_kept)
            else:
                self.expert, self.unsafe_logits = None, None
        self._set_paired(paired)
        return chosen[keep_index]

    def _advance(self, tokens: torch.Tensor) -> None:
        """Feed each row its chosen token (twins their safe row's) and compute the next logits."""
        index = self.paired_index
        next_ids = torch.cat([tokens, tokens[index]]) if self.shared and self.paired else tokens
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=-1)
        positions = self.lengths[:, None]
        self.lengths = self.lengths + 1
        self.logits = forward(
            self.target.model,
            next_ids[:, None].to(self.device),
            self.mask,
            positions,
            self.cache,
            self.steerer,
            self.coef,
        )
        if self.expert is not None:
            self.unsafe_logits = self.expert.step(tokens[index], positions[index]).to(self.device)

    def _set_paired(self, paired: list[int]) -> None:
        self.paired = paired
        self.paired_index = torch.tensor(paired, dtype=torch.long, device=self.device)
