"""What LangChain messages carry besides text: usage, ``response_metadata`` (model, finish reason, SafeInfer's
safety telemetry) and the standard ``refusal`` content block for replies that open with a refusal."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from ..method.refusal import refusal_phrase
from ..runtime.engine import SafeInferEngine
from ..runtime.generation import Generation

PROVIDER = "safeinfer"


def usage_dict(generation: Generation) -> dict[str, int]:
    return {
        "input_tokens": generation.usage.prompt_tokens,
        "output_tokens": generation.usage.completion_tokens,
        "total_tokens": generation.usage.total_tokens,
    }


def response_metadata(
    engine: SafeInferEngine, generation: Generation, text: str, *, detect_refusals: bool
) -> dict[str, Any]:
    """``model_name``, ``finish_reason`` and the engine's safety telemetry (plus the refusal mark)."""
    metadata: dict[str, Any] = {
        "model_name": engine.model_name,
        "model_provider": PROVIDER,
        "finish_reason": generation.finish_reason,
        "safety": generation.safety.as_dict(),
    }
    if detect_refusals:
        phrase = refusal_phrase(text)
        if phrase is not None:
            metadata["refusal"] = {"phrase": phrase, "detector": "safeinfer_integrations.refusal"}
    return metadata


def refusal_block(message: Any) -> dict[str, Any] | None:
    """The standard ``refusal`` content block for a message marked as a refusal, else None."""
    mark = message.response_metadata.get("refusal")
    if not isinstance(mark, Mapping):
        return None
    text = message.content if isinstance(message.content, str) else getattr(message, "text", "")
    return {"type": "refusal", "refusal": str(text), "extras": dict(mark)}


_translator_lock = threading.Lock()
_translator_registered = False


def register_refusal_translator() -> None:
    """Teach ``AIMessage.content_blocks`` about our messages: core's own parsing plus the refusal block."""
    global _translator_registered
    with _translator_lock:
        if _translator_registered:
            return
        from langchain_core.messages.block_translators import register_translator

        def translate(message: Any) -> list[Any]:
            metadata = {k: v for k, v in message.response_metadata.items() if k != "model_provider"}
            blocks = list(message.model_copy(update={"response_metadata": metadata}).content_blocks)
            block = refusal_block(message)
            if block is not None and not any(b.get("type") == "refusal" for b in blocks):
                blocks.append(block)
            return blocks

        register_translator(PROVIDER, translate, translate)
        _translator_registered = True
