"""What a generation returns: text, tokens, why it ended, usage, and safety telemetry."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

FinishReason = Literal["stop", "length", "stop_sequence", "timeout", "cancelled"]
"""Why a generation ended: an end-of-sequence token (or a finished refusal), ``max_new_tokens`` or the context
window, a stop string, the call's ``timeout``, or the caller (a cancelled async call, a stream closed early)."""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class SafetyTelemetry:
    """What SafeInfer did to one generation.

    ``guided_changes`` counts the steps where safety-guided decoding picked another token than the steered
    model alone would have (greedy: its argmax; sampling: its draw under the same random number).
    ``gate_weight`` is the harm gate's weight for this request (None when no gate was used).
    ``refusal_opened``: the answer was held to open with a refusal (the gate weight was above ``refuse_above``)."""

    mode: str
    alpha: float
    plausibility: float
    unsafe_expert: str | None
    vector_id: str | None
    layer: int | None
    scale: float | None
    gate_weight: float | None
    refusal_opened: bool
    guided_changes: int
    steps: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    safety: SafetyTelemetry

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "usage": {**asdict(self.usage), "total_tokens": self.usage.total_tokens},
            "safety": self.safety.as_dict(),
        }
