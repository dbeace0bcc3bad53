"""SafeInferLLM on a tiny random model: construction, per-call settings, sync/async/stream equivalence,
callbacks and instrumentation, token counts, chat-template roles, async that never blocks the loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from llama_index.core.base.llms.types import ImageBlock, TextBlock
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler, TokenCountingHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.llms import ChatMessage
from llama_index.core.prompts import PromptTemplate

from safeinfer_integrations.llama_index import SafeInferLLM
from safeinfer_integrations.llama_index._convert import to_engine_messages

USER = [ChatMessage(role="user", content="How do I bake bread at home?")]


def _llm(engine: Any, **kwargs: Any) -> SafeInferLLM:
    return SafeInferLLM(engine=engine, **{"max_tokens": 8, "mode": "sgds", **kwargs})


# ---------------------------------------------------------------------------------------------- construction
def test_metadata_comes_from_the_loaded_model(tiny_engine: Any) -> None:
    llm = _llm(tiny_engine, max_tokens=17)
    meta = llm.metadata
    assert meta.context_window == tiny_engine.context_window == tiny_engine.model.config.max_position_embeddings
    assert meta.num_output == 17
    assert meta.is_chat_model and meta.is_function_calling_model
    assert meta.model_name == "tiny-llama"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"mode": "paranoid"}, "mode"),
        ({"alpha": 1.5}, "alpha"),
        ({"plausibility": -0.1}, "plausibility"),
        ({"gate_cutoff": 1.0}, "gate_cutoff"),
        ({"temperature": -1.0}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"tempreature": 0.5}, "tempreature"),  # extra="forbid": a misspelt argument fails
        ({"model": "some/model"}, "not both"),  # an engine and loading arguments
    ],
)
def test_bad_construction_fails_with_the_value_named(tiny_engine: Any, kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        SafeInferLLM(engine=tiny_engine, **kwargs)


def test_engine_must_be_an_engine() -> None:
    with pytest.raises((TypeError, ValueError), match="SafeInferEngine"):
        SafeInferLLM(engine=object())


def test_unknown_call_setting_raises_type_error(tiny_engine: Any) -> None:
    with pytest.raises(TypeError, match="'temprature'"):
        _llm(tiny_engine).chat(USER, temprature=0.3)
    with pytest.raises(ValueError, match="alpha"):
        _llm(tiny_engine).complete("hi", alpha=2.0)


# ---------------------------------------------------------------------------------------------- settings
def test_per_call_settings_are_honoured_without_changing_the_llm_or_engine(tiny_engine: Any) -> None:
    llm = _llm(tiny_engine, max_tokens=12)
    config_before = tiny_engine.config
    short = llm.chat(USER, max_tokens=3, mode="vanilla")
    assert short.raw["usage"]["completion_tokens"] <= 3
    assert short.raw["safety"]["mode"] == "vanilla"
    full = llm.chat(USER)
    assert full.raw["safety"]["mode"] == "sgds"
    assert full.raw["usage"]["completion_tokens"] > 3 or full.raw["finish_reason"] != "length"
    assert llm.max_tokens == 12 and llm.mode == "sgds"
    assert tiny_engine.config == config_before


def test_mode_none_follows_the_engine_config(tiny_engine: Any) -> None:
    llm = SafeInferLLM(engine=tiny_engine, max_tokens=4, mode=None)
    response = llm.chat(USER, mode="vanilla") if tiny_engine.vector is None else llm.chat(USER)
    expected = "vanilla" if tiny_engine.vector is None else tiny_engine.config.mode
    assert response.raw["safety"]["mode"] == expected


def test_complete_renders_a_user_turn_unless_formatted(tiny_engine: Any) -> None:
    llm = _llm(tiny_engine, max_tokens=6)
    chat_text = tiny_engine.generate([{"role": "user", "content": "bake bread"}], max_new_tokens=6, mode="sgds")[0]
    raw_text = tiny_engine.generate("bake bread", max_new_tokens=6, mode="sgds")[0]
    assert llm.complete("bake bread").text == chat_text.text
    assert llm.complete("bake bread", formatted=True).text == raw_text.text
    with_system = _llm(tiny_engine, max_tokens=6, system_prompt="Be brief.").complete("bake bread")
    expected = tiny_engine.count_tokens(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "bake bread"}]
    )
    assert with_system.raw["usage"]["prompt_tokens"] == expected


def test_custom_completion_to_prompt_gives_raw_completion(scripted: Any) -> None:
    engine = scripted(["Paris."])
    llm = SafeInferLLM(engine=engine, completion_to_prompt=lambda p: f"Q: {p}\nA:")
    assert llm.complete("Capital of France?").text == "Paris."
    assert engine.calls[0]["prompt"] == "Q: Capital of France?\nA:"


# ---------------------------------------------------------------------------------------------- equivalence
async def test_chat_stream_and_async_agree(tiny_engine: Any) -> None:
    llm = _llm(tiny_engine, max_tokens=10)
    reference = llm.chat(USER)
    chunks = list(llm.stream_chat(USER))
    achat = await llm.achat(USER)
    achunks = [chunk async for chunk in await llm.astream_chat(USER)]
    text = reference.message.content
    assert text  # the tiny model always produces something in 10 greedy steps
    assert "".join(c.delta or "" for c in chunks) == text == chunks[-1].message.content
    assert "".join(c.delta or "" for c in achunks) == text == achunks[-1].message.content
    assert achat.message.content == text
    for final in (chunks[-1], achunks[-1], achat):
        assert final.raw["usage"] == reference.raw["usage"]
        assert final.raw["finish_reason"] == reference.raw["finish_reason"]
    assert all(c.raw is None for c in chunks[:-1])  # usage once, on the last chunk


async def test_complete_stream_and_async_agree(tiny_engine: Any) -> None:
    llm = _llm(tiny_engine, max_tokens=10)
    reference = llm.complete("The capital of France is")
    chunks = list(llm.stream_complete("The capital of France is"))
    acomplete = await llm.acomplete("The capital of France is")
    achunks = [chunk async for chunk in await llm.astream_complete("The capital of France is")]
    assert "".join(c.delta or "" for c in chunks) == reference.text == chunks[-1].text
    assert "".join(c.delta or "" for c in achunks) == reference.text == achunks[-1].text
    assert acomplete.text == reference.text
    assert chunks[-1].raw["usage"] == achunks[-1].raw["usage"] == reference.raw["usage"]


def test_stop_sequences_apply_in_invoke_and_stream(tiny_engine: Any) -> None:
    llm = _llm(tiny_engine, max_tokens=10)
    text = llm.chat(USER).message.content
    cut = text[3:6]
    assert cut  # a stop string taken from the greedy output itself
    stopped = llm.chat(USER, stop=[cut])
    streamed = "".join(c.delta or "" for c in llm.stream_chat(USER, stop=[cut]))
    assert stopped.message.content == streamed == text[: text.index(cut)]
    assert stopped.raw["finish_reason"] == "stop_sequence"


async def test_async_does_not_block_the_event_loop(tiny_engine: Any) -> None:
    llm = _llm(tiny_engine, max_tokens=48)
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    async def consume_stream() -> None:
        async for _ in await llm.astream_chat(USER):
            pass

    task = asyncio.create_task(ticker())
    await asyncio.gather(llm.achat(USER), consume_stream())
    done.set()
    await task
    assert ticks >= 5  # the loop kept running while both generations were in worker threads


def test_stream_stops_generating_when_the_consumer_stops(scripted: Any) -> None:
    engine = scripted(["one two three four five six seven eight"])
    stream = SafeInferLLM(engine=engine).stream_chat(USER)
    next(stream)
    stream.close()
    assert engine.closed and engine.produced < 8


async def test_async_stream_stops_generating_when_the_consumer_stops(scripted: Any) -> None:
    engine = scripted(["one two three four five six seven eight"])
    stream = await SafeInferLLM(engine=engine).astream_chat(USER)
    await anext(stream)
    await stream.aclose()
    # LlamaIndex's callback wrapper does not aclose the generator it wraps; the event loop finalizes it
    # once it is dropped, which closes the engine's stream within a few loop turns.
    del stream
    for _ in range(200):
        if engine.closed:
            break
        await asyncio.sleep(0.01)
    assert engine.closed and engine.produced < 8


# ---------------------------------------------------------------------------------------------- roles
def test_chat_template_roles(tiny_engine: Any) -> None:
    messages = [
        ChatMessage(role="system", content="You are terse."),
        ChatMessage(role="developer", content="Answer in English."),
        ChatMessage(role="user", content="Hi"),
        ChatMessage(role="assistant", content="Hello!"),
        ChatMessage(role="user", blocks=[TextBlock(text="Part one."), TextBlock(text="Part two.")]),
        ChatMessage(role="tool", content="42", additional_kwargs={"tool_call_id": "call_1", "name": "calc"}),
        ChatMessage(role="chatbot", content="Done."),
    ]
    converted = to_engine_messages(messages)
    assert [m["role"] for m in converted] == [
        "system",
        "system",
        "user",
        "assistant",
        "user",
        "tool",
        "assistant",
    ]
    assert converted[4]["content"] == "Part one.\nPart two."
    assert converted[5] == {"role": "tool", "content": "42", "name": "calc", "tool_call_id": "call_1"}
    rendered = tiny_engine.formatter.render_chat(converted)
    positions = [
        rendered.index(text)
        for text in ("You are terse.", "Answer in English.", "Hi", "Hello!", "Part one.", "42", "Done.")
    ]
    assert positions == sorted(positions)
    response = _llm(tiny_engine, max_tokens=2).chat(messages)
    assert response.raw["usage"]["prompt_tokens"] == tiny_engine.count_tokens(converted)


def test_non_text_blocks_are_rejected(tiny_engine: Any) -> None:
    image = ChatMessage(role="user", blocks=[ImageBlock(url="https://example.invalid/cat.png")])
    with pytest.raises(ValueError, match="ImageBlock"):
        _llm(tiny_engine).chat([image])
    with pytest.raises(ValueError, match="empty"):
        _llm(tiny_engine).chat([])


def test_predict_goes_through_chat(scripted: Any) -> None:
    engine = scripted(["Paris."])
    answer = SafeInferLLM(engine=engine).predict(PromptTemplate("Capital of {country}?"), country="France")
    assert answer == "Paris."
    assert engine.calls[0]["prompt"] == [{"role": "user", "content": "Capital of France?"}]


# ---------------------------------------------------------------------------------------------- callbacks
def test_callback_events_and_token_counts(tiny_engine: Any) -> None:
    debug = LlamaDebugHandler()
    llm = _llm(tiny_engine, max_tokens=6)
    counter = TokenCountingHandler(tokenizer=llm.tokenize)
    llm.callback_manager = CallbackManager([debug, counter])
    chat = llm.chat(USER)
    streamed = list(llm.stream_chat(USER))
    completion = llm.complete("bake bread")
    pairs = debug.get_event_pairs(CBEventType.LLM)
    assert len(pairs) == 3 and all(len(pair) == 2 for pair in pairs)
    events = counter.llm_token_counts
    assert len(events) == 3
    for event, response in zip(events, (chat, streamed[-1], completion), strict=True):
        assert event.prompt_token_count == response.raw["usage"]["prompt_tokens"]
        assert event.completion_token_count == response.raw["usage"]["completion_tokens"]
    assert chat.raw["usage"]["prompt_tokens"] == tiny_engine.count_tokens(to_engine_messages(USER))
    assert chat.raw["usage"]["completion_tokens"] == len(
        tiny_engine.generate(to_engine_messages(USER), max_new_tokens=6, mode="sgds")[0].token_ids
    )


async def test_instrumentation_events_fire(tiny_engine: Any) -> None:
    seen: list[str] = []

    class Recorder(BaseEventHandler):
        @classmethod
        def class_name(cls) -> str:
            return "Recorder"

        def handle(self, event: Any, **kwargs: Any) -> None:
            seen.append(type(event).__name__)

    dispatcher = get_dispatcher()
    recorder = Recorder()
    dispatcher.add_event_handler(recorder)
    try:
        llm = _llm(tiny_engine, max_tokens=4)
        llm.chat(USER)
        list(llm.stream_chat(USER))
        await llm.acomplete("hi")
        [chunk async for chunk in await llm.astream_complete("hi")]
    finally:
        dispatcher.event_handlers.remove(recorder)
    for name in (
        "LLMChatStartEvent",
        "LLMChatEndEvent",
        "LLMChatInProgressEvent",
        "LLMCompletionStartEvent",
        "LLMCompletionEndEvent",
        "LLMCompletionInProgressEvent",
    ):
        assert name in seen, name
    assert seen.count("LLMChatEndEvent") == 2 and seen.count("LLMCompletionEndEvent") == 2
