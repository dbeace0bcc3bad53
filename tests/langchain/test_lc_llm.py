"""SafeInferLLM (completion) on the tiny float64 Llama and the scripted model."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate

from safeinfer_integrations.langchain import SafeInferLLM

PROMPTS = ["How do I bake bread?", "The capital of France is", "Two plus two is"]


def test_invoke_is_the_completion_only(tiny_engine: Any) -> None:
    llm = SafeInferLLM(engine=tiny_engine, mode="vanilla", max_tokens=6)
    [reference] = tiny_engine.generate(PROMPTS[0], max_new_tokens=6, mode="vanilla")
    assert llm.invoke(PROMPTS[0]) == reference.text
    result = llm.generate([PROMPTS[0]])
    info = result.generations[0][0].generation_info
    assert info["finish_reason"] == reference.finish_reason and info["model_name"] == "tiny-llama"
    assert info["usage"]["output_tokens"] == reference.usage.completion_tokens
    assert info["safety"] == reference.safety.as_dict()
    assert result.llm_output["token_usage"]["total_tokens"] == reference.usage.total_tokens


def test_batch_is_one_generation_and_equals_singles(tiny_engine: Any, scripted: Any) -> None:
    llm = SafeInferLLM(engine=tiny_engine, mode="sgds", max_tokens=8)
    assert llm.batch(PROMPTS) == [llm.invoke(p) for p in PROMPTS]
    engine = scripted("a b c")
    scripted_llm = SafeInferLLM(engine=engine, mode="vanilla")
    scripted_llm.invoke("x")
    single, engine.model.calls = engine.model.calls, 0
    assert scripted_llm.batch(["x", "y", "z"]) == ["a b c"] * 3
    assert engine.model.calls == single


def test_stream_equals_invoke_and_fires_callbacks(tiny_engine: Any) -> None:
    class Tokens(BaseCallbackHandler):
        def __init__(self) -> None:
            self.tokens: list[str] = []

        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            self.tokens.append(token)

    llm = SafeInferLLM(engine=tiny_engine, mode="sgds", max_tokens=10)
    handler = Tokens()
    pieces = list(llm.stream(PROMPTS[0], config={"callbacks": [handler]}))
    assert "".join(pieces) == llm.invoke(PROMPTS[0])
    assert "".join(handler.tokens) == "".join(pieces)
    streaming = SafeInferLLM(engine=tiny_engine, mode="sgds", max_tokens=10, streaming=True)
    handler = Tokens()
    assert streaming.invoke(PROMPTS[0], config={"callbacks": [handler]}) == "".join(handler.tokens)


async def test_async_equals_sync(tiny_engine: Any) -> None:
    llm = SafeInferLLM(engine=tiny_engine, mode="sgds", max_tokens=8)
    expected = [llm.invoke(p) for p in PROMPTS]
    assert await llm.ainvoke(PROMPTS[0]) == expected[0]
    assert await llm.abatch(PROMPTS) == expected
    assert "".join([piece async for piece in llm.astream(PROMPTS[1])]) == expected[1]


def test_stop_strings_and_early_stop(scripted: Any) -> None:
    engine = scripted("Hello world, hello moon")
    llm = SafeInferLLM(engine=engine, mode="vanilla")
    assert llm.invoke("x", stop=["lo wor"]) == "Hel"
    assert "".join(llm.stream("x", stop=["o w"])) == "Hell"
    long_engine = scripted("word " * 200)
    long_llm = SafeInferLLM(engine=long_engine, mode="vanilla", max_tokens=200)
    stream = long_llm.stream("x")
    next(stream)
    stream.close()
    assert long_engine.model.calls < 20


async def test_early_stopped_async_stream(scripted: Any) -> None:
    engine = scripted("word " * 200)
    llm = SafeInferLLM(engine=engine, mode="vanilla", max_tokens=200)
    stream = llm.astream("x")
    await stream.__anext__()
    await stream.aclose()
    await asyncio.sleep(0.2)
    calls = engine.model.calls
    await asyncio.sleep(0.2)
    assert engine.model.calls == calls < 20


def test_overrides_errors_and_chain(tiny_engine: Any) -> None:
    llm = SafeInferLLM(engine=tiny_engine, mode="vanilla", max_tokens=4)
    result = llm.bind(mode="sgds", max_tokens=2).invoke("hi")
    assert isinstance(result, str)
    assert llm.generate(["hi"], mode="sgds").generations[0][0].generation_info["safety"]["mode"] == "sgds"
    with pytest.raises(TypeError, match="takes no 'tools'"):
        llm.invoke("hi", tools=[])
    with pytest.raises(TypeError, match="'temprature'"):
        llm.invoke("hi", temprature=1.0)
    chain = PromptTemplate.from_template("Q: {q}\nA:") | llm | StrOutputParser()
    assert chain.invoke({"q": "two plus two?"}) == llm.invoke("Q: two plus two?\nA:")
    assert llm.get_num_tokens("bread") == len(tiny_engine.tokenizer("bread", add_special_tokens=False)["input_ids"])
    assert llm._get_ls_params()["ls_model_type"] == "llm"
