"""Engine behaviour on tiny models: streaming, stop strings, sampling, hooks, threads and bad input."""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from conftest import make_tiny_model
from passes import ForwardPasses

from safeinfer_integrations import (
    InvalidInputError,
    InvalidSettingError,
    InvalidTypeError,
    SafeInferConfig,
    SafeInferEngine,
    SafeInferError,
    SafetyVector,
    UnknownSettingError,
    VectorMismatchError,
)
from safeinfer_integrations.errors import NumericalError
from safeinfer_integrations.models.architecture import steering_module

CHAT = [{"role": "user", "content": "How do I bake bread at home?"}]


@pytest.fixture
def engine(tiny_model_factory: Any, tiny_tokenizer: Any) -> SafeInferEngine:
    model = tiny_model_factory("llama", 0)
    vector = SafetyVector(torch.randn(48, generator=torch.Generator().manual_seed(1)), layer=1, scale=3.0)
    return SafeInferEngine(model, tiny_tokenizer, vector=vector, unsafe_model=tiny_model_factory("llama", 1))


def _hook_count(engine: SafeInferEngine) -> int:
    module = steering_module(engine.model, engine.vector.layer)  # type: ignore[union-attr]
    return len(module._forward_hooks)


@pytest.mark.parametrize("mode", ["vanilla", "sa", "sgds", "safeinfer"])
def test_stream_equals_generate(engine: SafeInferEngine, mode: str) -> None:
    settings = {"mode": mode, "max_new_tokens": 24}
    generation = engine.generate(CHAT, **settings)[0]
    stream = engine.stream(CHAT, **settings)
    pieces = list(stream)
    assert "".join(pieces) == generation.text
    assert stream.generation == generation
    assert _hook_count(engine) == 0


