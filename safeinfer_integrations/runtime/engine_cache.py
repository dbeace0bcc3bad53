"""A process-wide cache of engines, so that adapters built ten times over (LangChain's standard tests do
that) share one loaded model. Keyed by everything that changes the loaded objects."""

from __future__ import annotations

import os
import threading
from typing import Any

from ..models.loading import is_default_model
from .engine import SafeInferEngine

_ENGINES: dict[tuple[str, ...], SafeInferEngine] = {}
_LOCK = threading.Lock()


def _key(model: Any, vector: Any, unsafe_model: Any, dtype: Any, device_map: Any) -> tuple[str, ...]:
    name = "default" if is_default_model(model) else os.fspath(model)
    return (name, str(vector), str(unsafe_model), str(dtype), repr(device_map))


def get_engine(
    model: str | os.PathLike[str] | None = None,
    *,
    vector: str | os.PathLike[str] | None = None,
    unsafe_model: str | os.PathLike[str] | None = None,
    dtype: Any = None,
    device_map: Any = None,
) -> SafeInferEngine:
    """The shared engine for these load settings, loading it on first use. Per-call safety settings are
    not part of the key: they are passed to each call and never change the shared engine."""
    key = _key(model, vector, unsafe_model, dtype, device_map)
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = SafeInferEngine.from_pretrained(
                model, vector=vector, unsafe_model=unsafe_model, dtype=dtype, device_map=device_map
            )
            _ENGINES[key] = engine
        return engine


def clear_engines() -> None:
    """Forget every cached engine (their models are freed once nothing else holds them)."""
    with _LOCK:
        _ENGINES.clear()
