"""`SafeInferLLM`: a LlamaIndex function-calling LLM over the shared SafeInfer engine."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection, default_completion_to_prompt

from ..config import CONFIG_FIELDS, SAMPLING_FIELDS, SamplingSettings
from ..engine import GenerationStream, SafeInferEngine
from ..generation import Generation
from ..registry import get_engine
from ..tools import needs_tool_prompt, parse_tool_calls, with_tool_prompt
from ._convert import (
    chat_response,
    completion_response,
    normalize_tool_choice,
    to_engine_messages,
    to_tool_schemas,
)

SAFETY_FIELDS: tuple[str, ...] = (
    "mode",
    "alpha",
    "plausibility",
    "unsafe_expert",
    "unsafe_system_prompt",
    "scale",
    "layer",
    "gate",
    "gate_cutoff",
)
_LOAD_FIELDS: tuple[str, ...] = ("model", "vector", "unsafe_model", "dtype", "device_map")
_T = TypeVar("_T")


@dataclass(frozen=True)
class _Call:
    """One validated request: the engine input, the tools for the template, settings, tools to parse."""

    prompt: str | list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    settings: dict[str, Any]
    tool_names: list[str] | None


def _lookahead(pieces: Iterator[_T]) -> Iterator[tuple[_T, bool]]:
    """Each item with a flag that is True on the last one (so the last chunk can carry the final result)."""
    done = object()
    previous: Any = next(pieces, done)
    while previous is not done:
        current: Any = next(pieces, done)
        yield previous, current is done
        previous = current


async def _apieces(stream: GenerationStream) -> AsyncIterator[str]:
    """The stream's pieces, each step computed in a worker thread; leaving early stops generation.

    Unlike ``engine.astream`` this keeps the ``GenerationStream`` so that its final ``Generation`` (usage,
    finish reason, safety telemetry) is readable once the pieces run out."""
    loop = asyncio.get_running_loop()
    done = object()
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            pending = loop.run_in_executor(None, next, stream, done)
            piece = await asyncio.shield(pending)
            pending = None
            if piece is done:
                return
            yield piece
    finally:
        if pending is not None and not pending.done():  # cancelled mid-step: let the step end, then stop
            await asyncio.wait([pending])
        stream.close()


async def _alookahead(pieces: AsyncIterator[str]) -> AsyncIterator[tuple[str, bool]]:
    done = object()
    previous: Any = await anext(pieces, done)
    while previous is not done:
        current: Any = await anext(pieces, done)
        yield previous, current is done
        previous = current


class SafeInferLLM(FunctionCallingLLM):
    """A local Hugging Face chat model with SafeInfer decoding-time safety, as a LlamaIndex LLM.

    Every query engine, chat engine and agent step that goes through this LLM is generated with SafeInfer
    (Safety Amplification and/or safety-guided decoding, per the engine's config or the fields below).

    Setup:
        .. code-block:: bash

            pip install "safeinfer-integrations[llamaindex]"
            safeinfer download        # converts the default model (SmolLM2-135M-Instruct) once

    Key init args — loading (ignored when ``engine`` is given):
        model: str | None
            Hub id or local directory of a causal LM; None = the default model with its shipped vector.
        vector, unsafe_model, dtype, device_map:
            As in ``SafeInferEngine.from_pretrained``. Engines are shared through ``registry.get_engine``, so
            building many instances loads the weights once.
        engine: SafeInferEngine | None
            Use this engine instead of loading one.

    Key init args — generation (each also accepted per call as a keyword of complete/chat):
        temperature: float = 0.0 (greedy); max_tokens: int = 256; top_p: float = 1.0; top_k: int = 0;
        seed: int | None; stop: list[str] | None (multi-token strings; the text is cut before them).

    Key init args — safety (None = the engine's config; also per call):
        mode ("vanilla" | "sa" | "sgds" | "safeinfer"), alpha, plausibility, unsafe_expert,
        unsafe_system_prompt, scale, layer, gate, gate_cutoff. See ``SafeInferConfig``.

    Instantiate:
        .. code-block:: python

            from llama_index.core import Settings
            from safeinfer_integrations.llama_index import SafeInferLLM

            Settings.llm = SafeInferLLM(max_tokens=128)            # default model and vector
            llm = SafeInferLLM(model="/path/to/model", mode="sgds", alpha=0.9)

    Invoke:
        .. code-block:: python

            from llama_index.core.llms import ChatMessage

            llm.chat([ChatMessage(role="user", content="Hello!")]).message.content
            llm.complete("Name three colours.").text           # rendered as one user turn
            llm.complete(raw_text, formatted=True).text       # raw text completion, no chat template
            llm.chat(messages, mode="vanilla", max_tokens=32) # per-call settings; the engine is never changed

    Stream:
        .. code-block:: python

            for chunk in llm.stream_chat(messages):
                print(chunk.delta, end="")

    Async:
        .. code-block:: python

            await llm.achat(messages)
            async for chunk in await llm.astream_complete("Hi"):
                ...

        Generation runs in worker threads: the event loop is never blocked.

    Tool calling:
        .. code-block:: python

            from llama_index.core.agent.workflow import FunctionAgent

            agent = FunctionAgent(tools=[multiply], llm=llm)
            await agent.run("What is 6 times 7?")

        Tools go through the chat template when it renders them; otherwise (SmolLM2) they are described in
        the system message and calls written as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
        are parsed back into ``ToolCallBlock``s (``get_tool_calls_from_response``).

    Response metadata:
        ``response.raw`` = ``{"model", "text", "finish_reason" ("stop" | "length" | "stop_sequence"),
        "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}, "safety": {...telemetry}}``;
        ``TokenCountingHandler`` reads the usage from it. In streams, the last chunk carries it.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    model: str | None = Field(default=None, description="Hub id or local path; None = the default model.")
    vector: str | None = Field(default=None, description="Safety vector file; None = the shipped one.")
    unsafe_model: str | None = Field(default=None, description="A separate unsafe expert model (same vocab).")
    dtype: str | None = Field(default=None, description="torch dtype name for loading, e.g. 'bfloat16'.")
    device_map: Any = Field(default=None, description="Passed to from_pretrained.")
    engine: Any = Field(
        default=None, exclude=True, description="A SafeInferEngine to use instead of loading."
    )

    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy.")
    max_tokens: int = Field(default=256, ge=1, description="Most tokens generated per call.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="0 = off.")
    seed: int | None = Field(default=None, description="Seed for sampling (temperature > 0).")
    stop: list[str] | None = Field(default=None, description="Stop strings (may span several tokens).")

    mode: Literal["vanilla", "sa", "sgds", "safeinfer"] | None = None
    alpha: float | None = None
    plausibility: float | None = None
    unsafe_expert: Literal["model", "prompted", "negated_vector"] | None = None
    unsafe_system_prompt: str | None = None
    scale: float | None = None
    layer: int | None = None
    gate: bool | None = None
    gate_cutoff: float | None = None

    _engine: SafeInferEngine = PrivateAttr()
    _tool_prompt: bool | None = PrivateAttr(default=None)

    @field_validator("model", "vector", "unsafe_model", mode="before")
    @classmethod
    def _paths_as_str(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @model_validator(mode="after")
    def _load_engine(self) -> SafeInferLLM:
        if self.engine is not None:
            if not isinstance(self.engine, SafeInferEngine):
                raise TypeError(f"engine must be a SafeInferEngine; got {type(self.engine).__name__}")
            given = [name for name in _LOAD_FIELDS if getattr(self, name) is not None]
            if given:
                raise ValueError(
                    f"give either engine or loading arguments, not both (got engine and {given})"
                )
            engine = self.engine
        else:
            engine = get_engine(
                self.model,
                vector=self.vector,
                unsafe_model=self.unsafe_model,
                dtype=self.dtype,
                device_map=self.device_map,
            )
        self._engine = engine
        # Fail now, not on the first call: sampling and safety fields validated together, as a call would.
        defaults = self._default_settings()
        SamplingSettings(**{k: v for k, v in defaults.items() if k in SAMPLING_FIELDS})
        engine.resolve_config({k: v for k, v in defaults.items() if k in CONFIG_FIELDS})
        return self

    @classmethod
    def class_name(cls) -> str:
        return "SafeInferLLM"

    # ------------------------------------------------------------------ metadata and helpers
    @property
    def safeinfer_engine(self) -> SafeInferEngine:
        """The (shared) engine this LLM generates with."""
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self._engine.context_window or DEFAULT_CONTEXT_WINDOW,
            num_output=self.max_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self._engine.model_name,
            system_role=MessageRole.SYSTEM,
        )

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` with the model's own tokenizer (offline); usable as
        ``TokenCountingHandler(tokenizer=llm.tokenize)``."""
        return self._engine.encode_text(text)

    def _default_settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "max_new_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": tuple(self.stop or ()),
        }
        for name in SAFETY_FIELDS:
            value = getattr(self, name)
            if value is not None:
                settings[name] = value
        return settings

    def _settings(self, overrides: dict[str, Any]) -> dict[str, Any]:
        call = dict(overrides)
        if "max_tokens" in call:
            if "max_new_tokens" in call:
                raise TypeError("give max_tokens or max_new_tokens, not both")
            call["max_new_tokens"] = call.pop("max_tokens")
        unknown = sorted(set(call) - SAMPLING_FIELDS - CONFIG_FIELDS)
        if unknown:
            allowed = ", ".join(
                sorted({"max_tokens", "tools", "tool_choice", *SAMPLING_FIELDS, *CONFIG_FIELDS})
            )
            raise TypeError(
                f"SafeInferLLM got unknown keyword argument(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {allowed}"
            )
        return {**self._default_settings(), **call}

    def _needs_tool_prompt(self) -> bool:
        if self._tool_prompt is None:
            self._tool_prompt = needs_tool_prompt(self._engine.formatter)
        return self._tool_prompt

    def _chat_call(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> _Call:
        kwargs = dict(kwargs)
        tools = to_tool_schemas(kwargs.pop("tools", None))
        names = [tool["function"]["name"] for tool in tools]
        choice = normalize_tool_choice(
            kwargs.pop("tool_choice", None), bool(kwargs.pop("tool_required", False)), names
        )
        prompt = to_engine_messages(messages)
        settings = self._settings(kwargs)
        if not tools or choice == "none":
            return _Call(prompt, None, settings, None)
        if self._needs_tool_prompt():
            return _Call(with_tool_prompt(prompt, tools, tool_choice=choice), None, settings, names)
        return _Call(prompt, tools, settings, names)

    def _completion_call(self, prompt: str, formatted: bool, kwargs: dict[str, Any]) -> _Call:
        """``formatted=True`` (or a custom ``completion_to_prompt``): raw text completion. Otherwise the
        prompt is one user turn (after ``system_prompt``, if set) rendered with the chat template."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string; got {type(prompt).__name__}")
        settings = self._settings(kwargs)
        if formatted:
            return _Call(prompt, None, settings, None)
        custom = self.completion_to_prompt
        if custom is not None and custom is not default_completion_to_prompt:
            return _Call(custom(prompt), None, settings, None)
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return _Call([*messages, {"role": "user", "content": prompt}], None, settings, None)

    def _generate(self, call: _Call) -> Generation:
        return self._engine.generate(call.prompt, tools=call.tools, **call.settings)[0]

    async def _agenerate(self, call: _Call) -> Generation:
        return (await self._engine.agenerate(call.prompt, tools=call.tools, **call.settings))[0]

    def _stream(self, call: _Call) -> GenerationStream:
        return self._engine.stream(call.prompt, tools=call.tools, **call.settings)

    @property
    def _name(self) -> str:
        return self._engine.model_name

    # ------------------------------------------------------------------ completion
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return completion_response(
            self._generate(self._completion_call(prompt, formatted, kwargs)), self._name
        )

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        stream = self._stream(self._completion_call(prompt, formatted, kwargs))  # bad input fails here

        def gen() -> CompletionResponseGen:
            text = ""
            with stream:
                for piece, last in _lookahead(stream):
                    text += piece
                    if last:
                        yield completion_response(stream.generation, self._name, delta=piece)  # type: ignore[arg-type]
                    else:
                        yield CompletionResponse(text=text, delta=piece)
                if not text:  # nothing generated: one final chunk carries the result
                    yield completion_response(stream.generation, self._name, delta="")  # type: ignore[arg-type]

        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        call = self._completion_call(prompt, formatted, kwargs)
        return completion_response(await self._agenerate(call), self._name)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        call = self._completion_call(prompt, formatted, kwargs)
        stream = await asyncio.to_thread(
            self._stream, call
        )  # encoding runs off the loop; bad input fails here

        async def gen() -> CompletionResponseAsyncGen:
            text = ""
            async for piece, last in _alookahead(_apieces(stream)):
                text += piece
                if last:
                    yield completion_response(stream.generation, self._name, delta=piece)  # type: ignore[arg-type]
                else:
                    yield CompletionResponse(text=text, delta=piece)
            if not text:
                yield completion_response(stream.generation, self._name, delta="")  # type: ignore[arg-type]

        return gen()

    # ------------------------------------------------------------------ chat
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = self._chat_call(messages, kwargs)
        return chat_response(self._generate(call), self._name, call.tool_names)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        call = self._chat_call(messages, kwargs)
        stream = self._stream(call)

        def gen() -> ChatResponseGen:
            text = ""
            with stream:
                for piece, last in _lookahead(stream):
                    text += piece
                    if last:
                        yield chat_response(stream.generation, self._name, call.tool_names, delta=piece)  # type: ignore[arg-type]
                    else:
                        yield ChatResponse(
                            message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=piece
                        )
                if not text:
                    yield chat_response(stream.generation, self._name, call.tool_names, delta="")  # type: ignore[arg-type]

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = self._chat_call(messages, kwargs)
        return chat_response(await self._agenerate(call), self._name, call.tool_names)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        call = self._chat_call(messages, kwargs)
        stream = await asyncio.to_thread(self._stream, call)

        async def gen() -> ChatResponseAsyncGen:
            text = ""
            async for piece, last in _alookahead(_apieces(stream)):
                text += piece
                if last:
                    yield chat_response(stream.generation, self._name, call.tool_names, delta=piece)  # type: ignore[arg-type]
                else:
                    yield ChatResponse(
                        message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=piece
                    )
            if not text:
                yield chat_response(stream.generation, self._name, call.tool_names, delta="")  # type: ignore[arg-type]

        return gen()

    # ------------------------------------------------------------------ tool calling
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[Any],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: Any = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg))
        elif user_msg is not None:
            messages.append(user_msg)
        return {
            "messages": messages,
            "tools": list(tools) or None,
            "tool_choice": tool_choice,
            "tool_required": tool_required,
            **kwargs,
        }

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[Any],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        """Without ``allow_parallel_tool_calls``, keep only the first tool call."""
        if not allow_parallel_tool_calls:
            calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
            for extra in calls[1:]:
                response.message.blocks.remove(extra)
        return response

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The tool calls of a response (parsed into ``ToolCallBlock``s when it was generated)."""
        blocks = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
        if not blocks and response.message.content and "<tool_call>" in response.message.content:
            # a message built elsewhere (e.g. a stream chunk) still holding the raw call text
            _, parsed = parse_tool_calls(response.message.content)
            blocks = [
                ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments) for c in parsed
            ]
        if not blocks:
            if error_on_no_tool_call:
                raise ValueError(
                    f"expected at least one tool call in the response; got {response.message.content!r:.200}"
                )
            return []
        selections = []
        for block in blocks:
            arguments = block.tool_kwargs if isinstance(block.tool_kwargs, dict) else {}
            selections.append(
                ToolSelection(
                    tool_id=block.tool_call_id or "", tool_name=block.tool_name, tool_kwargs=arguments
                )
            )
        return selections
