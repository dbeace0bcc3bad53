"""Batching token id lists for a model: padding, the pad id, and the log-likelihood of answers.

Every place that pads uses these (the decode loop, vector building, gate fitting, calibration, evaluation),
so the padding side, the position ids and the pad-id fallback are decided once:

- `left_pad` for prompts whose *last* token must line up (prefill and decoding): position ids count from 0
  at each row's first real token;
- `right_pad` for continuations of a cached prefix (the caller adds the prefix's length to the positions);
- `pad_id_of`: the tokenizer's pad id, else its end-of-sequence id, else 0. The value never reaches a
  real token's output: padded positions are masked out of attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InvalidInputError

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # ids, attention mask, position ids


def pad_id_of(tokenizer: Any) -> int:
    """The id padding uses: the tokenizer's pad id, else its end-of-sequence id, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def _pad(sequences: Sequence[Sequence[int]], pad_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists padded on one side to one width: CPU ids and attention mask."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise InvalidInputError("every sequence must have at least one token")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Left-pad token id lists; return ids, attention mask and position ids (0 at each row's first token)."""
    ids, mask = _pad(sequences, pad_id, left=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def right_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists (continuations of a cached prefix); return ids and their attention mask."""
    ids, mask = _pad(sequences, pad_id, left=False)
    return ids.to(device), mask.to(device)


def token_nll(logits: torch.Tensor, targets: Sequence[int]) -> float:
    """Summed negative log-likelihood of ``targets`` under ``logits`` (one row per target), in float64."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    index = torch.tensor(list(targets), device=log_probs.device)
    return -float(log_probs.gather(-1, index[:, None]).sum())


@torch.inference_mode()
def answer_nll(
    model: Any, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int, *, batch_size: int = 16
) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each answer given its prompt under ``model``, in
    left-padded batches with no hooks. Empty answers give (0.0, 0)."""
    if len(prompts) != len(answers):
        raise InvalidInputError(f"{len(prompts)} prompts but {len(answers)} answers")
    results: list[tuple[float, int]] = [(0.0, 0)] * len(prompts)
    todo = [i for i, answer in enumerate(answers) if len(answer) > 0]
    device = next(model.parameters()).device
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        ids, mask, positions = left_pad([list(prompts[i]) + list(answers[i]) for i in chunk], pad_id, device)
        keep = max(len(answers[i]) for i in chunk) + 1  # the logits that predict answer tokens, no more
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=keep
        ).logits
        for row, i in enumerate(chunk):
            answer = list(answers[i])
            first = keep - 1 - len(answer)  # the logit column that predicts the answer's first token
            results[i] = (token_nll(logits[row, first : keep - 1], answer), len(answer))
    return results


def perplexity(scores: Sequence[tuple[float, int]]) -> float:
    """exp(total NLL / total tokens) of `answer_nll` results (nan when no answer has a token)."""
    tokens = sum(count for _, count in scores)
    return math.exp(sum(nll for nll, _ in scores) / tokens) if tokens else float("nan")
