"""`SafeInferLLM`: a LlamaIndex function-calling LLM over the shared SafeInfer engine.

Chat is the one generation path: the completion methods render the prompt (one user turn under
``system_prompt``, or raw text with ``formatted=True``) and reuse it, converting the responses with
LlamaIndex's own ``chat_response_to_completion_response`` helpers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from llama_index.core.base.llms.generic_utils import (
    astream_chat_response_to_completion_response,
    chat_response_to_completion_response,
    stream_chat_response_to_completion_response,
)
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

from .. import AsyncGenerationStream, SafeInferEngine, SamplingSettings
from ..errors import InvalidInputError, InvalidSettingError, InvalidTypeError
from ..runtime.engine_cache import get_engine
from ..runtime.settings import SafeInferSettings, call_settings
from ..runtime.tools import forced_call_format, needs_tool_prompt, parse_tool_calls, with_tool_prompt
from ._convert import chat_response, normalize_tool_choice, to_engine_messages, to_tool_schemas

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


async def _alookahead(pieces: AsyncIterator[_T]) -> AsyncIterator[tuple[_T, bool]]:
    done = object()
    previous: Any = await anext(pieces, done)
    while previous is not done:
        current: Any = await anext(pieces, done)
        yield previous, current is done
        previous = current


class SafeInferLLM(SafeInferSettings, FunctionCallingLLM):
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
            As in ``SafeInferEngine.from_pretrained``. Engines are shared through ``runtime.engine_cache``, so
            building many instances loads the weights once.
        engine: SafeInferEngine | None
            Use this engine instead of loading one.

    Key init args — generation and safety (the same fields as LangChain's ``ChatSafeInfer``, from
    ``runtime.settings.SafeInferSettings``; None = the engine's default; each also accepted per call as a
    keyword of complete/chat):
        temperature (0 = greedy, the default), max_tokens (256), top_p, top_k, seed, stop (multi-token
        strings; the text is cut before them); mode ("vanilla" | "sa" | "sgds" | "safeinfer"), alpha,
        plausibility, unsafe_expert, unsafe_system_prompt, scale, layer, gate, gate_cutoff. See
        ``SamplingSettings`` and ``SafeInferConfig``.

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
    engine: Any = Field(default=None, exclude=True, description="A SafeInferEngine to use instead of loading.")

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
                raise InvalidTypeError(f"engine must be a SafeInferEngine; got {type(self.engine).__name__}")
            given = [name for name in _LOAD_FIELDS if getattr(self, name) is not None]
            if given:
                raise InvalidSettingError(f"give either engine or loading arguments, not both (got engine and {given})")
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
        self.check_settings(engine)  # fail now, not on the first call
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
            num_output=self.max_tokens or SamplingSettings().max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self._engine.model_name,
            system_role=MessageRole.SYSTEM,
        )

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` with the model's own tokenizer (offline); usable as
        ``TokenCountingHandler(tokenizer=llm.tokenize)``."""
        return self._engine.encode_text(text)

    def _settings(self, overrides: dict[str, Any]) -> dict[str, Any]:
        return call_settings(
            self.engine_settings(), overrides, owner="SafeInferLLM", also_allowed=("tools", "tool_choice")
        )

    def _needs_tool_prompt(self) -> bool:
        if self._tool_prompt is None:
            self._tool_prompt = needs_tool_prompt(self._engine.formatter)
        return self._tool_prompt

    def _chat_call(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> _Call:
        kwargs = dict(kwargs)
        tools = to_tool_schemas(kwargs.pop("tools", None))
        names = [tool["function"]["name"] for tool in tools]
        choice = normalize_tool_choice(kwargs.pop("tool_choice", None), bool(kwargs.pop("tool_required", False)), names)
        prompt = to_engine_messages(messages)
        settings = self._settings(kwargs)
        if not tools or choice == "none":
            return _Call(prompt, None, settings, None)
        forced = forced_call_format(tools, choice)
        if forced is not None:  # a call the parser reads, with arguments valid under the tool's schema
            settings["response_format"] = forced
        if self._needs_tool_prompt():
            return _Call(with_tool_prompt(prompt, tools, tool_choice=choice), None, settings, names)
        return _Call(prompt, tools, settings, names)

    def _completion_call(self, prompt: str, formatted: bool, kwargs: dict[str, Any]) -> _Call:
        """``formatted=True`` (or a custom ``completion_to_prompt``): raw text completion. Otherwise the
        prompt is one user turn (after ``system_prompt``, if set) rendered with the chat template."""
        if not isinstance(prompt, str):
            raise InvalidTypeError(f"prompt must be a string; got {type(prompt).__name__}")
        settings = self._settings(kwargs)
        if formatted:
            return _Call(prompt, None, settings, None)
        custom = self.completion_to_prompt
        if custom is not None and custom is not default_completion_to_prompt:
            return _Call(custom(prompt), None, settings, None)
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return _Call([*messages, {"role": "user", "content": prompt}], None, settings, None)

    @property
    def _name(self) -> str:
        return self._engine.model_name

    # ------------------------------------------------------------------ the one generation path
    def _respond(self, call: _Call) -> ChatResponse:
        [generation] = self._engine.generate(call.prompt, tools=call.tools, **call.settings)
        return chat_response(generation, self._name, call.tool_names)

    async def _arespond(self, call: _Call) -> ChatResponse:
        [generation] = await self._engine.agenerate(call.prompt, tools=call.tools, **call.settings)
        return chat_response(generation, self._name, call.tool_names)

    def _respond_stream(self, call: _Call) -> ChatResponseGen:
        """A stream of chat responses: text so far and the new piece; the last carries the whole result.
        The stream starts (and bad input fails) here, before the generator is returned."""
        stream = self._engine.stream(call.prompt, tools=call.tools, **call.settings)

        def gen() -> ChatResponseGen:
            text = ""
            with stream:  # leaving early stops generation
                for piece, last in _lookahead(stream):
                    text += piece
                    if last:
                        yield chat_response(stream.generation, self._name, call.tool_names, delta=piece)  # type: ignore[arg-type]
                    else:
                        yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=piece)
                if not text:  # nothing generated: one final chunk carries the result
                    yield chat_response(stream.generation, self._name, call.tool_names, delta="")  # type: ignore[arg-type]

        return gen()

    async def _arespond_stream(self, call: _Call) -> ChatResponseAsyncGen:
        """`_respond_stream` with each step in a worker thread (the prompt is encoded there too)."""
        stream = await AsyncGenerationStream.open(
            lambda: self._engine.stream(call.prompt, tools=call.tools, **call.settings)
        )

        async def gen() -> ChatResponseAsyncGen:
            text = ""
            async with stream:  # leaving early stops generation
                async for piece, last in _alookahead(stream):
                    text += piece
                    if last:
                        yield chat_response(stream.generation, self._name, call.tool_names, delta=piece)  # type: ignore[arg-type]
                    else:
                        yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=piece)
                if not text:
                    yield chat_response(stream.generation, self._name, call.tool_names, delta="")  # type: ignore[arg-type]

        return gen()

    # ------------------------------------------------------------------ chat
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._respond(self._chat_call(messages, kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._respond_stream(self._chat_call(messages, kwargs))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await self._arespond(self._chat_call(messages, kwargs))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return await self._arespond_stream(self._chat_call(messages, kwargs))

    # ------------------------------------------------------------------ completion (built on chat)
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return chat_response_to_completion_response(self._respond(self._completion_call(prompt, formatted, kwargs)))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        call = self._completion_call(prompt, formatted, kwargs)
        return stream_chat_response_to_completion_response(self._respond_stream(call))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        call = self._completion_call(prompt, formatted, kwargs)
        return chat_response_to_completion_response(await self._arespond(call))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        call = self._completion_call(prompt, formatted, kwargs)
        return astream_chat_response_to_completion_response(await self._arespond_stream(call))

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
            blocks = [ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments) for c in parsed]
        if not blocks:
            if error_on_no_tool_call:
                raise InvalidInputError(
                    f"expected at least one tool call in the response; got {response.message.content!r:.200}"
                )
            return []
        selections = []
        for block in blocks:
            arguments = block.tool_kwargs if isinstance(block.tool_kwargs, dict) else {}
            selections.append(
                ToolSelection(tool_id=block.tool_call_id or "", tool_name=block.tool_name, tool_kwargs=arguments)
            )
        return selections
