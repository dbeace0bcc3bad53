"""ChatSafeInfer on the real default model (SmolLM2-135M-Instruct): the properties of our own that matter
most, kept short (8 new tokens) because this is CPU time."""

from __future__ import annotations

import asyncio

from langchain_core.messages import AIMessageChunk

from safeinfer_integrations.langchain import ChatSafeInfer

QUESTIONS = ["What is the capital of France?", "Give me one tip for baking bread."]


def test_batch_stream_async_agree_with_invoke_on_the_default_model() -> None:
    model = ChatSafeInfer(max_tokens=8, mode="sgds")
    singles = [model.invoke(q) for q in QUESTIONS]
    assert all(m.content for m in singles)
    batched = model.batch(QUESTIONS)
    assert [m.content for m in batched] == [m.content for m in singles]
    assert [m.usage_metadata for m in batched] == [m.usage_metadata for m in singles]
    chunks = list(model.stream(QUESTIONS[0]))
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert isinstance(full, AIMessageChunk) and full.content == singles[0].content
    assert asyncio.run(model.ainvoke(QUESTIONS[1])).content == singles[1].content
    for message in singles:
        assert message.response_metadata["model_name"] == "SmolLM2-135M-Instruct"
        assert message.response_metadata["safety"]["mode"] == "sgds"
        assert message.usage_metadata["output_tokens"] <= 8


def test_multi_token_stop_on_the_default_model() -> None:
    model = ChatSafeInfer(max_tokens=8, mode="vanilla")
    full = model.invoke(QUESTIONS[0]).content
    assert isinstance(full, str) and len(full) > 6
    tokenizer = model._resolve_engine(None).tokenizer
    # A stop string made of the end of one generated token and the start of the next.
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    first = tokenizer.decode(ids[:1])
    second = tokenizer.decode(ids[:2])
    stop = second[len(first) - 1 : len(first) + 1]
    assert len(stop) == 2 and not any(stop in tokenizer.decode([i]) for i in ids[:2])
    cut = full.find(stop)
    stopped = model.invoke(QUESTIONS[0], stop=[stop])
    streamed = "".join(str(c.content) for c in model.stream(QUESTIONS[0], stop=[stop]))
    assert stopped.content == streamed == full[:cut]
    assert stopped.response_metadata["finish_reason"] == "stop_sequence"
