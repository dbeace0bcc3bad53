"""`SafeInferEngine`: SafeInfer decoding for any local transformers causal LM.

One decode loop serves every mode. Rows of the main model's batch are the safe rows and, for a
same-weights unsafe expert (``prompted`` or ``negated_vector``), one unsafe twin per safe row that rides
in the same forward pass. A ``model`` expert runs its own forward pass over the same token ids. Every row
keeps its KV cache for the whole generation; finished rows are dropped from the caches, nothing is
recomputed. Streaming is the primitive: ``generate`` collects the same events ``stream`` yields.
"""

from __future__ import annotations

import asyncio
import copy
import os
import secrets
import threading
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from .architecture import context_window
from .compat import cache_kwarg
from .config import SafeInferConfig, SamplingSettings, split_settings
from .generation import FinishReason, Generation, SafetyTelemetry, Usage
from .guidance import guidance_weight, select_tokens, sgds_scores
from .loading import DEFAULT_MODEL_NAME, is_default_model, load_model_and_tokenizer
from .prompts import PromptFormatter, PromptInput, normalize_batch
from .steering import Steerer, attach, hidden_after_layer
from .textstream import TextTracker
from .vector import SafetyVector

DEFAULT_VECTOR_FILE = "SmolLM2-135M-Instruct.safetensors"


def shipped_vector_path() -> Path | None:
    """The calibrated vector shipped for the default model, if this build has one."""
    candidate = resources.files("safeinfer_integrations").joinpath("vectors").joinpath(DEFAULT_VECTOR_FILE)
    return Path(str(candidate)) if candidate.is_file() else None


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


def _output_size(model: Any) -> int:
    """How many tokens the model's output layer scores."""
    return int(model.get_output_embeddings().weight.shape[0])


@dataclass
class _Row:
    """One input's progress."""

    prompt_tokens: int
    tracker: TextTracker
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    guided_changes: int = 0
    gate_weight: float | None = None


def _forward(model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
             steerer: Steerer | None = None, coef: torch.Tensor | None = None) -> torch.Tensor:
    """One cached forward pass; the last position's logits in float32. Steered only inside this call."""
    scope = steerer.active(coef) if steerer is not None and coef is not None else nullcontext()
    with scope:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwarg(cache),
                    use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :].float()


def _forkable(cache: Any) -> bool:
    """Whether ``cache`` is a layered cache whose layers rebind (not mutate) their tensors on update: plain
    `DynamicLayer`s only (not its subclasses, such as the sliding-window layer)."""
    layers = getattr(cache, "layers", None)
    return isinstance(layers, list) and all(type(layer) is DynamicLayer for layer in layers)


def _fork(cache: Any) -> Any:
    """A copy of a `DynamicCache` that shares its tensors: updates to the fork (which concatenate into new
    tensors) leave the original untouched."""
    fork = copy.copy(cache)
    fork.layers = [copy.copy(layer) for layer in cache.layers]
    return fork


def _rows(cache: Any, n: int, rows: int, device: torch.device) -> Any:
    """A fork of ``cache`` holding its first ``n`` of ``rows`` batch rows."""
    fork = _fork(cache)
    if rows != n:
        fork.batch_select_indices(torch.arange(n, device=device))
    return fork


class _SeparateExpert:
    """The ``model`` unsafe expert: its own forward passes and KV cache over the safe rows' token ids."""

    def __init__(self, model: Any, mask: torch.Tensor) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.mask = mask.to(self.device)
        self.cache = DynamicCache(config=model.config)

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return _forward(self.model, ids.to(self.device), self.mask, positions.to(self.device), self.cache)

    def select(self, keep: list[int]) -> None:
        """Keep only these rows (finished rows leave the cache; nothing is recomputed)."""
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=-1)
        return _forward(self.model, tokens[:, None].to(self.device), self.mask, positions.to(self.device),
                        self.cache)


