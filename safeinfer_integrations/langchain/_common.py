"""What ChatSafeInfer and SafeInferLLM share: their fields, how per-call settings are resolved, the
tool-call splitter used by invoke and stream alike, the batch collector, and the refusal signal."""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import CONFIG_FIELDS, SafeInferConfig, SamplingSettings
from ..engine import SafeInferEngine
from ..generation import Generation
from ..refusal import refusal_phrase
from ..registry import get_engine
from ..tools import ParsedToolCall, parse_tool_calls

PROVIDER = "safeinfer"

# LangChain's names for the sampling settings, mapped to the engine's.
_SAMPLING_ALIASES = {"max_tokens": "max_new_tokens", "max_new_tokens": "max_new_tokens", "temperature": "temperature",
                     "top_p": "top_p", "top_k": "top_k", "seed": "seed", "stop": "stop"}
CALL_SETTINGS: frozenset[str] = frozenset(_SAMPLING_ALIASES) | CONFIG_FIELDS
"""Settings a call may override through ``invoke(..., **kwargs)`` or ``.bind(...)``."""

# Keyword arguments LangChain itself passes down to the model methods; never generation settings.
_FRAMEWORK_KWARGS = frozenset({"ls_structured_output_format", "structured_output_format", "stream"})


class SafeInferParams(BaseModel):
    """Fields shared by the chat model and the LLM (see the classes' docstrings)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, arbitrary_types_allowed=True,
                              protected_namespaces=())

    model_name: str | None = Field(default=None, alias="model")
    """Hub id or local directory of the model; None: the default model (SmolLM2-135M-Instruct)."""
    engine: SafeInferEngine | None = Field(default=None, exclude=True)
    """An existing engine to use instead of loading ``model_name``."""
    vector: str | None = None
    """Path of a safety vector (None: the default model's shipped vector, if any)."""
    unsafe_model: str | None = None
    """Hub id or directory of a separate unsafe expert model (``unsafe_expert="model"``)."""
    dtype: str | None = None
    """Torch dtype name to load the model in (None: float32 on CPU, the checkpoint's dtype elsewhere)."""
    device_map: str | None = None
    """Passed to transformers when loading (e.g. ``"auto"``, ``"cuda:0"``)."""

    temperature: float | None = None
    """Sampling temperature; 0 (the engine's default) is greedy."""
    max_tokens: int | None = None
    """Most tokens to generate (None: the engine's default, 256)."""
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    """Seed for sampling (temperature > 0); None draws a fresh one per call."""
    stop: list[str] | None = None
    """Stop strings; they may span several tokens (the text is cut before the first one)."""
    streaming: bool = False
    """Whether ``invoke`` streams internally (so callbacks see each token)."""

    mode: str | None = None
    """SafeInfer mode: vanilla | sa | sgds | safeinfer. None follows the engine's config."""
    alpha: float | None = None
    """Guidance strength in [0, 1). None follows the engine's config."""
    plausibility: float | None = None
    """Plausibility threshold tau in [0, 1). None follows the engine's config."""
    gate: bool | None = None
    """Whether the vector's harm gate scales SafeInfer per request. None follows the engine's config."""
    gate_cutoff: float | None = None
    """Requests the gate weighs below this are decoded as vanilla, in [0, 1). None follows the engine's config."""
    unsafe_expert: str | None = None
    """model | prompted | negated_vector. None follows the engine's config."""
    scale: float | None = None
    """Override of the safety vector's scale. None keeps the vector's."""

    detect_refusals: bool = True
    """Mark refusals with LangChain's standard ``refusal`` content block (see the refusal section)."""

    @model_validator(mode="after")
    def _validate_settings(self) -> SafeInferParams:
        # Fail at construction, with the engine's own messages, on out-of-range values.
        SamplingSettings(**_sampling_part(self._field_settings()))
        SafeInferConfig(**_config_part(self._field_settings()))
        if self.engine is not None and not isinstance(self.engine, SafeInferEngine):
            raise TypeError(f"engine must be a SafeInferEngine; got {type(self.engine).__name__}")
        self._resolve_engine(None)  # load (or fetch the shared) engine now, so a bad model fails here
        return self

    # ------------------------------------------------------------------ engines and settings
    def _resolve_engine(self, model: str | None) -> SafeInferEngine:
        """The engine for this call: the given one, or the shared engine of ``model`` (or ``model_name``)."""
        if model is not None and model != self.model_name and not (
            self.engine is not None and model == self.engine.model_name
        ):
            return get_engine(model, dtype=self.dtype, device_map=self.device_map)
        if self.engine is not None:
            return self.engine
        return get_engine(self.model_name, vector=self.vector, unsafe_model=self.unsafe_model, dtype=self.dtype,
                          device_map=self.device_map)

    def _params_for_tracing(self) -> dict[str, Any]:
        """The set fields under their own names (what ``_identifying_params`` and traces show)."""
        names = ("temperature", "max_tokens", "top_p", "top_k", "seed", "stop", "mode", "alpha", "plausibility",
                 "gate", "gate_cutoff", "unsafe_expert", "scale")
        values = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        return {"model_name": self.resolved_model_name, **values}

    @property
    def resolved_model_name(self) -> str:
        """The loaded model's name (what ``response_metadata["model_name"]`` reports)."""
        return self._resolve_engine(None).model_name

    def _field_settings(self) -> dict[str, Any]:
        values = {
            "max_new_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "seed": self.seed, "stop": self.stop, "mode": self.mode, "alpha": self.alpha,
            "plausibility": self.plausibility, "gate": self.gate, "gate_cutoff": self.gate_cutoff,
            "unsafe_expert": self.unsafe_expert, "scale": self.scale,
        }
        return {key: value for key, value in values.items() if value is not None}

    def _call_settings(self, stop: Sequence[str] | None,
                       kwargs: Mapping[str, Any]) -> tuple[SafeInferEngine, dict[str, Any]]:
        """(engine, engine settings) for one call: the fields, then the call's kwargs, then ``stop``.

        Unknown keyword arguments raise ``TypeError`` naming what is allowed."""
        settings = self._field_settings()
        unknown = sorted(set(kwargs) - CALL_SETTINGS - _FRAMEWORK_KWARGS - {"model", "tools", "tool_choice",
                                                                            "response_format"})
        if unknown:
            raise TypeError(
                f"unknown argument(s) {', '.join(map(repr, unknown))} for {type(self).__name__}; per-call settings "
                f"are: model, {', '.join(sorted(CALL_SETTINGS))}"
            )
        for key, value in kwargs.items():
            if key in _SAMPLING_ALIASES:
                if value is not None:
                    settings[_SAMPLING_ALIASES[key]] = value
            elif key in CONFIG_FIELDS and value is not None:
                settings[key] = value
        if stop is not None:
            settings["stop"] = list(stop)
        if not settings.get("stop"):
            settings.pop("stop", None)
        model = kwargs.get("model")
        if model is not None and not isinstance(model, str):
            raise TypeError(f"model must be a model id or path (str); got {type(model).__name__}")
        return self._resolve_engine(model), settings


def _sampling_part(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k in SamplingSettings.model_fields}


def _config_part(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k in CONFIG_FIELDS}


# ---------------------------------------------------------------------------------------------- metadata
def usage_dict(generation: Generation) -> dict[str, int]:
    return {"input_tokens": generation.usage.prompt_tokens, "output_tokens": generation.usage.completion_tokens,
            "total_tokens": generation.usage.total_tokens}


def response_metadata(engine: SafeInferEngine, generation: Generation, text: str, *,
                      detect_refusals: bool) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------------------------- tool calls
_TRIGGERS = "<{[`"


@dataclass
class ToolSplitter:
    """Splits generated text into content and tool calls, the same way for invoke and stream.

    The rule: the text up to the first ``<``, ``{``, ``[`` or backtick (where a tool call could start) is
    content as is, except trailing whitespace when calls follow; the rest is read by
    ``tools.parse_tool_calls`` (calls removed, what remains appended). While streaming, text before that
    point is handed out as it comes; after it, text is held until generation ends. With no tools bound,
    everything is content."""

    tool_names: frozenset[str] | None  # None: no tools bound
    text: str = ""
    emitted: int = 0
    cut: int | None = None  # index of the first trigger character, once seen
    content: str = ""  # the whole content, once finished

    def push(self, piece: str) -> str:
        """Add a piece of generated text; return the content that is decided now."""
        self.text += piece
        if self.tool_names is None:
            return self._emit(len(self.text))
        if self.cut is None:
            hits = [i for i in (self.text.find(c, self.emitted) for c in _TRIGGERS) if i >= 0]
            if hits:
                self.cut = min(hits)
        head = self.text if self.cut is None else self.text[: self.cut]
        return self._emit(len(head.rstrip()))

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        """Generation ended: (the rest of the content, the tool calls). ``content`` then holds it all."""
        calls: list[ParsedToolCall] = []
        if self.tool_names is not None and self.cut is not None:
            head, tail = self.text[: self.cut], self.text[self.cut :]
            rest, calls = parse_tool_calls(tail, tool_names=self.tool_names)
        if not calls:
            self.content = self.text
            return self._emit(len(self.text)), []
        self.content = head.rstrip() + (("\n" if head.strip() else "") + rest if rest else "")
        remaining = self.content[self.emitted :]
        self.emitted = len(self.content)
        return remaining, calls

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece


def split_text(text: str, tool_names: frozenset[str] | None) -> tuple[str, list[ParsedToolCall]]:
    """The content and tool calls of a whole generation (exactly what streaming assembles)."""
    splitter = ToolSplitter(tool_names)
    head = splitter.push(text)
    rest, calls = splitter.finish()
    return head + rest, calls


def tool_names_of(tools: Sequence[Mapping[str, Any]] | None) -> frozenset[str] | None:
    if not tools:
        return None
    return frozenset(str(t.get("function", t).get("name")) for t in tools)


# ---------------------------------------------------------------------------------------------- batching
@dataclass
class Request:
    """One ``_generate`` call waiting to join a batch."""

    engine: SafeInferEngine
    prompt: Any
    tools: list[dict[str, Any]] | None
    settings: dict[str, Any]
    result: Generation | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    future: Any = None  # asyncio.Future in the async collector

    def key(self) -> tuple[Any, ...]:
        settings = json.dumps(self.settings, sort_keys=True, default=str)
        return (id(self.engine), settings, json.dumps(self.tools, sort_keys=True, default=str))


def _groups(requests: list[Request]) -> list[list[Request]]:
    groups: dict[tuple[Any, ...], list[Request]] = {}
    for request in requests:
        groups.setdefault(request.key(), []).append(request)
    return list(groups.values())


class BatchCollector:
    """Makes the ``_generate`` calls of one ``batch()`` meet and run as one engine batch.

    ``batch`` runs each input's ``invoke`` concurrently (each is its own run for callbacks and tracing);
    their ``_generate`` calls wait here until every input has either arrived or finished without generating
    (a cache hit, a streamed call, an error), then requests with the same settings run as one
    ``engine.generate`` batch. Each input joins at most once: later calls from the same input (an agent
    step, say) run on their own."""

    def __init__(self, owner: object, size: int) -> None:
        self.owner = owner
        self.expected = size  # inputs that have not yet finished without arriving
        self.arrived: set[int] = set()
        self.finished: set[int] = set()
        self.waiting: list[Request] = []
        self.spent = False
        self._lock = threading.Lock()

    def can_join(self, owner: object, slot: int) -> bool:
        with self._lock:
            return owner is self.owner and not self.spent and slot not in self.arrived

    # -------------------------------------------------------------- sync
    def submit(self, slot: int, request: Request) -> Generation:
        with self._lock:
            self.arrived.add(slot)
            self.waiting.append(request)
            ready = self._take_if_ready()
        if ready:
            self._run(ready)
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None  # noqa: S101 (set together with done)
        return request.result

    def leave(self, slot: int) -> None:
        """Input ``slot`` finished; if it never arrived, stop waiting for it."""
        with self._lock:
            if slot in self.arrived or slot in self.finished:
                return
            self.finished.add(slot)
            self.expected -= 1
            ready = self._take_if_ready()
        if ready:
            self._run(ready)

    def _take_if_ready(self) -> list[Request]:
        if self.spent or not self.waiting or len(self.waiting) < self.expected:
            return []
        self.spent = True
        ready, self.waiting = self.waiting, []
        return ready

    @staticmethod
    def _run(requests: list[Request]) -> None:
        for group in _groups(requests):
            first = group[0]
            try:
                results = first.engine.generate([r.prompt for r in group], tools=first.tools, **first.settings)
                for request, result in zip(group, results):
                    request.result = result
            except BaseException as error:  # every caller of the group sees the error
                for request in group:
                    request.error = error
            finally:
                for request in group:
                    request.done.set()

    # -------------------------------------------------------------- async (one event loop)
    async def asubmit(self, slot: int, request: Request) -> Generation:
        request.future = asyncio.get_running_loop().create_future()
        with self._lock:
            self.arrived.add(slot)
            self.waiting.append(request)
            ready = self._take_if_ready()
        if ready:
            await self._arun(ready)
        return await request.future  # type: ignore[no-any-return]

    async def aleave(self, slot: int) -> None:
        with self._lock:
            if slot in self.arrived or slot in self.finished:
                return
            self.finished.add(slot)
            self.expected -= 1
            ready = self._take_if_ready()
        if ready:
            await self._arun(ready)

    @staticmethod
    async def _arun(requests: list[Request]) -> None:
        for group in _groups(requests):
            first = group[0]
            try:
                results = await first.engine.agenerate([r.prompt for r in group], tools=first.tools,
                                                       **first.settings)
                for request, result in zip(group, results):
                    if not request.future.done():
                        request.future.set_result(result)
            except BaseException as error:
                for request in group:
                    if not request.future.done():
                        request.future.set_exception(error)


BATCH: contextvars.ContextVar[tuple[BatchCollector, int] | None] = contextvars.ContextVar(
    "safeinfer_langchain_batch", default=None
)


def run_batch_sync(owner: object, count: int, run_one: Callable[[int], Any], max_workers: int) -> list[Any]:
    """Run ``run_one(i)`` for every input in threads, with a collector so their generations batch."""
    from concurrent.futures import ThreadPoolExecutor

    collector = BatchCollector(owner, count)

    def task(index: int) -> Any:
        token = BATCH.set((collector, index))
        try:
            return run_one(index)
        finally:
            BATCH.reset(token)
            collector.leave(index)

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        futures = [pool.submit(contextvars.copy_context().run, task, index) for index in range(count)]
        return [future.result() for future in futures]


async def run_batch_async(owner: object, count: int, run_one: Callable[[int], Any]) -> list[Any]:
    collector = BatchCollector(owner, count)

    async def task(index: int) -> Any:
        token = BATCH.set((collector, index))
        try:
            return await run_one(index)
        finally:
            BATCH.reset(token)
            await collector.aleave(index)

    return list(await asyncio.gather(*(task(index) for index in range(count))))
