"""`HarmGate`: the context-adaptive weight that scales SafeInfer per request, read from one hidden state."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InvalidInputError, InvalidSettingError, InvalidTypeError


def frozen_tensor(value: torch.Tensor, name: str) -> torch.Tensor:
    """A float32 CPU copy of a non-empty, finite 1-D tensor (the stored form of vectors and directions)."""
    if not isinstance(value, torch.Tensor):
        raise InvalidTypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if value.ndim != 1 or value.numel() == 0:
        raise InvalidInputError(f"{name} must be a non-empty 1-D tensor; got shape {tuple(value.shape)}")
    tensor = value.detach().to("cpu", torch.float32).clone()
    if not torch.isfinite(tensor).all():
        raise InvalidInputError(f"{name} contains NaN or infinite values")
    return tensor


@dataclass(frozen=True)
class HarmGate:
    """A context-adaptive gate: ``weight = floor + (1 - floor) * sigmoid(h . direction + bias)`` where
    ``h`` is the hidden state after decoder layer ``layer`` at the last prompt token. The weight scales
    SA and the guidance of one request, so prompts that look benign are left almost untouched."""

    direction: torch.Tensor
    layer: int
    bias: float = 0.0
    floor: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "direction", frozen_tensor(self.direction, "gate direction"))
        if self.layer < 0:
            raise InvalidSettingError(f"gate layer must be >= 0; got {self.layer}")
        if not math.isfinite(self.bias):
            raise InvalidSettingError(f"gate bias must be finite; got {self.bias!r}")
        if not 0.0 <= self.floor <= 1.0:
            raise InvalidSettingError(f"gate floor must be in [0, 1]; got {self.floor!r}")

    def sharpened(self, factor: float, shift: float = 0.0) -> HarmGate:
        """This gate with the logit ``factor * (h . direction + bias) + shift``: a factor above 1 pushes weights
        towards 0 and 1, a positive shift raises them (``safeinfer calibrate --gate-sharpness``)."""
        if not (math.isfinite(factor) and factor > 0):
            raise InvalidSettingError(f"gate sharpness factor must be a finite number > 0; got {factor!r}")
        if not math.isfinite(shift):
            raise InvalidSettingError(f"gate sharpness shift must be finite; got {shift!r}")
        return HarmGate(
            direction=self.direction * factor, layer=self.layer, bias=self.bias * factor + shift, floor=self.floor
        )

    def weight(self, hidden: torch.Tensor) -> torch.Tensor:
        """Gate weights in [floor, 1] for hidden states of shape (rows, hidden)."""
        direction = self.direction.to(hidden.device, torch.float32)
        logit = hidden.to(torch.float32) @ direction + self.bias
        return self.floor + (1.0 - self.floor) * torch.sigmoid(logit)
