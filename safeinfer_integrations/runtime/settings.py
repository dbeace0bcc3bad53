"""The one schema of per-call settings that the LangChain and LlamaIndex classes (and the command line) share:
same names, same defaults, same documentation.

Every field defaults to None, which means "the engine's default" (`SamplingSettings` and `SafeInferConfig`
hold the real defaults and validate the values). ``max_tokens`` is the frameworks' name for the engine's
``max_new_tokens``; either is accepted per call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidSettingError, UnknownSettingError
from .config import CONFIG_FIELDS, REFUSE_ABOVE, SAMPLING_FIELDS, parse_settings

ALIASES: dict[str, str] = {"max_tokens": "max_new_tokens"}
"""Framework names of engine settings."""


class SafeInferSettings(BaseModel):
    """Generation and safety settings of an adapter; None follows the engine's default (see `SamplingSettings`
    and `SafeInferConfig` for the values and their ranges)."""

    model_config = ConfigDict(protected_namespaces=())

    # ------------------------------------------------------------------ generation
    temperature: float | None = Field(
        default=None, strict=True, description="Sampling temperature; 0 (the default) is greedy."
    )
    max_tokens: int | None = Field(
        default=None, strict=True, ge=1, description="Most tokens to generate (default 256)."
    )
    top_p: float | None = Field(
        default=None, strict=True, description="Nucleus sampling threshold in (0, 1] (default 1: off)."
    )
    top_k: int | None = Field(
        default=None, strict=True, description="Sample among the k likeliest tokens (default 0: off)."
    )
    seed: int | None = Field(
        default=None, strict=True, description="Seed for sampling; None draws a fresh one per call."
    )
    stop: list[str] | None = Field(
        default=None, description="Stop strings; they may span several tokens (the text is cut before the first)."
    )
    timeout: float | None = Field(
        default=None,
        strict=True,
        description="Seconds after which generation ends with finish reason 'timeout' (default: no limit).",
    )

    # ------------------------------------------------------------------ safety
    mode: str | None = Field(default=None, description="vanilla | sa | sgds | safeinfer (default safeinfer).")
    alpha: float | None = Field(default=None, strict=True, description="Guidance strength in [0, 1) (default 0.99).")
    plausibility: float | None = Field(
        default=None,
        strict=True,
        description="Plausibility threshold tau in [0, 1); 0 is the paper's rule (default 0.1).",
    )
    unsafe_expert: str | None = Field(default=None, description="model | prompted | negated_vector (default prompted).")
    unsafe_system_prompt: str | None = Field(
        default=None, description="The system prompt of the prompted unsafe expert."
    )
    scale: float | None = Field(default=None, strict=True, description="Override of the safety vector's scale.")
    layer: int | None = Field(default=None, strict=True, description="Override of the safety vector's layer.")
    gate: bool | None = Field(
        default=None,
        strict=True,
        description="Whether the vector's harm gate scales SafeInfer per request (default True).",
    )
    gate_question: bool | None = Field(
        default=None,
        strict=True,
        description="The gate also weighs the last user message, and its last line, on their own and takes the "
        "largest weight (default True).",
    )
    gate_cutoff: float | None = Field(
        default=None,
        strict=True,
        description="Requests the gate weighs below this are decoded as vanilla, in [0, 1) (default 0.1).",
    )
    refusal_stop: bool | None = Field(
        default=None,
        strict=True,
        description="End a protected answer at the end of its first sentence once it opens with a refusal.",
    )
    refuse_above: float | None = Field(
        default=None,
        strict=True,
        description=f"A request the gate weighs above this opens its answer with a refusal, in [0, 1]; 1 = off "
        f"(default {REFUSE_ABOVE}).",
    )

    def engine_settings(self) -> dict[str, Any]:
        """The set fields as engine keyword settings (``max_tokens`` becomes ``max_new_tokens``)."""
        values = {name: getattr(self, name) for name in SETTING_FIELDS}
        return {ALIASES.get(name, name): value for name, value in values.items() if value is not None}

    def check_settings(self, engine: Any = None) -> None:
        """Validate the set fields together, as a call would, with the engine's messages (so a bad value fails
        at construction, not on the first call). With ``engine``, its config is the base."""
        parse_settings(self.engine_settings(), engine.config if engine is not None else None)


SETTING_FIELDS: tuple[str, ...] = tuple(SafeInferSettings.model_fields)
SAFETY_FIELDS: tuple[str, ...] = tuple(name for name in SETTING_FIELDS if name in CONFIG_FIELDS)
CALL_SETTINGS: frozenset[str] = frozenset(SETTING_FIELDS) | SAMPLING_FIELDS | CONFIG_FIELDS
"""Names a call may override (``invoke(..., **kwargs)``, ``.bind(...)``, ``chat(..., **kwargs)``)."""


def call_settings(
    base: Mapping[str, Any], overrides: Mapping[str, Any], *, owner: str, also_allowed: Iterable[str] = ()
) -> dict[str, Any]:
    """``base`` engine settings updated by one call's keyword ``overrides`` (framework names accepted; None
    values keep the base). An unknown name raises `UnknownSettingError` naming what is allowed."""
    unknown = sorted(set(overrides) - CALL_SETTINGS)
    if unknown:
        allowed = ", ".join(sorted(CALL_SETTINGS | set(also_allowed)))
        raise UnknownSettingError(
            f"unknown argument(s) {', '.join(map(repr, unknown))} for {owner}; per-call settings are: {allowed}"
        )
    given = [name for name in overrides if name in ALIASES and ALIASES[name] in overrides]
    if given:
        raise InvalidSettingError(f"give {given[0]} or {ALIASES[given[0]]}, not both")
    settings = dict(base)
    for key, value in overrides.items():
        if value is not None:
            settings[ALIASES.get(key, key)] = value
    return settings
