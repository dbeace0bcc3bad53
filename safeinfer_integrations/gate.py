"""Fitting the context-adaptive harm gate (`HarmGate`) from harmful vs benign questions.

The gate reads the hidden state after one decoder layer at the last prompt token, exactly as the engine
does (the prompt rendered with the chat template, unsteered). Fit:

1. For every candidate layer (all but the last, whose hidden state may be normalised), the
   difference-of-means direction ``d = mean(harmful) - mean(benign)`` is scored by 2-fold cross-validated
   AUC of the projection ``h . d`` (fit on one half, score on the other). The best layer wins (ties: the
   lower layer).
2. On all fit questions, a one-dimensional logistic regression (balanced class weights, small L2 penalty,
   Newton's method, so deterministic) maps the standardised projection to a harm probability. Its slope and
   intercept are folded into the gate's ``direction`` and ``bias``.

The fit data must be disjoint from anything the gate is evaluated on (see `demos`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .architecture import decoder_layers
from .heads import left_pad, pad_id_of
from .prompts import PromptFormatter
from .vector import HarmGate


@dataclass(frozen=True)
class GateFit:
    gate: HarmGate
    layer_auc: tuple[float, ...]  # cross-validated AUC per candidate layer
    train_accuracy: float
    n_harmful: int
    n_benign: int


def chat_ids(tokenizer: Any, questions: Sequence[str]) -> list[list[int]]:
    """Token ids of each question as a one-turn chat, as the engine renders it."""
    formatter = PromptFormatter(tokenizer)
    return [formatter.encode([{"role": "user", "content": q}]) for q in questions]


@torch.inference_mode()
def last_token_hidden(model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int, *,
                      batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """Hidden states after every decoder layer at the last token: shape (layers, rows, hidden), float64."""
    device = next(model.parameters()).device
    chunks = []
    for start in tqdm(range(0, len(sequences), batch_size), desc="gate hidden states", disable=not progress):
        ids, mask, positions = left_pad(sequences[start:start + batch_size], pad_id, device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                    output_hidden_states=True, logits_to_keep=1)
        chunks.append(torch.stack([h[:, -1, :] for h in out.hidden_states[1:]]).to("cpu", torch.float64))
    return torch.cat(chunks, dim=1)


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    diff = positive[:, None] - negative[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def _logistic_1d(z: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, l2: float) -> tuple[float, float]:
    """Weighted, L2-penalised (slope only) logistic regression of y on z by Newton's method."""
    x = torch.stack([z, torch.ones_like(z)], dim=1)
    theta = torch.zeros(2, dtype=torch.float64)
    penalty = torch.diag(torch.tensor([l2, 0.0], dtype=torch.float64))
    for _ in range(100):
        p = torch.sigmoid(x @ theta)
        grad = x.T @ (weights * (p - y)) + penalty @ theta
        hess = (x.T * (weights * p * (1 - p))) @ x + penalty + 1e-9 * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        theta = theta - step
        if float(step.abs().max()) < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def fit_gate_from_hidden(harmful: torch.Tensor, benign: torch.Tensor, *, floor: float = 0.0,
                         l2: float = 0.1, layers: Sequence[int] | None = None) -> GateFit:
    """Fit a gate from hidden states of shape (layers, rows, hidden) of harmful and benign prompts."""
    if harmful.shape[0] != benign.shape[0] or harmful.shape[-1] != benign.shape[-1]:
        raise ValueError("harmful and benign hidden states must have the same layers and hidden size")
    if harmful.shape[1] < 4 or benign.shape[1] < 4:
        raise ValueError(f"need at least 4 harmful and 4 benign prompts; got {harmful.shape[1]} and {benign.shape[1]}")
    n_layers = harmful.shape[0]
    candidates = list(layers) if layers is not None else list(range(max(1, n_layers - 1)))
    harmful, benign = harmful.double(), benign.double()
    half_h, half_b = harmful.shape[1] // 2, benign.shape[1] // 2
    scores = []
    for layer in range(n_layers):
        if layer not in candidates:
            scores.append(float("nan"))
            continue
        h, b = harmful[layer], benign[layer]
        folds = ((slice(0, half_h), slice(half_h, None), slice(0, half_b), slice(half_b, None)),
                 (slice(half_h, None), slice(0, half_h), slice(half_b, None), slice(0, half_b)))
        total = 0.0
        for fit_h, test_h, fit_b, test_b in folds:
            direction = h[fit_h].mean(0) - b[fit_b].mean(0)
            total += auc(h[test_h] @ direction, b[test_b] @ direction)
        scores.append(total / 2)
    best = max(candidates, key=lambda layer: (scores[layer], -layer))
    h, b = harmful[best], benign[best]
    direction = h.mean(0) - b.mean(0)
    unit = direction / direction.norm().clamp_min(1e-12)
    ph, pb = h @ unit, b @ unit
    middle = float(ph.mean() + pb.mean()) / 2
    spread = float(torch.cat([ph - ph.mean(), pb - pb.mean()]).std().clamp_min(1e-12))
    z = (torch.cat([ph, pb]) - middle) / spread
    y = torch.cat([torch.ones(len(ph)), torch.zeros(len(pb))]).double()
    weights = torch.cat([torch.full((len(ph),), 0.5 / len(ph)), torch.full((len(pb),), 0.5 / len(pb))]).double()
    slope, intercept = _logistic_1d(z, y, weights * len(y), l2)
    gate = HarmGate(direction=(slope / spread) * unit, layer=best,
                    bias=intercept - slope * middle / spread, floor=floor)
    predicted = gate.weight(torch.cat([h, b]).float()) > (floor + (1 - floor) * 0.5)
    accuracy = float((predicted.double() == y).double().mean())
    return GateFit(gate=gate, layer_auc=tuple(scores), train_accuracy=accuracy,
                   n_harmful=int(harmful.shape[1]), n_benign=int(benign.shape[1]))


def fit_gate(model: nn.Module, tokenizer: Any, harmful: Sequence[str], benign: Sequence[str], *,
             floor: float = 0.0, batch_size: int = 16, progress: bool = False) -> GateFit:
    """Fit a `HarmGate` on harmful vs benign questions (rendered as one-turn chats)."""
    if not harmful or not benign:
        raise ValueError("fit_gate needs harmful and benign questions")
    decoder_layers(model)  # fail early on unsupported models
    pad = pad_id_of(tokenizer)
    hidden = last_token_hidden(model, chat_ids(tokenizer, list(harmful) + list(benign)), pad,
                               batch_size=batch_size, progress=progress)
    return fit_gate_from_hidden(hidden[:, :len(harmful)], hidden[:, len(harmful):], floor=floor)
