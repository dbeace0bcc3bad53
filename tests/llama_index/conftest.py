"""Fixtures for the LlamaIndex adapter: a real engine over a tiny random model, and a scripted engine whose
generations are fixed texts (for tool-call parsing and agents); both use the tiny tokenizer's template."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Settings  # noqa: E402

from safeinfer_integrations import SafeInferEngine  # noqa: E402
from safeinfer_integrations.runtime.config import split_settings  # noqa: E402
from safeinfer_integrations.runtime.engine import GenerationStream  # noqa: E402
from safeinfer_integrations.runtime.generation import Generation, SafetyTelemetry, Usage  # noqa: E402


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_factory: Any, tiny_tokenizer: Any) -> SafeInferEngine:
    return SafeInferEngine(tiny_model_factory("llama"), tiny_tokenizer, model_name="tiny-llama")


class ScriptedEngine(SafeInferEngine):
    """A real engine (tokenizer, chat template, settings validation, token counts) whose outputs are the
    scripted texts, in order. Records every call's prompt, tools and settings; streams record how many
    pieces were produced and whether they were closed."""

    def __init__(self, model: Any, tokenizer: Any, replies: Sequence[str]) -> None:
        super().__init__(model, tokenizer, model_name="scripted")
        self.replies = list(replies)
        self.calls: list[dict[str, Any]] = []
        self.produced = 0
        self.closed = False

    def _next(self, prompt: Any, tools: Any, settings: Mapping[str, Any]) -> Generation:
        _, config_kwargs = split_settings(settings)  # unknown names raise TypeError, like the real engine
        config = self.resolve_config(config_kwargs)
        self.calls.append({"prompt": prompt, "tools": tools, "settings": dict(settings)})
        if not self.replies:
            raise AssertionError("the scripted engine ran out of replies")
        text = self.replies.pop(0)
        ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        safety = SafetyTelemetry(
            mode=config.mode,
            alpha=config.alpha,
            plausibility=config.plausibility,
            unsafe_expert=None,
            vector_id=None,
            layer=None,
            scale=None,
            gate_weight=None,
            refusal_opened=False,
            guided_changes=0,
            steps=len(ids),
        )
        usage = Usage(prompt_tokens=self.count_tokens(prompt, tools), completion_tokens=len(ids))
        return Generation(text=text, token_ids=ids, finish_reason="stop", usage=usage, safety=safety)

    def _generate(self, inputs: Any, tools: Any, settings: Mapping[str, Any], cancel: Any) -> list[Generation]:
        return [self._next(inputs, tools, settings)]  # what generate and agenerate run

    def stream(self, prompt: Any, *, tools: Any = None, **settings: Any) -> GenerationStream:
        generation = self._next(prompt, tools, settings)
        words = generation.text.split(" ")
        pieces = [w if i == 0 else f" {w}" for i, w in enumerate(words)]
        self.produced, self.closed = 0, False

        def events() -> Iterator[tuple[int, str]]:
            try:
                for piece in pieces:
                    self.produced += 1
                    yield 0, piece
            finally:
                self.closed = True

        return GenerationStream(events(), lambda: generation)


@pytest.fixture
def scripted(tiny_model_factory: Any, tiny_tokenizer: Any) -> Any:
    """``scripted(["reply 1", "reply 2"])`` -> a fresh ScriptedEngine."""
    return lambda replies: ScriptedEngine(tiny_model_factory("llama"), tiny_tokenizer, replies)


@pytest.fixture(autouse=True)
def _local_settings() -> Iterator[None]:
    """LlamaIndex's defaults are OpenAI's (not installed here, so touching them fails): tests set
    ``Settings.llm`` / ``Settings.embed_model`` explicitly, and they are restored after each test."""
    saved_llm, saved_embed = Settings._llm, Settings._embed_model
    yield
    Settings._llm, Settings._embed_model = saved_llm, saved_embed
