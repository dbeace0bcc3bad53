"""`SafeInferLLM`: a LangChain completion LLM (string in, string out) with SafeInfer applied."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.language_models.base import LangSmithParams
from langchain_core.outputs import Generation as LCGeneration
from langchain_core.outputs import GenerationChunk, LLMResult
from pydantic import ConfigDict

from .. import AsyncGenerationStream, Generation, SafeInferEngine
from ..errors import UnknownSettingError
from ._metadata import PROVIDER, usage_dict
from ._metadata import response_metadata as _metadata
from ._params import SafeInferParams


class SafeInferLLM(SafeInferParams, BaseLLM):
    """A local Hugging Face causal LM with SafeInfer applied, as a LangChain completion LLM: the prompt
    string is fed as is (no chat template), and the reply is the generated text only (never the prompt).

    Setup:
        ```bash
        pip install "safeinfer-integrations[langchain]"
        safeinfer download
        ```

    Key init args:
        The same as ``ChatSafeInfer``: ``model`` (alias of ``model_name``) or ``engine``, ``temperature``,
        ``max_tokens``, ``top_p``, ``top_k``, ``seed``, ``stop``, ``streaming``, and the safety settings
        ``mode``, ``alpha``, ``plausibility``, ``gate``, ``gate_cutoff``, ``unsafe_expert``, ``scale`` (None follows the
        engine's config).

    Instantiate:
        ```python
        from safeinfer_integrations.langchain import SafeInferLLM

        llm = SafeInferLLM(max_tokens=32)
        ```

    Invoke:
        ```python
        llm.invoke("The capital of France is")
        llm.invoke("Q: two plus two?\\nA:", stop=["\\n"], mode="sgds")  # per-call overrides
        llm.batch(["Once upon a time", "The sky is"])                 # one batched generation
        ```

        Stop rule (as for the chat model): the text is cut just before the first stop string, which may
        span several tokens, and ``generation_info["finish_reason"]`` is ``"stop_sequence"``.

    Stream:
        ```python
        for piece in llm.stream("Once upon a time"):
            print(piece, end="")
        ```

        Callbacks get ``on_llm_new_token`` for every piece; leaving the loop stops generation.

    Async:
        ```python
        await llm.ainvoke("Once upon a time")
        async for piece in llm.astream("Once upon a time"):
            ...
        ```

    Tool calling:
        Not for completion models: use ``ChatSafeInfer.bind_tools``.

    Response metadata:
        Each generation's ``generation_info`` holds ``finish_reason``, ``model_name``, ``usage`` and the
        ``safety`` telemetry (and ``refusal`` when the text opens with a refusal); ``llm_output`` holds
        ``model_name`` and the summed ``token_usage``.
    """

    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=()
    )

    @property
    def _llm_type(self) -> str:
        return "safeinfer"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._params_for_tracing()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        model = kwargs.get("model")
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_type="llm",
            ls_model_name=model if isinstance(model, str) else self.resolved_model_name,
            ls_temperature=kwargs.get("temperature", self.temperature if self.temperature is not None else 0.0),
        )
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stops = stop or kwargs.get("stop") or self.stop
        if isinstance(stops, (list, tuple)) and stops:  # anything else is refused by the call's own checks
            params["ls_stop"] = list(stops)
        return params

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` with the model's own tokenizer (offline; no special tokens added)."""
        tokenizer = self._resolve_engine(None).tokenizer
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ helpers
    def _settings(self, stop: list[str] | None, kwargs: dict[str, Any]) -> tuple[SafeInferEngine, dict[str, Any]]:
        for key in ("tools", "tool_choice", "response_format"):
            if key in kwargs:
                raise UnknownSettingError(f"SafeInferLLM is a completion model and takes no {key!r}; use ChatSafeInfer")
        return self._call_settings(stop, kwargs)

    def _info(self, engine: SafeInferEngine, generation: Generation) -> dict[str, Any]:
        return {
            **_metadata(engine, generation, generation.text, detect_refusals=self.detect_refusals),
            "usage": usage_dict(generation),
        }

    def _result(self, engine: SafeInferEngine, generations: list[Generation]) -> LLMResult:
        total = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        for generation in generations:
            for key, value in usage_dict(generation).items():
                total[key] += value
        return LLMResult(
            generations=[[LCGeneration(text=g.text, generation_info=self._info(engine, g))] for g in generations],
            llm_output={"model_name": engine.model_name, "token_usage": total},
        )

    # ------------------------------------------------------------------ generation
    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """All prompts run as one batched generation (with ``streaming``, one prompt streams)."""
        engine, settings = self._settings(stop, kwargs)
        if self.streaming and len(prompts) == 1:
            final: GenerationChunk | None = None
            for chunk in self._stream(prompts[0], stop=stop, run_manager=run_manager, **kwargs):
                final = chunk if final is None else final + chunk
            assert final is not None  # noqa: S101 (the stream always ends with a final chunk)
            return LLMResult(
                generations=[[LCGeneration(text=final.text, generation_info=final.generation_info)]],
                llm_output={"model_name": engine.model_name},
            )
        return self._result(engine, engine.generate(prompts, **settings))

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        engine, settings = self._settings(stop, kwargs)
        if self.streaming and len(prompts) == 1:
            final: GenerationChunk | None = None
            async for chunk in self._astream(prompts[0], stop=stop, run_manager=run_manager, **kwargs):
                final = chunk if final is None else final + chunk
            assert final is not None  # noqa: S101
            return LLMResult(
                generations=[[LCGeneration(text=final.text, generation_info=final.generation_info)]],
                llm_output={"model_name": engine.model_name},
            )
        return self._result(engine, await engine.agenerate(prompts, **settings))

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        engine, settings = self._settings(stop, kwargs)
        stream = engine.stream(prompt, **settings)
        with closing(stream):  # the consumer stopped reading: generation stops at once
            for piece in stream:
                chunk = GenerationChunk(text=piece)
                if run_manager is not None:
                    run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
        assert stream.generation is not None  # noqa: S101
        yield GenerationChunk(text="", generation_info=self._info(engine, stream.generation))

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        engine, settings = self._settings(stop, kwargs)
        stream = await AsyncGenerationStream.open(lambda: engine.stream(prompt, **settings))
        async with stream:  # closing (the consumer stopped reading) stops generation
            async for piece in stream:
                chunk = GenerationChunk(text=piece)
                if run_manager is not None:
                    await run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
        assert stream.generation is not None  # noqa: S101
        yield GenerationChunk(text="", generation_info=self._info(engine, stream.generation))
