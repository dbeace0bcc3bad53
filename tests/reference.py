"""A naive, no-cache reference implementation of SafeInfer greedy decoding, written independently of the
engine: every step recomputes the whole sequence, steering is added at every position >= prompt_len - 1
by its own hook, and the sGDS score is computed from the formula in docs/method.md."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def _mlp(model: Any, layer: int) -> torch.nn.Module:
    if hasattr(model, "transformer"):  # GPT-2
        return model.transformer.h[layer].mlp
    return model.model.layers[layer].mlp


def _log_probs(model: Any, ids: list[int], steer: tuple[torch.Tensor, int, float] | None, start: int) -> torch.Tensor:
    """Log-probabilities of the next token after ``ids``; steering adds ``coef * vector`` at layer's MLP
    output for every position >= start."""
    handle = None
    if steer is not None:
        vector, layer, coef = steer

        def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            added = output.clone()
            added[:, start:, :] += coef * vector.to(device=output.device, dtype=output.dtype)
            return added

        handle = _mlp(model, layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids], device=model.device), use_cache=False).logits[0, -1].double()
    finally:
        if handle is not None:
            handle.remove()
    return torch.log_softmax(logits, dim=-1)


def reference_greedy(
    model: Any,
    prompt_ids: list[int],
    *,
    mode: str,
    max_new_tokens: int,
    eos: set[int],
    vector: torch.Tensor | None = None,
    layer: int = 0,
    scale: float = 1.0,
    expert: str | None = None,
    unsafe_prompt_ids: list[int] | None = None,
    unsafe_model: Any = None,
    alpha: float = 0.99,
    tau: float = 0.0,
    min_new_tokens: int = 0,
    gate_weight: float = 1.0,
    stop_after: Callable[[list[int]], bool] | None = None,
    allowed: Callable[[list[int]], torch.Tensor] | None = None,
) -> list[int]:
    """Greedy tokens, recomputing the whole sequence at every step. ``gate_weight`` g scales the steering
    (``g * scale``) and alpha (``g * alpha``), as the harm gate does. ``stop_after(tokens)`` true ends the
    generation after that token. ``allowed(tokens)`` (a response format) is a bool mask of the tokens that may
    follow: the steered scores are restricted to it before guidance and the final scores after it."""
    generated: list[int] = []
    amplified = mode in ("sa", "safeinfer")
    guided = mode in ("sgds", "safeinfer")
    for _ in range(max_new_tokens):
        sequence = prompt_ids + generated
        safe_steer = (vector, layer, gate_weight * scale) if amplified else None
        l_s = _log_probs(model, sequence, safe_steer, len(prompt_ids) - 1)
        if len(generated) < min_new_tokens:
            l_s[sorted(eos)] = -math.inf
        mask = allowed(generated) if allowed is not None else None
        if mask is not None:
            l_s[~mask] = -math.inf
        if guided:
            if expert == "prompted":
                assert unsafe_prompt_ids is not None
                l_u = _log_probs(model, unsafe_prompt_ids + generated, None, 0)
            elif expert == "negated_vector":
                l_u = _log_probs(model, sequence, (vector, layer, -gate_weight * scale), len(prompt_ids) - 1)
            elif expert == "model":
                l_u = _log_probs(unsafe_model, sequence, None, 0)
            else:
                raise ValueError(expert)
            factor = gate_weight * alpha / (1 - gate_weight * alpha)
            score = l_s - factor * torch.clamp(l_u - l_s, min=0)
            if tau > 0:
                score[l_s < l_s.max() + math.log(tau)] = -math.inf
        else:
            score = l_s
        if mask is not None:
            score[~mask] = -math.inf
        token = int(score.argmax())
        generated.append(token)
        if token in eos or (stop_after is not None and stop_after(generated)):
            break
    return generated


def opening_mask(tokenizer: Any, width: int) -> Callable[[list[int]], torch.Tensor]:
    """``allowed(tokens)`` of a refusal opening (``refuse_above``), from the opening texts alone: while the tokens
    so far are a proper prefix of some opening's token ids, only the tokens that continue one; then anything."""
    from safeinfer_integrations.method.refusal import REFUSAL_OPENINGS

    sequences = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in REFUSAL_OPENINGS]

    def allowed(tokens: list[int]) -> torch.Tensor:
        mask = torch.ones(width, dtype=torch.bool)
        if any(tokens[: len(s)] == s for s in sequences):
            return mask
        mask[:] = False
        for s in sequences:
            if len(s) > len(tokens) and s[: len(tokens)] == tokens:
                mask[s[len(tokens)]] = True
        return mask

    return allowed
