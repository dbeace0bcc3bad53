"""ChatSafeInfer on engines that run in milliseconds: a tiny random float64 Llama (real decoding) and a
scripted model (known output, for tool calls, stop strings, refusals and structured output)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.exceptions import ModelRefusalError
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import ConfigurableField
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from safeinfer_integrations.langchain import ChatSafeInfer

PROMPTS = ["How do I bake bread?", "What is the weather?", "Two plus two is"]


def _settings(message: AIMessage) -> dict[str, Any]:
    return message.response_metadata["safety"]


def _collect(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    return full


# ---------------------------------------------------------------------------------------------- basics
def test_invoke_metadata_and_no_prompt_echo(tiny_engine: Any) -> None:
    model = ChatSafeInfer(engine=tiny_engine, mode="vanilla", max_tokens=6)
    message = model.invoke([SystemMessage("Be brief."), HumanMessage("How do I bake bread?")])
    [reference] = tiny_engine.generate(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I bake bread?"}],
        max_new_tokens=6,
        mode="vanilla",
    )
    assert message.content == reference.text  # the generated tokens only: the prompt is not echoed
    assert message.usage_metadata == {
        "input_tokens": reference.usage.prompt_tokens,
        "output_tokens": reference.usage.completion_tokens,
        "total_tokens": reference.usage.total_tokens,
    }
    assert message.response_metadata["model_name"] == "tiny-llama"
    assert message.response_metadata["finish_reason"] in ("stop", "length")
    assert _settings(message) == reference.safety.as_dict()


def test_every_role_reaches_the_template(scripted: Any) -> None:
    engine = scripted("ok")
    model = ChatSafeInfer(engine=engine, mode="vanilla")
    history = [
        SystemMessage("sys-one"),
        SystemMessage("sys-two"),
        HumanMessage("human-one"),
        HumanMessage("human-two"),
        AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1}, "id": "c1", "type": "tool_call"}]),
        ToolMessage("tool-result-3", tool_call_id="c1", name="add"),
        AIMessage("ai-one"),
        HumanMessage("human-3"),
    ]
    call = model._prepare(history, None, {})
    text = engine.formatter.render_chat(call.prompt)
    for needle in (
        "sys-one",
        "sys-two",
        "human-one",
        "human-two",
        "tool-result-3",
        "ai-one",
        "human-3",
        '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>',
    ):
        assert needle in text
    assert text.index("human-two") < text.index("tool-result-3") < text.index("ai-one") < text.index("human-3")
    assert model.invoke(history).content == "ok"


def test_non_text_content_is_rejected_clearly(tiny_engine: Any) -> None:
    model = ChatSafeInfer(engine=tiny_engine, mode="vanilla", max_tokens=2)
    image = HumanMessage(
        [{"type": "text", "text": "what is this"}, {"type": "image", "url": "https://example.com/x.png"}]
    )
    with pytest.raises(ValueError, match="block 1 has type 'image'.*text only"):
        model.invoke([image])


def test_bad_settings_fail_at_construction_and_per_call(tiny_engine: Any) -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        ChatSafeInfer(engine=tiny_engine, mode="safest")
    with pytest.raises(ValueError, match="alpha"):
        ChatSafeInfer(engine=tiny_engine, alpha=1.5)
    with pytest.raises(ValueError, match=r"gate_cutoff must be in \[0, 1\)"):
        ChatSafeInfer(engine=tiny_engine, gate_cutoff=1.5)
    assert ChatSafeInfer(engine=tiny_engine, gate_cutoff=0.3)._identifying_params["gate_cutoff"] == 0.3
    with pytest.raises(ValueError, match="temperature"):
        ChatSafeInfer(engine=tiny_engine, temperature=-1)
    with pytest.raises(ValueError, match="extra"):
        ChatSafeInfer(engine=tiny_engine, tempreature=0.5)
    model = ChatSafeInfer(engine=tiny_engine, mode="vanilla", max_tokens=2)
    with pytest.raises(TypeError, match="'tempreature'.*per-call settings are"):
        model.invoke("hi", tempreature=0.3)
    with pytest.raises(ValueError, match="mode must be one of"):
        model.invoke("hi", mode="safest")


def test_model_alias_and_default_settings_follow_the_engine(tiny_engine: Any) -> None:
    model = ChatSafeInfer(engine=tiny_engine, model="tiny-llama", max_tokens=3)
    assert model.model_name == "tiny-llama"
    assert model.mode is None  # follows the engine's config: no mode is hard-coded here
    message = model.invoke("hi", mode="sgds")
    assert _settings(message)["mode"] == "sgds"


# ---------------------------------------------------------------------------------------------- batch
def test_batch_equals_single_invokes(tiny_engine: Any) -> None:
    model = ChatSafeInfer(engine=tiny_engine, mode="sgds", max_tokens=8)
    batched = model.batch(PROMPTS)
    singles = [model.invoke(prompt) for prompt in PROMPTS]
    assert [m.content for m in batched] == [m.content for m in singles]
    assert [m.usage_metadata for m in batched] == [m.usage_metadata for m in singles]
    assert [_settings(m) for m in batched] == [_settings(m) for m in singles]


def test_batch_is_one_generation(scripted: Any) -> None:
    engine = scripted("one two three")
    model = ChatSafeInfer(engine=engine, mode="vanilla")
    model.invoke("a")
    single_calls = engine.model.calls
    engine.model.calls = 0
    results = model.batch(["a", "b", "c", "d"])
    assert [m.content for m in results] == ["one two three"] * 4
    assert engine.model.calls == single_calls  # four inputs, the forward passes of one


def test_batch_with_mixed_settings_and_callbacks(tiny_engine: Any) -> None:
    class Counter(BaseCallbackHandler):
        def __init__(self) -> None:
            self.starts = 0
            self.ends = 0

        def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
            self.starts += 1

        def on_llm_end(self, *args: Any, **kwargs: Any) -> None:
            self.ends += 1

    counter = Counter()
    model = ChatSafeInfer(engine=tiny_engine, mode="vanilla", max_tokens=5)
    vanilla = model.batch(PROMPTS, config={"callbacks": [counter]})
    mixed = model.batch(PROMPTS, config=[{}, {"max_concurrency": None}, {}], mode="sgds")
    assert counter.starts == counter.ends == len(PROMPTS)  # every input is its own run
    assert all(_settings(m)["mode"] == "vanilla" for m in vanilla)
    assert all(_settings(m)["mode"] == "sgds" for m in mixed)
    assert [m.content for m in mixed] == [model.invoke(p, mode="sgds").content for p in PROMPTS]


def test_batch_return_exceptions(tiny_engine: Any) -> None:
    model = ChatSafeInfer(engine=tiny_engine, mode="vanilla", max_tokens=3)
    results = model.batch(["hi", [HumanMessage([{"type": "image", "url": "x"}])], "yo"], return_exceptions=True)
    assert isinstance(results[1], ValueError)
    assert isinstance(results[0], AIMessage) and isinstance(results[2], AIMessage)
    assert results[0].content == model.invoke("hi").content


async def test_abatch_equals_batch_and_is_one_generation(scripted: Any, tiny_engine: Any) -> None:
    model = ChatSafeInfer(engine=tiny_engine, mode="sgds", max_tokens=8)
    assert [m.content for m in await model.abatch(PROMPTS)] == [m.content for m in model.batch(PROMPTS)]
    engine = scripted("x y")
    scripted_model = ChatSafeInfer(engine=engine, mode="vanilla")
    await scripted_model.ainvoke("a")
    single_calls, engine.model.calls = engine.model.calls, 0
    await scripted_model.abatch(["a", "b", "c"])
    assert engine.model.calls == single_calls


# ---------------------------------------------------------------------------------------------- stream / async
def test_stream_equals_invoke(tiny_engine: Any) -> None:
    model = ChatSafeInfer(engine=tiny_engine, mode="sgds", max_tokens=10)
    for prompt in PROMPTS:
        chunks = list(model.stream(prompt))
        invoked = model.invoke(prompt)
        full = _collect(chunks)
        assert full.content == invoked.content
        assert full.usage_metadata == invoked.usage_metadata
        assert chunks[-1].chunk_position == "last"
        assert sum(1 for c in chunks if c.usage_metadata) == 1  # usage (input tokens) on one chunk only
        for key in ("model_name", "finish_reason", "safety"):
            assert full.response_metadata[key] == invoked.response_metadata[key]


def test_streaming_flag_feeds_callbacks(tiny_engine: Any) -> None:
    class Tokens(BaseCallbackHandler):
        def __init__(self) -> None:
            self.tokens: list[str] = []

        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            self.tokens.append(token)

    handler = Tokens()
    model = ChatSafeInfer(engine=tiny_engine, mode="vanilla", max_tokens=8, streaming=True)
    message = model.invoke("How do I bake bread?", config={"callbacks": [handler]})
    assert "".join(handler.tokens) == message.content
    assert len([t for t in handler.tokens if t]) >= 2


async def test_async_equals_sync(tiny_engine: Any) -> None:
    model = ChatSafeInfer(engine=tiny_engine, mode="sgds", max_tokens=8)
    for prompt in PROMPTS[:2]:
        sync = model.invoke(prompt)
        asynced = await model.ainvoke(prompt)
        chunks = [chunk async for chunk in model.astream(prompt)]
        assert asynced.content == sync.content == _collect(chunks).content
        assert asynced.usage_metadata == sync.usage_metadata
        assert _settings(asynced) == _settings(sync)


async def test_async_does_not_block_the_event_loop(scripted: Any) -> None:
    engine = scripted("word " * 30)
    model = ChatSafeInfer(engine=engine, mode="vanilla")
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await model.ainvoke("go")
    async for _ in model.astream("go"):
        pass
    stop.set()
    await task
    assert ticks > 30  # the loop kept running while tokens were generated in worker threads


def test_early_stopped_stream_stops_generation(scripted: Any) -> None:
    engine = scripted("word " * 200)
    model = ChatSafeInfer(engine=engine, mode="vanilla", max_tokens=200)
    stream = model.stream("go")
    next(stream)
    next(stream)
    stream.close()
    calls = engine.model.calls
    assert calls < 20
    assert model.invoke("go", max_tokens=3).content == "word word word"  # the engine is free and fine
    assert engine.model.calls - calls == 3


async def test_early_stopped_async_stream_stops_generation(scripted: Any) -> None:
    engine = scripted("word " * 200)
    model = ChatSafeInfer(engine=engine, mode="vanilla", max_tokens=200)
    stream = model.astream("go")
    await stream.__anext__()
    await stream.aclose()
    await asyncio.sleep(0.2)  # a step that was in flight finishes; nothing after it
    calls = engine.model.calls
    await asyncio.sleep(0.2)
    assert engine.model.calls == calls < 20
    assert (await model.ainvoke("go", max_tokens=2)).content == "word word"


# ---------------------------------------------------------------------------------------------- overrides
def test_per_call_overrides_never_touch_the_shared_engine(tiny_engine: Any) -> None:
    before = tiny_engine.config
    model = ChatSafeInfer(engine=tiny_engine, mode="vanilla", max_tokens=4)
    bound = model.bind(mode="sgds", alpha=0.5, max_tokens=2)
    message = bound.invoke("hi")
    assert _settings(message)["mode"] == "sgds" and _settings(message)["alpha"] == 0.5
    assert message.usage_metadata["output_tokens"] <= 2
    assert _settings(model.invoke("hi"))["mode"] == "vanilla"
    assert tiny_engine.config == before and model.mode == "vanilla"


def test_configurable_fields(tiny_engine: Any) -> None:
    model = ChatSafeInfer(engine=tiny_engine, mode="vanilla", max_tokens=4).configurable_fields(
        mode=ConfigurableField(id="safety_mode"), max_tokens=ConfigurableField(id="max_tokens")
    )
    message = model.invoke("hi", config={"configurable": {"safety_mode": "sgds", "max_tokens": 2}})
    assert _settings(message)["mode"] == "sgds" and message.usage_metadata["output_tokens"] <= 2
    assert _settings(model.invoke("hi"))["mode"] == "vanilla"


def test_concurrent_invokes_with_different_safety_settings_are_isolated(tiny_engine: Any) -> None:
    model = ChatSafeInfer(engine=tiny_engine, max_tokens=8)
    plans = [("vanilla", 0.99), ("sgds", 0.99), ("sgds", 0.5), ("vanilla", 0.99)] * 2
    expected = {plan: model.invoke(PROMPTS[0], mode=plan[0], alpha=plan[1]) for plan in set(plans)}
    results: dict[int, AIMessage] = {}
    barrier = threading.Barrier(len(plans))

    def run(index: int) -> None:
        barrier.wait()
        mode, alpha = plans[index]
        results[index] = model.invoke(PROMPTS[0], mode=mode, alpha=alpha)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(plans))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, plan in enumerate(plans):
        assert results[index].content == expected[plan].content
        assert _settings(results[index]) == _settings(expected[plan])


# ---------------------------------------------------------------------------------------------- stop strings
@pytest.mark.parametrize("stop", [["lo wor"], ["xyz", "o w"], ["world"]])
def test_stop_strings_spanning_tokens(scripted: Any, smol_tokenizer: Any, stop: list[str]) -> None:
    text = "Hello world, hello moon"
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 4
    engine = scripted(text)
    model = ChatSafeInfer(engine=engine, mode="vanilla")
    cut = min(text.find(s) for s in stop if s in text)
    invoked = model.invoke("x", stop=stop)
    streamed = _collect(list(model.stream("x", stop=stop)))
    from_field = ChatSafeInfer(engine=engine, mode="vanilla", stop=stop).invoke("x")
    for message in (invoked, streamed, from_field):
        assert message.content == text[:cut]
        assert message.response_metadata["finish_reason"] == "stop_sequence"
    assert model.invoke("x").content == text  # no stop: the whole text


def test_stop_string_spans_tokens_on_a_real_tokenizer(smol_tokenizer: Any) -> None:
    # The stop strings above really are multi-token: no single token of the script contains them.
    pieces = [
        smol_tokenizer.decode([i])
        for i in smol_tokenizer("Hello world, hello moon", add_special_tokens=False)["input_ids"]
    ]
    for stop in ("lo wor", "o w"):
        assert not any(stop in piece for piece in pieces)


# ---------------------------------------------------------------------------------------------- tools
@tool
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return f"It is sunny in {city}."


@tool
def magic_number() -> int:
    """A number."""
    return 5


TOOL_REPLY = 'Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def _check_call(message: AIMessage, name: str = "get_weather", args: dict[str, Any] | None = None) -> None:
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call["name"] == name and call["args"] == (args if args is not None else {"city": "Paris"})
    assert call["id"] and call["type"] == "tool_call"
    blocks = [b for b in message.content_blocks if b["type"] == "tool_call"]
    assert len(blocks) == 1 and blocks[0]["name"] == name


@pytest.mark.parametrize(
    "reply",
    [
        TOOL_REPLY,
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        '```json\n{"name": "get_weather", "parameters": {"city": "Paris"}}\n```',
    ],
)
def test_tool_calls_are_parsed_in_invoke_stream_and_async(scripted: Any, reply: str) -> None:
    model = ChatSafeInfer(engine=scripted(reply), mode="sgds").bind_tools([get_weather])
    invoked = model.invoke("Weather in Paris?")
    _check_call(invoked)
    streamed = _collect(list(model.stream("Weather in Paris?")))
    _check_call(streamed)
    assert streamed.content == invoked.content == ("Let me check." if reply == TOOL_REPLY else "")
    asynced = asyncio.run(model.ainvoke("Weather in Paris?"))
    _check_call(asynced)
    assert model.batch(["a", "b"])[1].tool_calls[0]["args"] == {"city": "Paris"}
    assert invoked.response_metadata["safety"]["mode"] == "sgds"  # SafeInfer ran on the tool step too


def test_tool_prompt_describes_bound_tools_and_choice(scripted: Any) -> None:
    engine = scripted("ok")
    model = ChatSafeInfer(engine=engine, mode="vanilla")
    bound = model.bind_tools([get_weather, magic_number], tool_choice="magic_number")
    call = model._prepare([HumanMessage("hi")], None, bound.kwargs)  # type: ignore[attr-defined]
    system = call.prompt[0]["content"]
    assert call.prompt[0]["role"] == "system"
    assert "get_weather" in system and "Current weather in a city." in system and "<tool_call>" in system
    assert "You must call the tool magic_number now." in system
    assert call.tools is None  # SmolLM2's template ignores tools: the fallback prompt carries them
    with pytest.raises(ValueError, match="tool_choice.*'nope'"):
        model.bind_tools([get_weather], tool_choice="nope")


def test_text_reply_with_tools_bound_is_plain_content(scripted: Any) -> None:
    reply = "Paris is sunny today {probably} and < 30 degrees."
    model = ChatSafeInfer(engine=scripted(reply), mode="vanilla").bind_tools([get_weather])
    invoked = model.invoke("hi")
    chunks = list(model.stream("hi"))
    assert invoked.content == _collect(chunks).content == reply
    assert invoked.tool_calls == []
    assert chunks[0].content == "Paris"  # text before a possible call streams as it comes


def test_malformed_tool_call_stays_content(scripted: Any) -> None:
    reply = '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'
    message = ChatSafeInfer(engine=scripted(reply), mode="vanilla").bind_tools([get_weather]).invoke("hi")
    assert message.tool_calls == [] and message.content == reply


def test_tool_messages_in_history_and_agent_loop(scripted: Any) -> None:
    model = ChatSafeInfer(engine=scripted(TOOL_REPLY), mode="vanilla").bind_tools([get_weather])
    question = HumanMessage("What is the weather in Paris?")
    step = model.invoke([question])
    result = get_weather.invoke(step.tool_calls[0])
    assert isinstance(result, ToolMessage) and result.tool_call_id == step.tool_calls[0]["id"]
    final_engine = scripted("It is sunny in Paris.")
    final = ChatSafeInfer(engine=final_engine, mode="vanilla").bind_tools([get_weather])
    history = [question, step, result]
    answer = final.invoke(history)
    assert answer.content == "It is sunny in Paris." and answer.tool_calls == []
    rendered = final_engine.formatter.render_chat(final.bound._prepare(history, None, final.kwargs).prompt)  # type: ignore[attr-defined]
    assert "It is sunny in Paris." in rendered and '"city": "Paris"' in rendered


def test_tool_call_without_arguments(scripted: Any) -> None:
    model = ChatSafeInfer(
        engine=scripted('<tool_call>{"name": "magic_number", "arguments": {}}</tool_call>'), mode="vanilla"
    ).bind_tools([magic_number], tool_choice="any")
    _check_call(model.invoke("hi"), name="magic_number", args={})
    _check_call(_collect(list(model.stream("hi"))), name="magic_number", args={})


def test_unicode_tool_arguments(scripted: Any) -> None:
    reply = '<tool_call>{"name": "get_weather", "arguments": {"city": "東京"}}</tool_call>'
    model = ChatSafeInfer(engine=scripted(reply), mode="vanilla").bind_tools([get_weather])
    _check_call(model.invoke("hi"), args={"city": "東京"})
    _check_call(_collect(list(model.stream("hi"))), args={"city": "東京"})


# ---------------------------------------------------------------------------------------------- structured output
class Person(BaseModel):
    """A person."""

    name: str = Field(description="The person's name")
    age: int = Field(description="Age in years")


PERSON = '{"name": "Ada", "age": 36}'


@pytest.mark.parametrize("method", ["json_schema", "json_mode", "function_calling"])
def test_structured_output(scripted: Any, method: str) -> None:
    reply = (
        PERSON
        if method != "function_calling"
        else (f'<tool_call>{{"name": "Person", "arguments": {PERSON}}}</tool_call>')
    )
    model = ChatSafeInfer(engine=scripted(reply), mode="sgds")
    structured = model.with_structured_output(Person, method=method)  # type: ignore[arg-type]
    assert structured.invoke("Who?") == Person(name="Ada", age=36)
    as_dict = model.with_structured_output(Person.model_json_schema(), method=method)  # type: ignore[arg-type]
    assert as_dict.invoke("Who?") == {"name": "Ada", "age": 36}
    raw = model.with_structured_output(Person, method=method, include_raw=True).invoke("Who?")  # type: ignore[arg-type]
    assert raw["parsed"] == Person(name="Ada", age=36) and raw["parsing_error"] is None
    assert isinstance(raw["raw"], AIMessage)


def test_structured_output_puts_the_schema_in_the_prompt(scripted: Any) -> None:
    model = ChatSafeInfer(engine=scripted(PERSON), mode="vanilla")
    bound = model.with_structured_output(Person).first  # type: ignore[attr-defined]
    call = model._prepare(
        [HumanMessage("Who?")], None, {k: v for k, v in bound.kwargs.items() if k != "ls_structured_output_format"}
    )
    assert '"age"' in call.prompt[0]["content"] and "JSON" in call.prompt[0]["content"]


def test_structured_output_bad_json_and_bad_method(scripted: Any) -> None:
    model = ChatSafeInfer(engine=scripted("not json at all"), mode="vanilla")
    raw = model.with_structured_output(Person, include_raw=True).invoke("Who?")
    assert raw["parsed"] is None and raw["parsing_error"] is not None
    with pytest.raises(ValueError, match="method must be"):
        model.with_structured_output(Person, method="xml")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- refusals
def test_refusal_is_marked_with_the_standard_block(scripted: Any) -> None:
    refusal = "I can't help with that request."
    model = ChatSafeInfer(engine=scripted(refusal), mode="vanilla")
    message = model.invoke("something harmful")
    assert message.content == refusal
    blocks = message.content_blocks
    assert blocks[0] == {"type": "text", "text": refusal}
    assert blocks[-1]["type"] == "refusal" and blocks[-1]["refusal"] == refusal
    assert message.response_metadata["refusal"]["phrase"] == "i can't"
    assert _collect(list(model.stream("x"))).content_blocks[-1]["type"] == "refusal"
    # structured output keeps a refusal branch for the requests SafeInfer protects (here: sgds, no gate)
    protected = ChatSafeInfer(engine=scripted(refusal), mode="sgds")
    for method in ("json_schema", "json_mode", "function_calling"):
        with pytest.raises(ModelRefusalError):
            protected.with_structured_output(Person, method=method).invoke("x")
    assert (model | StrOutputParser()).invoke("x") == refusal  # plain text chains are unaffected
    quiet = ChatSafeInfer(engine=scripted(refusal), mode="vanilla", detect_refusals=False).invoke("x")
    assert "refusal" not in quiet.response_metadata
    assert all(b["type"] != "refusal" for b in quiet.content_blocks)


def test_answers_are_not_marked_as_refusals(scripted: Any) -> None:
    message = ChatSafeInfer(engine=scripted("Sure, here is bread."), mode="vanilla").invoke("x")
    assert "refusal" not in message.response_metadata
    assert [b["type"] for b in message.content_blocks] == ["text"]


# ---------------------------------------------------------------------------------------------- metadata
def test_token_counting_is_offline_and_matches_the_engine(tiny_engine: Any) -> None:
    model = ChatSafeInfer(engine=tiny_engine, mode="vanilla", max_tokens=3)
    messages = [SystemMessage("Be brief."), HumanMessage("How do I bake bread?")]
    assert model.get_num_tokens_from_messages(messages) == model.invoke(messages).usage_metadata["input_tokens"]
    assert model.get_token_ids("bread") == list(tiny_engine.tokenizer("bread", add_special_tokens=False)["input_ids"])
    assert model.get_num_tokens("bread") == len(model.get_token_ids("bread"))


def test_tool_prompt_is_counted(scripted: Any) -> None:
    model = ChatSafeInfer(engine=scripted("ok"), mode="vanilla")
    messages = [HumanMessage("hi")]
    with_tools = model.get_num_tokens_from_messages(messages, tools=[get_weather])
    assert with_tools > model.get_num_tokens_from_messages(messages) + 20
    assert with_tools == model.bind_tools([get_weather]).invoke(messages).usage_metadata["input_tokens"]


def test_profile_and_tracing_params_come_from_the_loaded_model(tiny_engine: Any) -> None:
    model = ChatSafeInfer(engine=tiny_engine, mode="vanilla", max_tokens=7, temperature=0.5, stop=["x"])
    assert model.profile is not None
    assert model.profile["max_input_tokens"] == tiny_engine.context_window == 256
    assert model.profile["tool_calling"] and not model.profile["image_inputs"]
    params = model._get_ls_params()
    assert params == {
        "ls_provider": "safeinfer",
        "ls_model_name": "tiny-llama",
        "ls_model_type": "chat",
        "ls_temperature": 0.5,
        "ls_max_tokens": 7,
        "ls_stop": ["x"],
    }
    assert model._get_ls_params(model="other")["ls_model_name"] == "other"
    assert model._identifying_params["model_name"] == "tiny-llama"


def test_lcel_chain(tiny_engine: Any) -> None:
    prompt = ChatPromptTemplate.from_messages([("system", "You are brief."), ("human", "{question}")])
    model = ChatSafeInfer(engine=tiny_engine, mode="sgds", max_tokens=6)
    chain = prompt | model | StrOutputParser()
    answer = chain.invoke({"question": "How do I bake bread?"})
    direct = model.invoke([SystemMessage("You are brief."), HumanMessage("How do I bake bread?")])
    assert answer == direct.content
    assert chain.batch([{"question": q} for q in PROMPTS]) == [chain.invoke({"question": q}) for q in PROMPTS]
    assert "".join(chain.stream({"question": "How do I bake bread?"})) == answer


def test_json_in_tool_messages_round_trips(scripted: Any) -> None:
    engine = scripted("done")
    model = ChatSafeInfer(engine=engine, mode="vanilla")
    history = [
        HumanMessage("add"),
        AIMessage(
            [{"type": "text", "text": "some text"}, {"type": "tool_use", "id": "a", "name": "add", "input": {"a": 1}}],
            tool_calls=[{"name": "add", "args": {"a": 1}, "id": "a"}],
        ),
        ToolMessage(json.dumps({"result": 3}), tool_call_id="a", status="error"),
    ]
    text = engine.formatter.render_chat(model._prepare(history, None, {}).prompt)
    assert "some text" in text and '{"result": 3}' in text
    assert model.invoke(history).content == "done"


def test_output_version_v1_with_tool_calls_and_refusals(scripted: Any) -> None:
    model = ChatSafeInfer(engine=scripted(TOOL_REPLY), mode="vanilla", output_version="v1").bind_tools([get_weather])
    invoked = model.invoke("hi")
    _check_call(invoked)
    assert [b["type"] for b in invoked.content] == ["text", "tool_call"]  # type: ignore[index]
    streamed = _collect(list(model.stream("hi")))
    _check_call(streamed)
    assert streamed.text == invoked.text == "Let me check."
    refusal = ChatSafeInfer(engine=scripted("I won't do that."), mode="vanilla", output_version="v1")
    message = refusal.invoke("x")
    assert [b["type"] for b in message.content] == ["text", "refusal"]  # type: ignore[index]
    assert _collect(list(refusal.stream("x"))).content_blocks[-1]["type"] == "refusal"


def test_tracing_records_one_run_per_input_with_settings(tiny_engine: Any) -> None:
    from langchain_core.tracers.context import collect_runs

    model = ChatSafeInfer(engine=tiny_engine, mode="vanilla", max_tokens=3)
    with collect_runs() as collector:
        model.batch(PROMPTS[:2], mode="sgds")
    runs = collector.traced_runs
    assert len(runs) == 2
    for run in runs:
        assert run.extra["metadata"]["ls_provider"] == "safeinfer"
        assert run.extra["metadata"]["ls_model_name"] == "tiny-llama"
        assert run.extra["invocation_params"]["mode"] == "sgds"  # the per-call override
        assert run.extra["invocation_params"]["max_tokens"] == 3
        message = run.outputs["generations"][0][0]["message"]["kwargs"]  # type: ignore[index]  (serialized)
        assert message["response_metadata"]["safety"]["mode"] == "sgds"
        assert message["usage_metadata"]["output_tokens"] <= 3
