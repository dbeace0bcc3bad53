"""The safety assets shipped inside the package (``safeinfer_integrations/vectors/``): the default model's
calibrated vectors and the calibration tables that chose their layer and scale."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_VECTOR_FILE = "SmolLM2-135M-Instruct.safetensors"
OPTIMIZED_CALIBRATION = "calibration.json"  # the shipped default (optimised) vector's sweep
FUNCTION_VECTOR_CALIBRATION = "fv/calibration.json"  # the paper's function vector's sweep


def _vectors_dir() -> Any:
    return resources.files("safeinfer_integrations").joinpath("vectors")


def shipped_vector_path() -> Path | None:
    """The calibrated vector shipped for the default model, if this build has one."""
    candidate = _vectors_dir().joinpath(DEFAULT_VECTOR_FILE)
    return Path(str(candidate)) if candidate.is_file() else None


def shipped_calibration(name: str = FUNCTION_VECTOR_CALIBRATION) -> dict[str, Any] | None:
    """A calibration table shipped in ``vectors/`` (default: the function vector's), if any."""
    path = _vectors_dir().joinpath(name)
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
