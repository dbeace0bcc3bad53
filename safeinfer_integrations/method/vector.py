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

from ..errors import InvalidSettingError, VectorFileError, VectorMismatchError
from ..models.architecture import model_shape
from .gate import HarmGate, frozen_tensor

FORMAT_VERSION = "1"


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
        object.__setattr__(self, "vector", frozen_tensor(self.vector, "vector"))
        if not isinstance(self.layer, int) or self.layer < 0:
            raise InvalidSettingError(f"layer must be an int >= 0; got {self.layer!r}")
        if not math.isfinite(self.scale):
            raise InvalidSettingError(f"scale must be finite; got {self.scale!r}")
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
        """Raise `VectorMismatchError` (a ValueError) naming every mismatch between this vector and ``model``."""
        problems = self.mismatches(model)
        if problems:
            raise VectorMismatchError(f"safety vector {self.vector_id} does not fit the model: " + "; ".join(problems))

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
            header["gate"] = json.dumps({"layer": self.gate.layer, "bias": self.gate.bias, "floor": self.gate.floor})
        save_file(tensors, str(path), metadata=header)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SafetyVector:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no safety vector at {path}")
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
        except Exception as error:  # safetensors raises its own error types for truncated or foreign files
            raise VectorFileError(f"{path} is not a readable safetensors file ({error})") from error
        if header.get("format") != "safeinfer-vector":
            raise VectorFileError(f"{path} is not a safeinfer vector file (format={header.get('format')!r})")
        try:
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
        except KeyError as error:
            raise VectorFileError(
                f"{path} lacks {error} (a safeinfer vector file holds 'vector', its layer and scale)"
            ) from error
        except (ValueError, TypeError) as error:
            raise VectorFileError(f"{path} holds an unusable safety vector: {error}") from error
