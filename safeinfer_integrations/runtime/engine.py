"""`SafeInferEngine`: SafeInfer decoding for any local transformers causal LM.

The engine checks its inputs and settings, renders prompts, and runs the decode loop (`decode.Decoder`)
with the steering hook attached for exactly as long as the loop runs. Streaming is the primitive:
``generate`` collects the same events ``stream`` yields.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
import warnings
from collections.abc import Generator, Mapping, Sequence
from contextlib import closing, nullcontext
from typing import Any

import torch

from ..errors import InvalidInputError, InvalidSettingError, InvalidTypeError, VectorMismatchError
from ..method.refusal import REFUSAL_OPENINGS
from ..method.shipped import shipped_vector_path
from ..method.steering import attach
from ..method.vector import SafetyVector
from ..models.architecture import context_window
from ..models.batching import pad_id_of
from ..models.loading import DEFAULT_MODEL_NAME, is_default_model, load_model_and_tokenizer
from .config import SafeInferConfig, parse_settings
from .constrain import Constraint, row_formats
from .decode import Decoder, Plan, Row, Target
from .generation import Generation, SafetyTelemetry, Usage
from .prompts import PromptFormatter, PromptInput, is_messages, normalize_batch
from .streams import AsyncGenerationStream, GenerationStream
from .textstream import TextTracker
from .tools import with_tool_prompt


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def _same_vocabulary(tokenizer: Any, other: Any) -> str | None:
    """None when both tokenizers map every token to the same id; else a description of a difference."""
    vocab, other_vocab = tokenizer.get_vocab(), other.get_vocab()
    if len(vocab) != len(other_vocab):
        return f"vocabulary sizes differ ({len(vocab)} vs {len(other_vocab)})"
    for token, index in vocab.items():
        if other_vocab.get(token) != index:
            return f"token {token!r} has id {index} in the main model and {other_vocab.get(token)} in the unsafe model"
    return None


def _vectorless_default(name: str) -> SafeInferConfig:
    """The default settings of an engine without a safety vector: safety-guided decoding with the prompted unsafe
    expert (SafeInfer's second phase, which needs no vector), said once in a warning."""
    warnings.warn(
        f"no safety vector for {name}: using mode='sgds' (safety-guided decoding with the prompted unsafe expert). "
        f"For full SafeInfer build one: safeinfer build-vector --model {name} --out vector.safetensors "
        "(docs/vectors.md), then pass vector=...",
        UserWarning,
        stacklevel=3,
    )
    return SafeInferConfig(mode="sgds", unsafe_expert="prompted")


_LABEL = re.compile(r"^[A-Za-z][A-Za-z ]{0,19}:\s+")


def last_line(text: str) -> str | None:
    """The last line of at least three words of a message that has more than that line (None otherwise), without
    a leading label: where retrieval templates put the question, after the documents ("Query: ..." gives "...";
    the label is the template's, and the gate weighs "Query: What should I do if I click a suspicious link by
    accident?" 0.58 against 0.004 for the question)."""
    lines = [line.strip() for line in text.splitlines() if len(line.split()) >= 3]
    if not lines or lines[-1] == text.strip():
        return None
    line = _LABEL.sub("", lines[-1])
    return line if len(line.split()) >= 3 else None


def _output_size(model: Any) -> int:
    """How many tokens the model's output layer scores (its config's vocabulary size when it has no output
    embedding to read)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and hasattr(output, "weight"):
        return int(output.weight.shape[0])
    return int(model.config.vocab_size)


class SafeInferEngine:
    """SafeInfer generation over one local causal LM (and optionally a separate unsafe expert model).

    Thread-safe: calls share only the read-only model weights; steering hooks act only on the forward
    passes of the call that registered them.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        vector: SafetyVector | str | os.PathLike[str] | None = None,
        unsafe_model: Any | None = None,
        unsafe_tokenizer: Any | None = None,
        config: SafeInferConfig | None = None,
        model_name: str | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise InvalidTypeError(f"model must be a transformers causal LM; got {type(model).__name__}")
        if not callable(getattr(tokenizer, "decode", None)):
            raise InvalidTypeError(f"tokenizer must be a transformers tokenizer; got {type(tokenizer).__name__}")
        if config is not None and not isinstance(config, SafeInferConfig):
            raise InvalidTypeError(f"config must be a SafeInferConfig; got {type(config).__name__}")
        if isinstance(vector, (str, os.PathLike)):
            vector = SafetyVector.load(vector)
        if vector is not None:
            if not isinstance(vector, SafetyVector):
                raise InvalidTypeError(f"vector must be a SafetyVector or a path; got {type(vector).__name__}")
            vector.check(model)
        if vector is None and config is None:
            config = _vectorless_default(model_name or str(getattr(model.config, "name_or_path", "") or "this model"))
        elif vector is None and config is not None:
            if config.amplified or (config.guided and config.unsafe_expert == "negated_vector"):
                raise InvalidSettingError(
                    f"config mode={config.mode!r} with unsafe_expert={config.unsafe_expert!r} needs a safety vector, "
                    "and none was given: pass vector=..., or use mode='sgds' with unsafe_expert='prompted'"
                )
        if unsafe_model is not None:
            unsafe_tokenizer = unsafe_tokenizer if unsafe_tokenizer is not None else tokenizer
            difference = _same_vocabulary(tokenizer, unsafe_tokenizer)
            if difference:
                raise VectorMismatchError(f"the unsafe model must share the main model's vocabulary: {difference}")
            main_vocab = _output_size(model)
            unsafe_vocab = _output_size(unsafe_model)
            if main_vocab != unsafe_vocab:
                raise VectorMismatchError(
                    f"the unsafe model's output layer has {unsafe_vocab} tokens, the main model's {main_vocab}"
                )
            unsafe_model.eval()
        model.eval()
        self._model: Any = model
        self._tokenizer: Any = tokenizer
        self._vector: SafetyVector | None = vector
        self._unsafe_model: Any = unsafe_model
        self._config = config or SafeInferConfig()
        self._formatter = PromptFormatter(tokenizer)
        self._eos = _eos_ids(model, tokenizer)
        self._context = context_window(model)
        self._encode_lock = threading.Lock()
        self._openings = tuple(tuple(self.encode_text(text)) for text in REFUSAL_OPENINGS)
        self.model_name = model_name or str(getattr(model.config, "name_or_path", "") or type(model).__name__)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model_or_path: str | os.PathLike[str] | None = None,
        *,
        vector: SafetyVector | str | os.PathLike[str] | None = None,
        unsafe_model: Any | None = None,
        config: SafeInferConfig | None = None,
        dtype: torch.dtype | str | None = None,
        device_map: Any = None,
    ) -> SafeInferEngine:
        """Load a model by hub id or directory (None: the default model, with its shipped vector)."""
        model, tokenizer = load_model_and_tokenizer(model_or_path, dtype=dtype, device_map=device_map)
        default = is_default_model(model_or_path)
        if vector is None and default:
            vector = shipped_vector_path()
        unsafe_tokenizer = None
        if isinstance(unsafe_model, (str, os.PathLike)):
            unsafe_model, unsafe_tokenizer = load_model_and_tokenizer(unsafe_model, dtype=dtype, device_map=device_map)
        name = DEFAULT_MODEL_NAME if default else str(model_or_path)
        return cls(
            model,
            tokenizer,
            vector=vector,
            unsafe_model=unsafe_model,
            unsafe_tokenizer=unsafe_tokenizer,
            config=config,
            model_name=name,
        )

    # ------------------------------------------------------------------ properties
    @property
    def model(self) -> Any:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def vector(self) -> SafetyVector | None:
        return self._vector

    @property
    def config(self) -> SafeInferConfig:
        return self._config

    @property
    def unsafe_model(self) -> Any | None:
        return self._unsafe_model

    @property
    def formatter(self) -> PromptFormatter:
        return self._formatter

    @property
    def eos_ids(self) -> frozenset[int]:
        """Token ids that end generation (the generation config's and the tokenizer's end-of-sequence)."""
        return self._eos

    @property
    def context_window(self) -> int | None:
        return self._context

    @property
    def device(self) -> torch.device:
        return torch.device(getattr(self._model, "device", None) or next(self._model.parameters()).device)

    def count_tokens(self, prompt: PromptInput, tools: Sequence[Mapping[str, Any]] | None = None) -> int:
        """Tokens of a prompt as the engine would feed it (chat template included), offline."""
        return len(self._encode(prompt, None, tools))

    # ------------------------------------------------------------------ public generation API
    def generate(
        self,
        inputs: PromptInput | Sequence[PromptInput],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **settings: Any,
    ) -> list[Generation]:
        """Generate for one prompt or a batch; returns one `Generation` per prompt, in order."""
        return self._generate(inputs, tools, settings, None)

    def _generate(
        self,
        inputs: PromptInput | Sequence[PromptInput],
        tools: Sequence[Mapping[str, Any]] | None,
        settings: Mapping[str, Any],
        cancel: threading.Event | None,
    ) -> list[Generation]:
        plan = self._make_plan(inputs, settings, tools, cancel)
        rows = self._new_rows(plan)
        with closing(self._events(plan, rows)) as events:
            for _ in events:  # each row's tracker keeps its text; the pieces are for streaming
                pass
        return self._build(rows, plan)

    def stream(
        self, prompt: PromptInput, *, tools: Sequence[Mapping[str, Any]] | None = None, **settings: Any
    ) -> GenerationStream:
        """Stream one prompt's text pieces; their join equals ``generate`` with the same settings."""
        if not (isinstance(prompt, str) or is_messages(prompt)):
            raise InvalidTypeError("stream takes one prompt: a string or a list of chat messages")
        plan = self._make_plan(prompt, settings, tools)
        rows = self._new_rows(plan)
        return GenerationStream(self._events(plan, rows), lambda: self._build(rows, plan)[0])

    async def agenerate(
        self,
        inputs: PromptInput | Sequence[PromptInput],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **settings: Any,
    ) -> list[Generation]:
        """``generate`` in a worker thread: the event loop is never blocked. Cancelling the call (a timeout,
        ``task.cancel()``) stops generation before its next forward pass."""
        cancel = threading.Event()
        try:
            return await asyncio.to_thread(self._generate, inputs, tools, settings, cancel)
        except asyncio.CancelledError:
            cancel.set()
            raise

    def astream(
        self, prompt: PromptInput, *, tools: Sequence[Mapping[str, Any]] | None = None, **settings: Any
    ) -> AsyncGenerationStream:
        """``stream`` with each step computed in a worker thread (``async for``); ``aclose()`` stops
        generation and ``generation`` holds the result once exhausted. Bad settings raise here, at once."""
        return AsyncGenerationStream(self.stream(prompt, tools=tools, **settings))

    def encode_text(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of plain text with the local tokenizer (thread-safe, offline)."""
        with self._encode_lock:
            return list(self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    # ------------------------------------------------------------------ planning (no side effects)
    def resolve_config(self, overrides: Mapping[str, Any] | None = None) -> SafeInferConfig:
        return self._config.with_overrides(dict(overrides or {}))

    def _encode(
        self, prompt: PromptInput, unsafe_prompt: str | None, tools: Sequence[Mapping[str, Any]] | None
    ) -> list[int]:
        if tools and not isinstance(prompt, str) and not self._formatter.template_uses_tools():
            prompt, tools = with_tool_prompt(prompt, tools), None  # described in the system message, never dropped
        with self._encode_lock:  # fast tokenizers are not safe to call from several threads at once
            return self._formatter.encode(prompt, unsafe_prompt=unsafe_prompt, tools=tools)

    def _make_plan(
        self,
        inputs: Any,
        settings: Mapping[str, Any],
        tools: Sequence[Mapping[str, Any]] | None,
        cancel: threading.Event | None = None,
    ) -> Plan:
        started = time.monotonic()
        sampling, config = parse_settings(settings, self._config)
        batch = normalize_batch(inputs)
        expert = config.unsafe_expert if config.guided else None
        needs_vector = config.amplified or expert == "negated_vector"
        vector = None
        if needs_vector:
            if self._vector is None:
                raise InvalidSettingError(
                    f"mode={config.mode!r} with unsafe_expert={config.unsafe_expert!r} needs a safety vector, and "
                    "this engine has none: pass vector=..., or use mode='sgds' with unsafe_expert='prompted'"
                )
            vector = self._vector.with_settings(layer=config.layer, scale=config.scale)
            vector.check(self._model)
        if expert == "model" and self._unsafe_model is None:
            raise InvalidSettingError("unsafe_expert='model' needs an unsafe_model; this engine was built without one")
        safe_ids = [self._encode(item, None, tools) for item in batch]
        unsafe_ids = None
        if expert == "prompted":
            unsafe_ids = [self._encode(item, config.unsafe_system_prompt, tools) for item in batch]
        elif expert == "negated_vector":
            unsafe_ids = safe_ids
        for index, ids in enumerate(safe_ids + (unsafe_ids if expert == "prompted" else [])):  # type: ignore[operator]
            if not ids:
                raise InvalidInputError(f"prompt {index % len(batch)} encodes to no tokens")
            if self._context is not None and len(ids) >= self._context:
                which = "prompt" if index < len(batch) else "prompt under the unsafe system prompt"
                raise InvalidInputError(
                    f"{which} {index % len(batch)} has {len(ids)} tokens; the model's context window is "
                    f"{self._context}, leaving no room to generate"
                )
        constraints = None
        if sampling.response_format is not None:
            formats = row_formats(sampling.response_format, len(batch))
            width = _output_size(self._model)
            constraints = [
                Constraint(self._tokenizer, width, sorted(self._eos), f) if f is not None else None for f in formats
            ]
        question_ids = None
        gated = vector if vector is not None else self._vector
        if config.gate and config.gate_question and gated is not None and gated.gate is not None:
            if config.amplified or config.guided:
                question_ids = [self._question_ids(item) for item in batch]
        return Plan(
            config=config,
            sampling=sampling,
            vector=vector,
            expert=expert,
            safe_ids=safe_ids,
            unsafe_ids=unsafe_ids,
            question_ids=question_ids,
            constraints=constraints,
            openings=self._openings,
            cancel=cancel,
            deadline=started + sampling.timeout if sampling.timeout is not None else None,
        )

    def _question_ids(self, prompt: PromptInput) -> list[list[int]]:
        """What the gate reads besides the whole prompt, each as a one-turn chat: the last user message alone
        (unless the conversation is just that message), its last line when it has several (`last_line`: a
        retrieval template's query line), and every turn forged inside it with control tokens (encoded as text,
        see `prompts`). Empty for a completion prompt."""
        if isinstance(prompt, str):
            return []
        users = [m for m in prompt if m.get("role") == "user" and m.get("content")]
        if not users:
            return []
        content = str(users[-1]["content"])
        questions = [] if len(prompt) == 1 and prompt[0] is users[-1] else [content]
        line = last_line(content)
        if line is not None:
            questions.append(line)
        questions += self._formatter.forged_turns(content)
        return [self._encode([{"role": "user", "content": q}], None, None) for q in questions]

    def _new_rows(self, plan: Plan) -> list[Row]:
        return [
            Row(prompt_tokens=len(ids), tracker=TextTracker(self._tokenizer, plan.sampling.stop))
            for ids in plan.safe_ids
        ]

    def _build(self, rows: list[Row], plan: Plan) -> list[Generation]:
        config, vector = plan.config, plan.vector
        return [
            Generation(
                text=row.tracker.text,
                token_ids=tuple(row.token_ids),
                finish_reason=row.finish_reason or "cancelled",  # a stream closed before it began
                usage=Usage(prompt_tokens=row.prompt_tokens, completion_tokens=len(row.token_ids)),
                safety=SafetyTelemetry(
                    mode=config.mode,
                    alpha=config.alpha,
                    plausibility=config.plausibility,
                    unsafe_expert=plan.expert,
                    vector_id=vector.vector_id if vector is not None else None,
                    layer=vector.layer if vector is not None else None,
                    scale=vector.scale if vector is not None else None,
                    gate_weight=row.gate_weight,
                    refusal_opened=row.opened,
                    guided_changes=row.guided_changes,
                    steps=len(row.token_ids),
                ),
            )
            for row in rows
        ]

    # ------------------------------------------------------------------ the decode loop
    def _events(self, plan: Plan, rows: list[Row]) -> Generator[tuple[int, str], None, None]:
        """Run the decode loop; yield (row, decided text piece). Hooks live exactly as long as this."""
        vector = plan.vector
        steer = vector is not None and (plan.config.amplified or plan.expert == "negated_vector")
        if steer:
            assert vector is not None  # noqa: S101 (steer implies a vector)
            label = f"vector {vector.vector_id} (layer {vector.layer}, scale {vector.scale:g})"
            scope: Any = attach(self._model, vector.layer, vector.vector, label)
        else:
            scope = nullcontext()
        target = Target(
            model=self._model,
            unsafe_model=self._unsafe_model,
            pad_id=pad_id_of(self._tokenizer),
            eos=self._eos,
            context=self._context,
            device=self.device,
            fallback_vector=self._vector,
        )
        with scope as steerer:
            yield from Decoder(target, plan, rows, steerer).run()