@dataclass(frozen=True)
class _Plan:
    """Everything one call needs, validated before any hook is registered."""

    config: SafeInferConfig
    sampling: SamplingSettings
    vector: SafetyVector | None  # with the call's layer/scale applied
    expert: str | None  # None when not guided
    safe_ids: list[list[int]]
    unsafe_ids: list[list[int]] | None  # same-weights expert rows (prompted / negated_vector)

    @property
    def shares_weights(self) -> bool:
        return self.expert in ("prompted", "negated_vector")


class GenerationStream:
    """Iterator of text pieces for one input; ``generation`` holds the result once exhausted.

    ``close()`` (or leaving a ``with`` block, or dropping the iterator) stops generation at once."""

    def __init__(self, events: Iterator[tuple[int, str]], rows: list[_Row], build: Any) -> None:
        self._events = events
        self._rows = rows
        self._build = build
        self.generation: Generation | None = None

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> str:
        for _row, piece in self._events:
            if piece:
                return piece
        if self.generation is None:
            self.generation = self._build(self._rows)[0]
        raise StopIteration

    def close(self) -> None:
        self._events.close()  # type: ignore[attr-defined]

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGenerationStream:
    """Async twin of `GenerationStream`: each step runs in a worker thread, so the event loop never blocks."""

    _DONE = object()

    def __init__(self, stream: GenerationStream) -> None:
        self._stream = stream
        self._pending: asyncio.Future[Any] | None = None

    @property
    def generation(self) -> Generation | None:
        return self._stream.generation

    def __aiter__(self) -> AsyncGenerationStream:
        return self

    async def __anext__(self) -> str:
        self._pending = asyncio.get_running_loop().run_in_executor(None, next, self._stream, self._DONE)
        piece = await asyncio.shield(self._pending)  # a cancelled caller leaves the step to finish
        self._pending = None
        if piece is self._DONE:
            raise StopAsyncIteration
        return piece  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        """Stop generation (hooks are removed before this returns). If a step is still running in its
        worker thread (the caller was cancelled mid-step), it is let finish first."""
        if self._pending is not None and not self._pending.done():
            await asyncio.wait([self._pending])
        self._pending = None
        self._stream.close()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


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
            raise TypeError(f"model must be a transformers causal LM; got {type(model).__name__}")
        if not callable(getattr(tokenizer, "decode", None)):
            raise TypeError(f"tokenizer must be a transformers tokenizer; got {type(tokenizer).__name__}")
        if config is not None and not isinstance(config, SafeInferConfig):
            raise TypeError(f"config must be a SafeInferConfig; got {type(config).__name__}")
        if isinstance(vector, (str, os.PathLike)):
            vector = SafetyVector.load(vector)
        if vector is not None:
            if not isinstance(vector, SafetyVector):
                raise TypeError(f"vector must be a SafetyVector or a path; got {type(vector).__name__}")
            vector.check(model)
        if unsafe_model is not None:
            unsafe_tokenizer = unsafe_tokenizer if unsafe_tokenizer is not None else tokenizer
            difference = _same_vocabulary(tokenizer, unsafe_tokenizer)
            if difference:
                raise ValueError(f"the unsafe model must share the main model's vocabulary: {difference}")
            main_vocab = _output_size(model)
            unsafe_vocab = _output_size(unsafe_model)
            if main_vocab != unsafe_vocab:
                raise ValueError(
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
        return cls(model, tokenizer, vector=vector, unsafe_model=unsafe_model, unsafe_tokenizer=unsafe_tokenizer,
                   config=config, model_name=name)

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
    def generate(self, inputs: PromptInput | Sequence[PromptInput], *,
                 tools: Sequence[Mapping[str, Any]] | None = None, **settings: Any) -> list[Generation]:
        """Generate for one prompt or a batch; returns one `Generation` per prompt, in order."""
        plan = self._make_plan(inputs, settings, tools)
        rows = self._new_rows(plan)
        with closing(self._events(plan, rows)) as events:
            for _ in events:  # each row's tracker keeps its text; the pieces are for streaming
                pass
        return self._build(rows, plan)

    def stream(self, prompt: PromptInput, *, tools: Sequence[Mapping[str, Any]] | None = None,
               **settings: Any) -> GenerationStream:
        """Stream one prompt's text pieces; their join equals ``generate`` with the same settings."""
        if not isinstance(prompt, str) and not (isinstance(prompt, Sequence) and prompt and
                                                isinstance(prompt[0], Mapping)):
            raise TypeError("stream takes one prompt: a string or a list of chat messages")
        plan = self._make_plan(prompt, settings, tools)
        rows = self._new_rows(plan)
        return GenerationStream(self._events(plan, rows), rows, lambda rs: self._build(rs, plan))

    async def agenerate(self, inputs: PromptInput | Sequence[PromptInput], *,
                        tools: Sequence[Mapping[str, Any]] | None = None, **settings: Any) -> list[Generation]:
        """``generate`` in a worker thread: the event loop is never blocked."""
        return await asyncio.to_thread(self.generate, inputs, tools=tools, **settings)

    def astream(self, prompt: PromptInput, *, tools: Sequence[Mapping[str, Any]] | None = None,
                **settings: Any) -> AsyncGenerationStream:
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

    def _encode(self, prompt: PromptInput, unsafe_prompt: str | None,
                tools: Sequence[Mapping[str, Any]] | None) -> list[int]:
        with self._encode_lock:  # fast tokenizers are not safe to call from several threads at once
            return self._formatter.encode(prompt, unsafe_prompt=unsafe_prompt, tools=tools)

    def _make_plan(self, inputs: Any, settings: Mapping[str, Any],
                   tools: Sequence[Mapping[str, Any]] | None) -> _Plan:
        sampling_kwargs, config_kwargs = split_settings(settings)
        sampling = SamplingSettings(**sampling_kwargs)
        config = self.resolve_config(config_kwargs)
        batch = normalize_batch(inputs)
        expert = config.unsafe_expert if config.guided else None
        needs_vector = config.amplified or expert == "negated_vector"
        vector = None
        if needs_vector:
            if self._vector is None:
                raise ValueError(
                    f"mode={config.mode!r} with unsafe_expert={config.unsafe_expert!r} needs a safety vector, and "
                    "this engine has none: pass vector=..., or use mode='sgds' with unsafe_expert='prompted'"
                )
            vector = self._vector.with_settings(layer=config.layer, scale=config.scale)
            vector.check(self._model)
        if expert == "model" and self._unsafe_model is None:
            raise ValueError("unsafe_expert='model' needs an unsafe_model; this engine was built without one")
        safe_ids = [self._encode(item, None, tools) for item in batch]
        unsafe_ids = None
        if expert == "prompted":
            unsafe_ids = [self._encode(item, config.unsafe_system_prompt, tools) for item in batch]
        elif expert == "negated_vector":
            unsafe_ids = safe_ids
        for index, ids in enumerate(safe_ids + (unsafe_ids if expert == "prompted" else [])):  # type: ignore[operator]
            if not ids:
                raise ValueError(f"prompt {index % len(batch)} encodes to no tokens")
            if self._context is not None and len(ids) >= self._context:
                which = "prompt" if index < len(batch) else "prompt under the unsafe system prompt"
                raise ValueError(
                    f"{which} {index % len(batch)} has {len(ids)} tokens; the model's context window is "
                    f"{self._context}, leaving no room to generate"
                )
        return _Plan(config=config, sampling=sampling, vector=vector, expert=expert,
                     safe_ids=safe_ids, unsafe_ids=unsafe_ids)

    def _new_rows(self, plan: _Plan) -> list[_Row]:
        return [_Row(prompt_tokens=len(ids), tracker=TextTracker(self._tokenizer, plan.sampling.stop))
                for ids in plan.safe_ids]

    def _build(self, rows: list[_Row], plan: _Plan) -> list[Generation]:
        config = plan.config
        results = []
        for row in rows:
            telemetry = SafetyTelemetry(
                mode=config.mode,
                alpha=config.alpha,
                plausibility=config.plausibility,
                unsafe_expert=plan.expert,
                vector_id=plan.vector.vector_id if plan.vector is not None else None,
                layer=plan.vector.layer if plan.vector is not None else None,
                scale=plan.vector.scale if plan.vector is not None else None,
                gate_weight=row.gate_weight,
                guided_changes=row.guided_changes,
                steps=len(row.token_ids),
            )
            results.append(Generation(
                text=row.tracker.text,
                token_ids=tuple(row.token_ids),
                finish_reason=row.finish_reason or "length",
                usage=Usage(prompt_tokens=row.prompt_tokens, completion_tokens=len(row.token_ids)),
                safety=telemetry,
            ))
        return results

    # ------------------------------------------------------------------ the decode loop
    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        pad = self._tokenizer.pad_token_id
        pad = pad if pad is not None else next(iter(self._eos), 0)
        ids = torch.full((len(sequences), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for index, seq in enumerate(sequences):
            ids[index, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[index, width - len(seq):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _gate_weights(self, plan: _Plan, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                      cache: Any = None) -> torch.Tensor | None:
        """Per-request gate weights from the unsteered prompt's hidden state (None: no gate). With ``cache``
        (a fork of the prompt's KV cache up to its last token, which this pass extends), only the last token
        is run."""
        vector = plan.vector if plan.vector is not None else self._vector
        if not plan.config.gate or vector is None or vector.gate is None:
            return None
        if not (plan.config.amplified or plan.config.guided):
            return None
        extra = {**cache_kwarg(cache), "use_cache": True} if cache is not None else {}
        hidden = hidden_after_layer(self._model, vector.gate.layer, input_ids=ids, attention_mask=mask,
                                    position_ids=positions, **extra)
        return vector.gate.weight(hidden[:, -1, :])

    def _prefill(self, plan: _Plan, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: Any, steerer: Steerer | None, n: int) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                       torch.Tensor, torch.Tensor, list[int]]:
        """Run the prompts into ``cache``; returns (last logits, gate weights or None, steering coefficients,
        guidance weights, the requests that keep SafeInfer). A request whose gate weight is below
        ``gate_cutoff`` is treated as gate weight 0 (no steering, no guidance) and is left out of the last
        list, so the loop can drop its unsafe-expert rows.

        Steering only touches the last prompt token, so the prompt is run in two parts: all tokens but the
        last (unsteered, once), then the last token with the steering coefficients. In between, the gate
        reads the last token's hidden state on a fork of the cache (one token, layers up to the gate's),
        and the ``negated_vector`` twins, whose prompts equal their safe rows', copy those rows' cache
        instead of recomputing it. One pass instead when some row's prompt has fewer than two tokens, when
        the cache is not made of plain `DynamicLayer`s, or when the model is not a transformers
        `PreTrainedModel` (whose cache semantics the split relies on)."""
        config, shared = plan.config, plan.shares_weights
        split = (isinstance(self._model, PreTrainedModel) and ids.shape[1] > 1 and int(mask.sum(-1).min()) >= 2
                 and _forkable(cache))
        if split:
            twins_copy = shared and plan.expert == "negated_vector"
            rows = n if twins_copy else ids.shape[0]
            _forward(self._model, ids[:rows, :-1], mask[:rows, :-1], positions[:rows, :-1], cache)
            safe_cache = _rows(cache, n, rows, ids.device)
            gate = self._gate_weights(plan, ids[:n, -1:], mask[:n], positions[:n, -1:], cache=safe_cache)
            if twins_copy:
                cache.batch_select_indices(torch.cat([torch.arange(n), torch.arange(n)]).to(self.device))
        else:
            gate = self._gate_weights(plan, ids[:n], mask[:n], positions[:n])
        gate_cpu = gate.cpu() if gate is not None else torch.ones(n)
        kept = list(range(n))
        if gate is not None and config.gate_cutoff > 0.0:
            below = gate_cpu < config.gate_cutoff
            gate_cpu = gate_cpu.masked_fill(below, 0.0)
            kept = [row for row in range(n) if not bool(below[row])]
        scale = plan.vector.scale if plan.vector is not None else 0.0
        safe_coef = gate_cpu * scale if config.amplified else torch.zeros(n)
        unsafe_coef = -gate_cpu * scale if plan.expert == "negated_vector" else torch.zeros(n)
        coef = (torch.cat([safe_coef, unsafe_coef]) if shared else safe_coef).to(self.device)
        weight = guidance_weight(config.alpha, gate_cpu).float().to(self.device)
        if split:
            logits = _forward(self._model, ids[:, -1:], mask, positions[:, -1:], cache, steerer, coef)
        else:
            logits = _forward(self._model, ids, mask, positions, cache, steerer, coef)
        return logits, gate, coef, weight, kept

    def _events(self, plan: _Plan, rows: list[_Row]) -> Generator[tuple[int, str], None, None]:
        """Run the decode loop; yield (row, decided text piece). Hooks live exactly as long as this."""
        steer = plan.vector is not None and (plan.config.amplified or plan.expert == "negated_vector")
        scope = attach(self._model, plan.vector.layer, plan.vector.vector) if steer else nullcontext()  # type: ignore[union-attr]
        with scope as steerer:
            yield from self._loop(plan, rows, steerer)

    def _loop(self, plan: _Plan, rows: list[_Row], steerer: Steerer | None) -> Iterator[tuple[int, str]]:
        sampling, config = plan.sampling, plan.config
        n = len(rows)
        shared = plan.shares_weights
        main_sequences = plan.safe_ids + (plan.unsafe_ids or []) if shared else plan.safe_ids
        generators = None
        if not sampling.greedy:
            seed = sampling.seed if sampling.seed is not None else secrets.randbits(62)
            generators = [torch.Generator().manual_seed(seed) for _ in rows]

        with torch.inference_mode():
            ids, mask = self._left_pad(main_sequences)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = DynamicCache(config=self._model.config)
            logits, gate, coef, weight, paired = self._prefill(plan, ids, mask, positions, cache, steerer, n)
            if gate is not None:
                for row, gate_weight in zip(rows, gate.tolist()):
                    row.gate_weight = gate_weight
            if plan.expert is None:
                paired = []
            # ``paired``: the slots (indexes among the active safe rows) that have unsafe-expert rows. Main
            # batch layout: the active safe rows, then one twin per paired slot, in the same order.
            if shared and len(paired) < n:  # requests below the gate cutoff lose their twins now
                select = torch.tensor(list(range(n)) + [n + slot for slot in paired], device=self.device)
                cache.batch_select_indices(select)
                mask, coef, logits = mask[select], coef[select], logits[select]
            expert = None
            unsafe_logits = None
            if plan.expert == "model" and paired:
                index = torch.tensor(paired, device=self.device)
                expert = _SeparateExpert(self._unsafe_model, mask[index])
                unsafe_logits = expert.prefill(ids[index], positions[index]).to(self.device)
            lengths = mask.sum(-1)  # tokens so far per main row
            paired_index = torch.tensor(paired, dtype=torch.long, device=self.device)  # rebuilt when rows finish

        active = list(range(n))  # original indexes of the rows still generating
        step = 0
        while True:
            with torch.inference_mode():
                if torch.isnan(logits).any() or (unsafe_logits is not None and torch.isnan(unsafe_logits).any()):
                    bad = torch.isnan(logits).any(-1).nonzero().flatten().tolist()
                    raise FloatingPointError(
                        f"the model produced NaN logits at generation step {step} (batch rows {bad}); "
                        f"check the model's dtype ({next(self._model.parameters()).dtype}) and the steering scale"
                    )
                log_probs = torch.log_softmax(logits, dim=-1)
                safe = log_probs[: len(active)]
                if step < sampling.min_new_tokens and self._eos:
                    safe = safe.clone()
                    safe[:, sorted(self._eos)] = float("-inf")  # min_new_tokens: no end of sequence yet
                uniforms = None
                if generators is not None:
                    uniforms = torch.stack([torch.rand((), generator=generators[i]) for i in active])
                pick = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                            uniforms=uniforms)
                if not paired:
                    chosen = select_tokens(safe, **pick)  # type: ignore[arg-type]
                    changed = None
                else:
                    unsafe = log_probs[len(active):] if shared else torch.log_softmax(unsafe_logits, dim=-1)
                    if len(paired) == len(active):
                        scores = sgds_scores(safe, unsafe, weight, config.plausibility)
                    else:  # rows below the gate cutoff keep their plain scores
                        scores = safe.clone()
                        scores[paired_index] = sgds_scores(safe[paired_index], unsafe, weight[paired_index],
                                                           config.plausibility)
                    chosen = select_tokens(scores, **pick)  # type: ignore[arg-type]
                    changed = chosen != select_tokens(safe, **pick)  # type: ignore[arg-type]
                chosen_list = chosen.tolist()
                pair_lengths = lengths[: len(active)]  # the longest sequence of each pair bounds the context
                if shared and paired:
                    pair_lengths = pair_lengths.clone()
                    pair_lengths[paired_index] = torch.maximum(pair_lengths[paired_index], lengths[len(active):])
                longest = pair_lengths.tolist()
                changed_list = changed.tolist() if changed is not None else None

            finished = []
            for slot, index in enumerate(active):
                row, token = rows[index], int(chosen_list[slot])
                if changed_list is not None and changed_list[slot]:
                    row.guided_changes += 1
                row.token_ids.append(token)
                piece = ""
                if token in self._eos:
                    row.finish_reason = "stop"
                else:
                    piece = row.tracker.push(token)
                    if row.tracker.stopped:
                        row.finish_reason = "stop_sequence"
                    elif len(row.token_ids) >= sampling.max_new_tokens or (
                        self._context is not None and longest[slot] + 1 >= self._context
                    ):
                        row.finish_reason = "length"
                if piece:
                    yield index, piece
                if row.finish_reason is not None:
                    tail = row.tracker.finish()
                    if tail:
                        yield index, tail
                    finished.append(slot)
            step += 1
            if len(finished) == len(active):
                return

            with torch.inference_mode():
                keep = [slot for slot in range(len(active)) if slot not in finished]
                tokens = chosen
                if finished:
                    active = [active[slot] for slot in keep]
                    width = len(chosen)  # safe rows before this selection; their twins follow them
                    kept = set(keep)
                    twins_kept = [j for j, slot in enumerate(paired) if slot in kept]
                    keep_main = keep + [width + j for j in twins_kept] if shared else keep
                    select = torch.tensor(keep_main, device=self.device)
                    cache.batch_select_indices(select)
                    mask, lengths = mask[select], lengths[select]
                    coef = coef[select]
                    weight = weight[torch.tensor(keep, device=self.device)]
                    tokens = chosen[torch.tensor(keep, device=self.device)]
                    new_slot = {slot: position for position, slot in enumerate(keep)}
                    paired = [new_slot[paired[j]] for j in twins_kept]
                    if expert is not None:
                        if paired:
                            expert.select(twins_kept)
                        else:
                            expert, unsafe_logits = None, None
                    paired_index = torch.tensor(paired, dtype=torch.long, device=self.device)
                next_ids = torch.cat([tokens, tokens[paired_index]]) if shared and paired else tokens
                next_ids = next_ids[:, None].to(self.device)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                positions = lengths[:, None]
                lengths = lengths + 1
                logits = _forward(self._model, next_ids, mask, positions, cache, steerer, coef)
                if expert is not None:
                    unsafe_logits = expert.step(tokens[paired_index], positions[paired_index]).to(self.device)
