"""`SafetyVector`: an immutable function vector (plus an optional harm gate), saved as safetensors with
JSON metadata, and checked against a model before use."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .architecture import model_shape

FORMAT_VERSION = "1"


def _frozen_tensor(value: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if value.ndim != 1 or value.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor; got shape {tuple(value.shape)}")
    tensor = value.detach().to("cpu", torch.float32).clone()
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")
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
        object.__setattr__(self, "direction", _frozen_tensor(self.direction, "gate direction"))
        if self.layer < 0:
            raise ValueError(f"gate layer must be >= 0; got {self.layer}")
        if not math.isfinite(self.bias):
            raise ValueError(f"gate bias must be finite; got {self.bias!r}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"gate floor must be in [0, 1]; got {self.floor!r}")

    def sharpened(self, factor: float, shift: float = 0.0) -> HarmGate:
        """This gate with the logit ``factor * (h . direction + bias) + shift``: a factor above 1 pushes weights
        towards 0 and 1, a positive shift raises them (``safeinfer calibrate --gate-sharpness``)."""
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"gate sharpness factor must be a finite number > 0; got {factor!r}")
        if not math.isfinite(shift):
            raise ValueError(f"gate sharpness shift must be finite; got {shift!r}")
        return HarmGate(direction=self.direction * factor, layer=self.layer, bias=self.bias * factor + shift,
                        floor=self.floor)

    def weight(self, hidden: torch.Tensor) -> torch.Tensor:
        """Gate weights in [floor, 1] for hidden states of shape (rows, hidden)."""
        direction = self.direction.to(hidden.device, torch.float32)
        logit = hidden.to(torch.float32) @ direction + self.bias
        return self.floor + (1.0 - self.floor) * torch.sigmoid(logit)


@dataclass(frozen=True)
class SafetyVector:
    """A function vector added as ``scale * vector`` to decoder layer ``layer``'s MLP output.

    Immutable: the tensor is copied to float32 CPU on construction and metadata is read-only."""

    vector: torch.Tensor
    layer: int
    scale: float = 1.0
    metadata: Mapping[str, Any] = field(default_factory=dict)
    gate: HarmGate | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "vector", _frozen_tensor(self.vector, "vector"))
        if not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be an int >= 0; got {self.layer!r}")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be finite; got {self.scale!r}")
        json.dumps(dict(self.metadata))  # metadata must be JSON-serialisable
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    @property
    def hidden_size(self) -> int:
        return int(self.vector.numel())

    @property
    def vector_id(self) -> str:
        """A short content hash: identical vectors, layers, scales and harm gates share an id. The gate is
        part of it because it changes what the vector does (a refitted gate is a new id)."""
        digest = hashlib.sha256(self.vector.numpy().tobytes())
        digest.update(f"{self.layer}:{self.scale!r}".encode())
        if self.gate is not None:
            digest.update(self.gate.direction.numpy().tobytes())
            digest.update(f"gate:{self.gate.layer}:{self.gate.bias!r}:{self.gate.floor!r}".encode())
        return "sv-" + digest.hexdigest()[:10]

    def with_settings(self, *, layer: int | None = None, scale: float | None = None) -> SafetyVector:
        """A copy with another layer or scale (None keeps the current one)."""
        return SafetyVector(
            vector=self.vector,
            layer=self.layer if layer is None else layer,
            scale=self.scale if scale is None else scale,
            metadata=self.metadata,
            gate=self.gate,
        )

    # ------------------------------------------------------------------ checks
    def mismatches(self, model: nn.Module) -> list[str]:
        """What does not match between this vector and ``model`` (empty when it fits)."""
        shape = model_shape(model)
        problems = []
        if self.hidden_size != shape.hidden_size:
            problems.append(f"vector size {self.hidden_size} != model hidden size {shape.hidden_size}")
        if self.layer >= shape.num_layers:
            problems.append(
                f"layer {self.layer} is out of range: the model has {shape.num_layers} layers "
                f"(0..{shape.num_layers - 1})"
            )
        if self.gate is not None:
            if self.gate.direction.numel() != shape.hidden_size:
                problems.append(
                    f"gate direction size {self.gate.direction.numel()} != model hidden size {shape.hidden_size}"
                )
            if self.gate.layer >= shape.num_layers:
                problems.append(f"gate layer {self.gate.layer} is out of range for {shape.num_layers} layers")
        expected = self.metadata.get("config_hash")
        if expected is not None and expected != shape.config_hash():
            built_for = self.metadata.get("model_name", "another model")
            recorded = self.metadata.get("architecture")
            differing = shape.differences(dict(recorded)) if isinstance(recorded, Mapping) else []
            detail = (": " + ", ".join(differing)) if differing else ""
            problems.append(
                f"built for {built_for} (architecture hash {expected}), "
                f"model has architecture hash {shape.config_hash()} ({shape.model_type}, "
                f"hidden {shape.hidden_size}, {shape.num_layers} layers, {shape.num_heads} heads, "
                f"vocab {shape.vocab_size}){detail}"
            )
        return problems

    def check(self, model: nn.Module) -> None:
        """Raise ValueError naming every mismatch between this vector and ``model``."""
        problems = self.mismatches(model)
        if problems:
            raise ValueError(f"safety vector {self.vector_id} does not fit the model: " + "; ".join(problems))

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write safetensors (``vector``, optional ``gate_direction``) with JSON metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"vector": self.vector.contiguous()}
        header: dict[str, str] = {
            "format": "safeinfer-vector",
            "format_version": FORMAT_VERSION,
            "layer": str(self.layer),
            "scale": repr(float(self.scale)),
            "metadata": json.dumps(dict(self.metadata), sort_keys=True),
        }
        if self.gate is not None:
            tensors["gate_direction"] = self.gate.direction.contiguous()
            header["gate"] = json.dumps(
                {"layer": self.gate.layer, "bias": self.gate.bias, "floor": self.gate.floor}
            )
        save_file(tensors, str(path), metadata=header)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SafetyVector:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no safety vector at {path}")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        if header.get("format") != "safeinfer-vector":
            raise ValueError(f"{path} is not a safeinfer vector file (format={header.get('format')!r})")
        tensors = load_file(str(path))
        gate = None
        if "gate" in header:
            spec = json.loads(header["gate"])
            gate = HarmGate(
                direction=tensors["gate_direction"],
                layer=int(spec["layer"]),
                bias=float(spec["bias"]),
                floor=float(spec["floor"]),
            )
        return cls(
            vector=tensors["vector"],
            layer=int(header["layer"]),
            scale=float(header["scale"]),
            metadata=json.loads(header.get("metadata", "{}")),
            gate=gate,
        )
