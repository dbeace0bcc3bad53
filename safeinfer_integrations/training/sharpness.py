"""Harm-gate sharpness: the gate's logit rescaled to ``factor * logit + shift`` (`HarmGate.sharpened`), a
dimension of the calibration sweep (``safeinfer calibrate --gate-sharpness``). A factor above 1 pushes weights
towards 0 and 1; a positive shift raises them; ``1:0`` is the fitted gate."""

from __future__ import annotations

import math

from ..errors import InvalidSettingError
from ..method.vector import SafetyVector

Sharpness = tuple[float, float]  # (factor, shift) of `HarmGate.sharpened`
PLAIN: Sharpness = (1.0, 0.0)


def sharpness_label(sharpness: Sharpness) -> str:
    return f"{sharpness[0]:g}:{sharpness[1]:g}"


def parse_sharpness(text: str) -> list[Sharpness]:
    """``"1:0,2:2"`` -> [(1.0, 0.0), (2.0, 2.0)]; the error names the bad pair."""
    pairs = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        try:
            factor, shift = (float(v) for v in item.split(":"))
        except ValueError as error:
            raise InvalidSettingError(
                f"gate sharpness must be comma-separated factor:shift pairs such as 1:0,2:2; got {item!r}"
            ) from error
        if not (math.isfinite(factor) and factor > 0 and math.isfinite(shift)):
            raise InvalidSettingError(f"gate sharpness {item!r}: the factor must be > 0 and both finite")
        pairs.append((factor, shift))
    if not pairs:
        raise InvalidSettingError(f"no gate sharpness given in {text!r}")
    return pairs


def sharpness_of(label: str | None) -> Sharpness:
    """The (factor, shift) of a row's ``gate_sharpness`` label (None: the fitted gate)."""
    return PLAIN if not label else parse_sharpness(label)[0]


def with_sharpness(vector: SafetyVector, sharpness: Sharpness) -> SafetyVector:
    """``vector`` with its gate sharpened (unchanged for 1:0 or a vector without a gate)."""
    if vector.gate is None or sharpness == PLAIN:
        return vector
    return SafetyVector(
        vector.vector,
        layer=vector.layer,
        scale=vector.scale,
        metadata=vector.metadata,
        gate=vector.gate.sharpened(*sharpness),
    )
