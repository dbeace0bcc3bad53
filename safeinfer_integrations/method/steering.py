"""Safety Amplification: add ``coef[row] * vector`` to one module's output at the last position.

A `Steerer` is scoped to one call: ``with attach(...) as steerer`` registers one forward hook and removes
it on exit, whatever happens. The hook acts only inside ``with steerer.active(coef):`` in the same thread
(a ContextVar), so concurrent calls on the same model, and a consumer's own code between two stream
steps, never see another call's steering.

Position rule: every forward pass of the decode loop ends at a position that must be steered: prefill
ends at the last prompt token (prompts are left-padded, so it is the last column for every row) and each
decode step feeds one generated token. So the hook adds the vector at the last column only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from ..errors import NumericalError
from ..models.architecture import steering_module

_ACTIVE: ContextVar[tuple[Steerer, torch.Tensor] | None] = ContextVar("safeinfer_steering", default=None)


# Steering whose addition is this many times the norm of the hidden state it is added to leaves nothing of the
# prompt in that state: the output is garbage (the shipped vector adds about 0.9x; 10x already gives empty lines).
MAX_STEERING_RATIO = 100.0


class Steerer:
    """One call's steering: the vector and the module it is added to. ``label`` names the vector, layer and scale
    in errors. The first steered pass (the prefill) checks that the steered state is finite and not swamped by
    the vector (`MAX_STEERING_RATIO`), so a runaway scale fails loudly instead of producing garbage text."""

    def __init__(self, module: nn.Module, vector: torch.Tensor, label: str = "the safety vector") -> None:
        self.module = module
        self.vector = vector
        self.label = label
        self._checked = False

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> Any:
        active = _ACTIVE.get()
        if active is None or active[0] is not self:
            return None
        coef = active[1]
        hidden = output[0] if isinstance(output, tuple) else output
        delta = coef.to(hidden.dtype)[:, None] * self.vector.to(hidden.dtype)[None, :]
        steered = hidden.clone()
        steered[:, -1, :] = steered[:, -1, :] + delta
        if not self._checked:
            self._checked = True
            self._check(hidden[:, -1, :], delta, steered[:, -1, :])
        if isinstance(output, tuple):
            return (steered, *output[1:])
        return steered

    def _check(self, hidden: torch.Tensor, delta: torch.Tensor, steered: torch.Tensor) -> None:
        if not bool(torch.isfinite(steered).all()):
            raise NumericalError(f"steering with {self.label} made the hidden state non-finite; lower the scale")
        ratio = delta.double().norm(dim=-1) / hidden.double().norm(dim=-1).clamp_min(1e-6)
        if bool((ratio > MAX_STEERING_RATIO).any()):
            raise NumericalError(
                f"steering with {self.label} adds {float(ratio.max()):.3g} times the norm of the hidden state it "
                f"steers (at most {MAX_STEERING_RATIO:g} is allowed: beyond it the output is the vector's, not the "
                "model's); lower the scale"
            )

    @contextmanager
    def active(self, coef: torch.Tensor) -> Iterator[None]:
        """Steer forward passes run inside this block, in this thread, with per-row ``coef``."""
        token = _ACTIVE.set((self, coef))
        try:
            yield
        finally:
            _ACTIVE.reset(token)


@contextmanager
def attach(model: nn.Module, layer: int, vector: torch.Tensor, label: str = "the safety vector") -> Iterator[Steerer]:
    """Register the steering hook on ``layer`` for the duration of the block; always removed."""
    module = steering_module(model, layer)
    param = next(model.parameters())
    steerer = Steerer(module, vector.to(param.device), label)
    handle = module.register_forward_hook(steerer._hook)  # registered before the try: nothing half-done
    try:
        yield steerer
    finally:
        handle.remove()


class _Captured(Exception):
    """Raised by the capture hook to end a forward pass early, carrying the hidden state."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("captured")
        self.hidden = hidden


_CAPTURING: ContextVar[object | None] = ContextVar("safeinfer_capture", default=None)


def hidden_after_layer(model: nn.Module, layer: int, **inputs: Any) -> torch.Tensor:
    """The hidden state after decoder layer ``layer`` (all positions), computing only layers 0..layer: the
    forward pass is ended right after that layer. Like steering, the hook acts only on this call's pass.
    ``inputs`` go to the model's forward (``use_cache`` defaults to False; pass a cache to run on top of it)."""
    from ..models.architecture import decoder_layers

    token = object()

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if _CAPTURING.get() is token:
            raise _Captured(output[0] if isinstance(output, tuple) else output)

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    marker = _CAPTURING.set(token)
    try:
        model(**{"use_cache": False, **inputs})
    except _Captured as captured:
        return captured.hidden
    finally:
        _CAPTURING.reset(marker)
        handle.remove()
    raise RuntimeError(f"decoder layer {layer} did not run during the forward pass")