def test_sampling_is_reproducible_and_stream_matches(engine: SafeInferEngine) -> None:
    settings = {"mode": "safeinfer", "temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 11, "max_new_tokens": 20}
    first = engine.generate(CHAT, **settings)[0]
    assert engine.generate(CHAT, **settings)[0] == first
    assert "".join(engine.stream(CHAT, **settings)) == first.text
    other = engine.generate(CHAT, **{**settings, "seed": 12})[0]
    assert other.token_ids != first.token_ids
    # a batch row with a seed equals the single run with that seed
    batch = engine.generate(["Some text", CHAT], **settings)
    assert batch[1] == first


def test_stop_string_spanning_tokens(engine: SafeInferEngine, tiny_tokenizer: Any) -> None:
    full = engine.generate(CHAT, mode="vanilla", max_new_tokens=30)[0]
    pieces = [tiny_tokenizer.decode([t]) for t in full.token_ids]
    # a stop string made of the end of token 3 and the start of token 4: it spans two tokens
    assert len(pieces) > 6 and len(pieces[3]) >= 1 and len(pieces[4]) >= 1
    stop = pieces[3][-1:] + pieces[4][:1]
    index = full.text.find(stop)
    assert index >= 0
    result = engine.generate(CHAT, mode="vanilla", max_new_tokens=30, stop=[stop])[0]
    assert result.finish_reason == "stop_sequence"
    assert result.text == full.text[:index]
    assert stop not in result.text
    streamed = engine.stream(CHAT, mode="vanilla", max_new_tokens=30, stop=stop)
    assert "".join(streamed) == full.text[:index]
    assert streamed.generation is not None and streamed.generation.finish_reason == "stop_sequence"


def test_finish_reasons_and_usage(engine: SafeInferEngine, tiny_tokenizer: Any) -> None:
    result = engine.generate(CHAT, mode="vanilla", max_new_tokens=5)[0]
    assert result.finish_reason in ("length", "stop")
    assert result.usage.prompt_tokens == len(engine.formatter.encode(CHAT))
    assert result.usage.completion_tokens == len(result.token_ids) <= 5
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.safety.mode == "vanilla" and result.safety.vector_id is None


def test_eos_ends_generation_with_stop(tiny_tokenizer: Any) -> None:
    model = make_tiny_model("llama", len(tiny_tokenizer), seed=0)
    with torch.no_grad():  # make the end-of-sequence token overwhelmingly likely
        model.lm_head.weight[tiny_tokenizer.eos_token_id] *= 0
        model.lm_head.bias = None
        model.lm_head.weight[tiny_tokenizer.eos_token_id] += model.model.norm.weight.sign() * 5
    engine = SafeInferEngine(model, tiny_tokenizer)
    result = engine.generate(CHAT, mode="vanilla", max_new_tokens=20)[0]
    assert result.finish_reason == "stop"
    assert result.token_ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.eos_token not in result.text


def test_context_window_bounds_generation(tiny_tokenizer: Any) -> None:
    model = make_tiny_model("gpt2", len(tiny_tokenizer), seed=0)  # 256 positions
    engine = SafeInferEngine(model, tiny_tokenizer)
    prompt_len = len(engine.formatter.encode(CHAT))
    result = engine.generate(CHAT, mode="vanilla", max_new_tokens=1000)[0]
    assert result.usage.prompt_tokens + result.usage.completion_tokens <= 256
    if result.finish_reason == "length":
        assert result.usage.completion_tokens == 256 - prompt_len


def test_early_closed_stream_removes_hooks(engine: SafeInferEngine) -> None:
    stream = engine.stream(CHAT, mode="safeinfer", unsafe_expert="negated_vector", max_new_tokens=50)
    next(stream)
    assert _hook_count(engine) == 1  # the call's hook, while it runs
    stream.close()
    assert _hook_count(engine) == 0
    assert stream.generation is not None and stream.generation.finish_reason == "cancelled"


def test_steering_does_not_leak_into_consumer_code(engine: SafeInferEngine) -> None:
    """Between two stream steps the consumer's own forward passes are not steered."""
    ids = torch.tensor([engine.formatter.encode(CHAT)], device=engine.device)
    with torch.no_grad():
        before = engine.model(ids).logits
    stream = engine.stream(CHAT, mode="sa", max_new_tokens=10)
    next(stream)
    with torch.no_grad():
        during = engine.model(ids).logits
    stream.close()
    assert torch.equal(before, during)


def test_exception_inside_generation_leaves_model_unhooked(engine: SafeInferEngine) -> None:
    baseline = engine.generate(CHAT, mode="sa", max_new_tokens=8)[0]
    calls = {"n": 0}

    def explode(_module: Any, _inputs: Any, output: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom in layer 0")
        return None

    handle = engine.model.model.layers[0].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            engine.generate(CHAT, mode="safeinfer", unsafe_expert="negated_vector", max_new_tokens=8)
    finally:
        handle.remove()
    assert _hook_count(engine) == 0
    assert engine.generate(CHAT, mode="sa", max_new_tokens=8)[0] == baseline


def test_nan_logits_raise_clearly_and_unhook(engine: SafeInferEngine) -> None:
    def poison(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output * float("nan")

    handle = engine.model.lm_head.register_forward_hook(poison)
    try:
        with pytest.raises(NumericalError, match="non-finite .NaN or infinite. logits at generation step 0"):
            engine.generate(CHAT, mode="sa", max_new_tokens=4)
    finally:
        handle.remove()
    assert _hook_count(engine) == 0
    assert engine.generate(CHAT, mode="sa", max_new_tokens=2)[0].usage.completion_tokens >= 1


@pytest.mark.parametrize("poison", [float("inf"), 1e30])
def test_infinite_logits_or_a_runaway_scale_raise_clearly_and_unhook(engine: SafeInferEngine, poison: float) -> None:
    """Infinite logits (not only NaN) and steering that swamps the hidden state (a huge scale: the output would be
    the vector's, empty or repeated tokens) raise `NumericalError` naming the vector and scale; the engine is left
    clean."""
    vector = engine.vector
    assert vector is not None
    if poison == float("inf"):
        handle = engine.model.lm_head.register_forward_hook(lambda _m, _i, output: output * poison)
        match = "infinite"
    else:
        handle = None
        steered_id = vector.with_settings(scale=poison).vector_id
        match = f"vector {steered_id} .layer 1, scale 1e\\+30. adds .*e\\+2[0-9] times"
    try:
        with pytest.raises(NumericalError, match=match):
            engine.generate(CHAT, mode="sa", max_new_tokens=4, scale=poison if handle is None else None)
    finally:
        if handle is not None:
            handle.remove()
    assert _hook_count(engine) == 0
    assert engine.generate(CHAT, mode="sa", max_new_tokens=2)[0].usage.completion_tokens >= 1


def test_eight_threads_get_what_each_gets_alone(engine: SafeInferEngine) -> None:
    jobs: list[dict[str, Any]] = [
        {"mode": "vanilla"},
        {"mode": "sa"},
        {"mode": "sa", "scale": -3.0},
        {"mode": "sgds", "unsafe_expert": "prompted"},
        {"mode": "sgds", "unsafe_expert": "model", "alpha": 0.5},
        {"mode": "safeinfer", "unsafe_expert": "negated_vector"},
        {"mode": "safeinfer", "unsafe_expert": "model", "plausibility": 0.0},
        {"mode": "sa", "temperature": 1.0, "seed": 3},
    ]
    prompts = [CHAT, "The capital of France is"]
    alone = [engine.generate(prompts, max_new_tokens=12, **job) for job in jobs]
    assert len({tuple(g.token_ids for g in result) for result in alone}) > 3  # the jobs really differ
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _round in range(2):
            together = list(pool.map(lambda job: engine.generate(prompts, max_new_tokens=12, **job), jobs))
            assert together == alone
    assert _hook_count(engine) == 0


# ---------------------------------------------------------------------------------------- bad input
def _unchanged(engine: SafeInferEngine, config: SafeInferConfig) -> None:
    assert engine.config == config
    assert _hook_count(engine) == 0


@pytest.mark.parametrize(
    ("inputs", "settings", "error", "match"),
    [
        ("", {}, InvalidInputError, "empty string"),
        ([], {}, InvalidInputError, "inputs is empty"),
        ([[]], {}, InvalidTypeError, "prompt 0 must be a string or a non-empty list"),
        (42, {}, InvalidTypeError, "got int"),
        ([{"role": "user", "content": 5}], {}, InvalidTypeError, "'content' must be a string"),
        ("hi", {"alpha": 1.0}, InvalidSettingError, r"alpha must be in \[0, 1\).*got 1.0"),
        ("hi", {"alpha": -0.1}, InvalidSettingError, "alpha must be in"),
        ("hi", {"mode": "turbo"}, InvalidSettingError, "mode must be one of vanilla, sa, sgds, safeinfer; got 'turbo'"),
        ("hi", {"unsafe_expert": "evil"}, InvalidSettingError, "unsafe_expert must be one of"),
        ("hi", {"plausibility": 1.5}, InvalidSettingError, "plausibility"),
        ("hi", {"temperature": -1}, InvalidSettingError, "temperature must be"),
        ("hi", {"top_p": 0}, InvalidSettingError, "top_p must be in"),
        ("hi", {"max_new_tokens": 0}, InvalidSettingError, "max_new_tokens must be >= 1"),
        ("hi", {"stop": [""]}, InvalidSettingError, "stop must be non-empty"),
        ("hi", {"max_tokens": 3}, UnknownSettingError, "unknown generation setting"),
        ("hi", {"mode": "sa", "layer": 7}, VectorMismatchError, "layer 7 is out of range: the model has 3 layers"),
        ("hi", {"scale": math.inf}, InvalidSettingError, "scale must be a finite number"),
        ("hi", {"gate_cutoff": 1.0}, InvalidSettingError, r"gate_cutoff must be in \[0, 1\) \(0 = off\); got 1.0"),
    ],
)
def test_bad_input_raises_and_changes_nothing(
    engine: SafeInferEngine, inputs: Any, settings: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Each bad input raises the package's own error type (a subclass of the ValueError or TypeError it
    replaced), naming the culprit, and leaves the engine as it was."""
    config = engine.config
    with pytest.raises(error, match=match) as raised:
        engine.generate(inputs, **settings)
    assert isinstance(raised.value, SafeInferError)
    assert isinstance(raised.value, ValueError if issubclass(error, ValueError) else TypeError)
    _unchanged(engine, config)


def test_input_longer_than_context(engine: SafeInferEngine) -> None:
    long_text = "bread " * 400
    with pytest.raises(ValueError, match=r"prompt 0 has \d+ tokens; the model's context window is 256"):
        engine.generate(long_text)
    _unchanged(engine, engine.config)


def test_vector_of_wrong_size_or_layer(tiny_model_factory: Any, tiny_tokenizer: Any) -> None:
    model = tiny_model_factory("llama", 0)
    with pytest.raises(ValueError, match="vector size 10 != model hidden size 48"):
        SafeInferEngine(model, tiny_tokenizer, vector=SafetyVector(torch.ones(10), layer=0))
    with pytest.raises(ValueError, match=r"layer 5 is out of range: the model has 3 layers \(0..2\)"):
        SafeInferEngine(model, tiny_tokenizer, vector=SafetyVector(torch.ones(48), layer=5))
    assert all(len(layer.mlp._forward_hooks) == 0 for layer in model.model.layers)


def test_mode_needing_a_vector_without_one(tiny_model_factory: Any, tiny_tokenizer: Any) -> None:
    engine = SafeInferEngine(tiny_model_factory("llama", 0), tiny_tokenizer)
    with pytest.raises(ValueError, match="needs a safety vector"):
        engine.generate("hi", mode="sa")
    with pytest.raises(ValueError, match="needs an unsafe_model"):
        engine.generate("hi", mode="sgds", unsafe_expert="model")
    assert engine.generate("hi", mode="sgds", unsafe_expert="prompted", max_new_tokens=2)


def test_unsafe_model_with_another_vocabulary(tiny_model_factory: Any, tiny_tokenizer: Any) -> None:
    vocab = tiny_tokenizer.get_vocab()
    # same size, two ids swapped: a size check alone would not notice
    first, second = sorted(vocab, key=vocab.get)[10:12]
    swapped = dict(vocab)
    swapped[first], swapped[second] = vocab[second], vocab[first]

    class Swapped:
        def get_vocab(self) -> dict[str, int]:
            return swapped

    with pytest.raises(ValueError, match="must share the main model's vocabulary: token"):
        SafeInferEngine(
            tiny_model_factory("llama", 0),
            tiny_tokenizer,
            unsafe_model=tiny_model_factory("llama", 1),
            unsafe_tokenizer=Swapped(),
        )
    bigger = make_tiny_model("llama", len(tiny_tokenizer) + 8, seed=1)
    with pytest.raises(ValueError, match="output layer has 408 tokens, the main model's 400"):
        SafeInferEngine(tiny_model_factory("llama", 0), tiny_tokenizer, unsafe_model=bigger)


def test_per_call_overrides_do_not_mutate_the_engine(engine: SafeInferEngine) -> None:
    config = engine.config
    engine.generate(CHAT, mode="sgds", alpha=0.5, plausibility=0.0, max_new_tokens=2)
    assert engine.config == config
    result = engine.generate(CHAT, mode="sa", scale=1.0, layer=2, max_new_tokens=2)[0]
    assert (result.safety.layer, result.safety.scale) == (2, 1.0)
    assert engine.vector is not None and (engine.vector.layer, engine.vector.scale) == (1, 3.0)


# ---------------------------------------------------------------------------------------- async
async def test_async_equals_sync_and_never_blocks_the_loop(engine: SafeInferEngine) -> None:
    import asyncio

    settings = {"mode": "safeinfer", "max_new_tokens": 16}
    expected = engine.generate(CHAT, **settings)[0]
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        assert (await engine.agenerate(CHAT, **settings))[0] == expected
        stream = engine.astream(CHAT, **settings)
        pieces = [piece async for piece in stream]
    finally:
        task.cancel()
    assert "".join(pieces) == expected.text and stream.generation == expected
    assert ticks > 16  # the loop kept running while the model computed in worker threads


async def test_async_stream_closed_early_stops_and_unhooks(engine: SafeInferEngine) -> None:
    stream = engine.astream(CHAT, mode="sa", max_new_tokens=50)
    await stream.__anext__()
    assert _hook_count(engine) == 1
    await stream.aclose()
    assert _hook_count(engine) == 0
    assert stream.generation is not None and stream.generation.finish_reason == "cancelled"
    with pytest.raises(ValueError, match="alpha must be in"):
        engine.astream(CHAT, alpha=2.0)  # bad settings fail at once, not at the first step


def test_final_assistant_prefix_is_continued(engine: SafeInferEngine, tiny_tokenizer: Any) -> None:
    prefix = [*CHAT, {"role": "assistant", "content": "Mix flour", "prefix": True}]
    text = tiny_tokenizer.decode(engine.formatter.encode(prefix))
    assert text.endswith("<|im_start|>assistant\nMix flour")  # no closing tag, no new turn
    unsafe = tiny_tokenizer.decode(engine.formatter.encode(prefix, unsafe_prompt="UNSAFE"))
    assert unsafe.startswith("<|im_start|>system\nUNSAFE") and unsafe.endswith("assistant\nMix flour")
    plain = tiny_tokenizer.decode(engine.formatter.encode([*CHAT, {"role": "assistant", "content": "Mix"}]))
    assert plain.endswith("<|im_start|>assistant\n")  # without the flag the turn is closed and a new one opened


def test_hidden_after_layer_matches_full_forward_and_unhooks(tiny_model_factory: Any, tiny_tokenizer: Any) -> None:
    from safeinfer_integrations.method.steering import hidden_after_layer

    model = tiny_model_factory("gpt2", 0)
    ids = torch.tensor([tiny_tokenizer("How do I bake bread?")["input_ids"]], device=model.device)
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True).hidden_states
        hooks_before = [dict(block._forward_hooks) for block in model.transformer.h]  # transformers' own, lazily added
        for layer in range(3):
            early = hidden_after_layer(model, layer, input_ids=ids)
            # hidden_states[layer + 1] is the output of decoder layer `layer` (the last one is after the final norm)
            if layer < 2:
                assert torch.allclose(early, full[layer + 1])
    assert [dict(block._forward_hooks) for block in model.transformer.h] == hooks_before


def test_gate_weight_is_reported_and_scales_steering(engine: SafeInferEngine) -> None:
    from safeinfer_integrations import HarmGate

    base = engine.vector
    assert base is not None
    direction = torch.randn(48, generator=torch.Generator().manual_seed(5))
    gated = SafeInferEngine(
        engine.model,
        engine.tokenizer,
        vector=SafetyVector(
            base.vector, layer=base.layer, scale=base.scale, gate=HarmGate(direction, layer=1, bias=-50.0)
        ),
    )
    off = gated.generate(CHAT, mode="sa", max_new_tokens=8, gate=False)[0]
    on = gated.generate(CHAT, mode="sa", max_new_tokens=8)[0]
    plain = gated.generate(CHAT, mode="vanilla", max_new_tokens=8)[0]
    assert on.safety.gate_weight is not None and on.safety.gate_weight < 1e-6  # bias -50: gate closed
    assert off.safety.gate_weight is None
    assert on.token_ids == plain.token_ids  # a closed gate leaves the request untouched


# ---------------------------------------------------------------------------------------------- cancellation
@pytest.mark.parametrize("mode", ["vanilla", "safeinfer"])
def test_a_cancelled_agenerate_stops_before_its_next_pass(engine: SafeInferEngine, mode: str) -> None:
    """``asyncio.wait_for(engine.agenerate(...), t)`` raises TimeoutError and at most one forward pass starts after
    it (the one already running finishes); the engine then serves the next call as if nothing happened."""
    slow = ForwardPasses(engine.model, 0.02)
    try:

        async def timed_out() -> float:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(engine.agenerate(CHAT, mode=mode, max_new_tokens=200), 0.15)
            return time.monotonic()

        cancelled_at = asyncio.run(timed_out())
        time.sleep(0.3)  # what would still run if the cancellation did not reach the loop (200 passes: 4 s)
        assert len(slow.starts) >= 3  # the call really was under way
        assert slow.after(cancelled_at) <= 1, slow.after(cancelled_at)
    finally:
        slow.handle.remove()
    assert _hook_count(engine) == 0
    assert engine.generate(CHAT, mode=mode, max_new_tokens=3)[0].usage.completion_tokens >= 1


def test_timeout_ends_generation_with_its_own_finish_reason(engine: SafeInferEngine) -> None:
    slow = ForwardPasses(engine.model, 0.02)
    try:
        begun = time.monotonic()
        [timed] = engine.generate(CHAT, mode="sa", max_new_tokens=200, timeout=0.2)
        took = time.monotonic() - begun
    finally:
        slow.handle.remove()
    assert timed.finish_reason == "timeout"
    assert 1 <= timed.usage.completion_tokens < 200
    assert took < 0.2 + 0.2  # at most one pass (and the bookkeeping) after the deadline
    [full] = engine.generate(CHAT, mode="sa", max_new_tokens=timed.usage.completion_tokens)
    assert list(full.token_ids) == list(timed.token_ids)  # the same tokens, cut short


def test_a_stream_closed_early_reports_cancelled(engine: SafeInferEngine) -> None:
    stream = engine.stream(CHAT, mode="sa", max_new_tokens=20, min_new_tokens=20)
    next(stream)
    stream.close()
    assert stream.generation is not None and stream.generation.finish_reason == "cancelled"
    unread = engine.stream(CHAT, mode="sa", max_new_tokens=20)
    unread.close()
    assert unread.generation is not None and unread.generation.finish_reason == "cancelled"
    assert _hook_count(engine) == 0


def test_a_complete_response_format_ends_even_before_min_new_tokens(engine: SafeInferEngine) -> None:
    """Once the format is complete only end-of-sequence is allowed: it ends the answer even if ``min_new_tokens``
    asked for more (the format wins), in every mode."""
    pytest.importorskip("llguidance")
    for mode in ("vanilla", "safeinfer"):
        [short] = engine.generate(
            CHAT, mode=mode, max_new_tokens=20, min_new_tokens=15, response_format={"type": "regex", "pattern": "ab"}
        )
        assert short.text == "ab" and short.finish_reason == "stop", short


def test_an_engine_without_a_vector_works_at_once(tiny_model_factory: Any, tiny_tokenizer: Any, tmp_path: Any) -> None:
    """No vector and no config: safety-guided decoding with the prompted expert, and one warning that says how to
    build a vector; the first call works. A config whose mode needs a vector fails at construction, not at the
    first call. Loading from a folder behaves the same."""
    model = tiny_model_factory("llama", 0)
    with pytest.warns(UserWarning, match="no safety vector for tiny: using mode='sgds'.*safeinfer build-vector"):
        engine = SafeInferEngine(model, tiny_tokenizer, model_name="tiny")
    assert (engine.config.mode, engine.config.unsafe_expert) == ("sgds", "prompted")
    [answer] = engine.generate(CHAT, max_new_tokens=2)
    assert answer.safety.mode == "sgds" and answer.usage.completion_tokens >= 1
    for config in (
        SafeInferConfig(),
        SafeInferConfig(mode="sa"),
        SafeInferConfig(mode="sgds", unsafe_expert="negated_vector"),
    ):
        with pytest.raises(InvalidSettingError, match="needs a safety vector, and none was given"):
            SafeInferEngine(model, tiny_tokenizer, config=config)
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="safeinfer build-vector --model"):
        loaded = SafeInferEngine.from_pretrained(tmp_path, dtype=torch.float64)
    assert loaded.generate(CHAT, max_new_tokens=2)[0].safety.mode == "sgds"
