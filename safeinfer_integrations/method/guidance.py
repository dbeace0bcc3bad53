"""Safety-guided decoding (sGDS) and token selection, as small pure functions on (rows, vocab) tensors.

    score(t) = l_s(t) - w * relu(l_u(t) - l_s(t)),   w = alpha / (1 - alpha)

with l_s, l_u the log-softmaxed logits of the steered (safe) model and of the unsafe expert. With
plausibility tau > 0, tokens with p_s(t) < tau * max p_s are excluded first (score -inf). This is the closed
form of Model Arithmetic's ``M_safe - alpha * Union(M_unsafe, M_safe)`` (see docs/method.md).
"""

from __future__ import annotations

import math

import torch

from ..errors import InvalidSettingError

NEG_INF = float("-inf")


def plausible_mask(log_probs: torch.Tensor, tau: float) -> torch.Tensor:
    """True where ``p >= tau * max p`` (all True when tau == 0)."""
    if tau <= 0.0:
        return torch.ones_like(log_probs, dtype=torch.bool)
    threshold = log_probs.max(dim=-1, keepdim=True).values + math.log(tau)
    return log_probs >= threshold


def guidance_weight(alpha: float, gate: torch.Tensor) -> torch.Tensor:
    """Per-row penalty factor ``w = g*alpha / (1 - g*alpha)`` for gate weights ``g`` in [0, 1].

    The gate scales alpha, not the factor: g = 1 gives the paper's alpha / (1 - alpha), and a prompt the gate
    finds benign (small g) gets a factor near g*alpha, so guidance barely touches it. Scaling the factor
    instead (g * 99 at alpha = 0.99) left benign prompts with a factor of 10 or more."""
    effective = gate.to(torch.float64).clamp(0.0, 1.0) * alpha
    return effective / (1.0 - effective)


def sgds_scores(
    safe_log_probs: torch.Tensor,
    unsafe_log_probs: torch.Tensor,
    weight: torch.Tensor | float,
    tau: float,
) -> torch.Tensor:
    """The sGDS score of every token. ``weight`` is alpha/(1-alpha), a float or a (rows,) tensor."""
    if isinstance(weight, torch.Tensor):
        weight = weight.to(safe_log_probs.dtype)[:, None]
    penalty = torch.relu(unsafe_log_probs - safe_log_probs)
    # 0 * inf would be NaN where the safe model gives -inf; such tokens are excluded anyway.
    penalty = torch.nan_to_num(penalty, nan=0.0, posinf=torch.finfo(penalty.dtype).max)
    scores = safe_log_probs - weight * penalty
    return scores.masked_fill(~plausible_mask(safe_log_probs, tau), NEG_INF)


def _filtered(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p, as in transformers' sampling warpers."""
    scores = scores / temperature
    if top_k > 0 and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, NEG_INF)
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1.0 - top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, NEG_INF)
    return scores


def select_tokens(
    scores: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    uniforms: torch.Tensor | None,
) -> torch.Tensor:
    """Pick one token per row: argmax when ``temperature == 0``, otherwise inverse-CDF sampling with one
    uniform draw per row (so two distributions can be compared under the same draw)."""
    if temperature == 0.0:
        return scores.argmax(dim=-1)
    if uniforms is None:
        raise InvalidSettingError("sampling needs one uniform draw per row")
    probs = _filtered(scores.float(), temperature, top_k, top_p).softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    targets = (uniforms.to(cdf.device, cdf.dtype) * cdf[:, -1])[:, None]
    picked = torch.searchsorted(cdf, targets, right=True).squeeze(-1)
    return picked.clamp_(max=scores.shape[-1] - 1)
