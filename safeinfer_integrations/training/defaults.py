"""Where a vector builder takes its layer and scale from when none is given: the calibrated choice shipped for
the default model, else a quarter of the depth (the paper's layer 8 of 32) and scale 1.0."""

from __future__ import annotations

from typing import Any

from ..method.shipped import shipped_calibration


def calibrated_choice(name: str, default_model: bool) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The shipped calibration table ``name`` (None unless building for the default model) and its
    ``chosen`` setting (empty without one)."""
    calibration = shipped_calibration(name) if default_model else None
    return calibration, dict((calibration or {}).get("chosen", {}))


def default_setting(
    chosen: dict[str, Any], num_layers: int, layer: int | None, scale: float | None
) -> tuple[int, float]:
    """The layer and scale a build uses: the given ones, else the calibrated ``chosen`` ones, else a quarter of
    the depth (the paper's layer 8 of 32) and scale 1.0."""
    if layer is None:
        layer = int(chosen.get("layer", max(0, round(num_layers / 4))))
    if scale is None:
        scale = float(chosen.get("scale", 1.0))
    return layer, scale
