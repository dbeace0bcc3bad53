"""Tool calling: tools reach the model (through the template or the tool prompt), calls are parsed from
scripted outputs into ToolCallBlocks, history round-trips, and real FunctionAgent / ReActAgent runs work
with SafeInfer settings on every step."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from llama_index.core.agent.workflow import FunctionAgent, ReActAgent
from llama_index.core.base.llms.types import TextBlock, ToolCallBlock
from llama_index.core.llms import ChatMessage
from llama_index.core.tools import FunctionTool

from safeinfer_integrations.llama_index import SafeInferLLM
from safeinfer_integrations.runtime.tools import tool_prompt

from .conftest import ScriptedEngine


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


TOOLS = [FunctionTool.from_defaults(fn=multiply), FunctionTool.from_defaults(fn=add)]
CALL = '<tool_call>{"name": "multiply", "arguments": {"a": 6, "b": 7}}</tool_call>'
TWO_CALLS = CALL + '\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
QUESTION = "What is 6 times 7?"


def test_tools_go_into_the_system_prompt_when_the_template_ignores_them(scripted: Any) -> None:
    engine = scripted([CALL])
    llm = SafeInferLLM(engine=engine, mode="sgds")
    response = llm.chat_with_tools(TOOLS, user_msg=QUESTION)
    call = engine.calls[0]
    assert call["tools"] is None  # the tiny ChatML template does not render tools
    system = call["prompt"][0]
    assert system["role"] == "system"
    assert system["content"] == tool_prompt([t.metadata.to_openai_tool() for t in TOOLS])
    assert call["prompt"][-1] == {"role": "user", "content": QUESTION}
    assert call["settings"]["mode"] == "sgds"
    selections = llm.get_tool_calls_from_response(response)
    assert [(s.tool_name, s.tool_kwargs) for s in selections] == [("multiply", {"a": 6, "b": 7})]
    assert selections[0].tool_id.startswith("call_")
    assert response.message.content == ""  # the call text is not left in the content


def test_tools_go_through_a_template_that_renders_them(tiny_model_factory: Any, tiny_tokenizer: Any) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
        + tiny_tokenizer.chat_template
    )
    engine = ScriptedEngine(tiny_model_factory("llama"), tokenizer, [CALL])
    llm = SafeInferLLM(engine=engine)
    response = llm.chat_with_tools(TOOLS, user_msg=QUESTION)
    call = engine.calls[0]
    assert [t["function"]["name"] for t in call["tools"]] == ["multiply", "add"]
    assert call["prompt"] == [{"role": "user", "content": QUESTION}]  # no tool prompt added
    assert response.raw["usage"]["prompt_tokens"] == engine.count_tokens(call["prompt"], call["tools"])
    assert llm.get_tool_calls_from_response(response)[0].tool_name == "multiply"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (CALL, [("multiply", {"a": 6, "b": 7})]),
        ('```json\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n```', [("add", {"a": 1, "b": 2})]),
        ('{"name": "unknown_tool", "arguments": {}}', []),  # bare JSON naming no offered tool is text
        ("The answer is 42.", []),
        ('<tool_call>{"name": "multiply", "arguments": {"a": 6', []),  # cut off: stays text
    ],
)
def test_tool_calls_parsed_from_scripted_outputs(scripted: Any, reply: str, expected: list[Any]) -> None:
    llm = SafeInferLLM(engine=scripted([reply]))
    response = llm.chat_with_tools(TOOLS, user_msg=QUESTION)
    selections = llm.get_tool_calls_from_response(response, error_on_no_tool_call=False)
    assert [(s.tool_name, s.tool_kwargs) for s in selections] == expected
    if not expected:
        assert response.message.content == reply
        with pytest.raises(ValueError, match="tool call"):
            llm.get_tool_calls_from_response(response)


def test_parallel_calls_kept_only_when_allowed(scripted: Any) -> None:
    llm = SafeInferLLM(engine=scripted([TWO_CALLS, TWO_CALLS]))
    single = llm.chat_with_tools(TOOLS, user_msg=QUESTION)
    both = llm.chat_with_tools(TOOLS, user_msg=QUESTION, allow_parallel_tool_calls=True)
    assert [s.tool_name for s in llm.get_tool_calls_from_response(single)] == ["multiply"]
    assert [s.tool_name for s in llm.get_tool_calls_from_response(both)] == ["multiply", "add"]


def test_tool_choice(scripted: Any) -> None:
    engine = scripted(["a", "b", "c"])
    llm = SafeInferLLM(engine=engine)
    llm.chat_with_tools(TOOLS, user_msg=QUESTION, tool_choice="add")
    assert engine.calls[-1]["prompt"][0]["content"].endswith("You must call the tool add now.")
    llm.chat_with_tools(TOOLS, user_msg=QUESTION, tool_required=True)
    assert engine.calls[-1]["prompt"][0]["content"].endswith("You must call one of the tools now.")
    llm.chat_with_tools(TOOLS, user_msg=QUESTION, tool_choice="none")
    assert engine.calls[-1]["prompt"] == [{"role": "user", "content": QUESTION}]
    with pytest.raises(ValueError, match="tool_choice"):
        llm.chat_with_tools(TOOLS, user_msg=QUESTION, tool_choice="divide")


def test_tool_history_round_trips(scripted: Any) -> None:
    engine = scripted(["42."])
    history = [
        ChatMessage(role="user", content=QUESTION),
        ChatMessage(
            role="assistant",
            blocks=[
                TextBlock(text=""),
                ToolCallBlock(tool_call_id="call_a", tool_name="multiply", tool_kwargs={"a": 6, "b": 7}),
            ],
        ),
        ChatMessage(role="tool", content="42", additional_kwargs={"tool_call_id": "call_a"}),
    ]
    SafeInferLLM(engine=engine).chat_with_tools(TOOLS, chat_history=history)
    prompt = engine.calls[0]["prompt"]
    assistant, tool = prompt[-2], prompt[-1]
    assert assistant["tool_calls"] == [
        {"id": "call_a", "type": "function", "function": {"name": "multiply", "arguments": {"a": 6, "b": 7}}}
    ]
    assert json.loads(assistant["content"].removeprefix("<tool_call>").removesuffix("</tool_call>")) == {
        "name": "multiply",
        "arguments": {"a": 6, "b": 7},
    }
    assert tool == {"role": "tool", "content": "42", "name": "multiply", "tool_call_id": "call_a"}


def test_streamed_tool_call_is_parsed_on_the_last_chunk(scripted: Any) -> None:
    llm = SafeInferLLM(engine=scripted([CALL]))
    chunks = list(llm.stream_chat_with_tools(TOOLS, user_msg=QUESTION))
    assert "".join(c.delta or "" for c in chunks) == CALL
    selections = llm.get_tool_calls_from_response(chunks[-1])
    assert [(s.tool_name, s.tool_kwargs) for s in selections] == [("multiply", {"a": 6, "b": 7})]


@pytest.mark.parametrize("streaming", [True, False])
async def test_function_agent_runs_tools_with_safeinfer_on_every_step(scripted: Any, streaming: bool) -> None:
    engine = scripted([CALL, "6 times 7 is 42."])
    llm = SafeInferLLM(engine=engine, mode="sgds", alpha=0.9)
    agent = FunctionAgent(tools=TOOLS, llm=llm, streaming=streaming, system_prompt="You are a calculator.")
    result = await agent.run(user_msg=QUESTION)
    assert str(result) == "6 times 7 is 42."
    assert [call.tool_name for call in result.tool_calls] == ["multiply"]
    assert result.tool_calls[0].tool_output.raw_output == 42
    assert len(engine.calls) == 2
    assert all(c["settings"]["mode"] == "sgds" and c["settings"]["alpha"] == 0.9 for c in engine.calls)
    second = engine.calls[1]["prompt"]
    assert second[-1]["role"] == "tool" and second[-1]["content"] == "42" and second[-1]["name"] == "multiply"


async def test_react_agent_runs_tools(scripted: Any) -> None:
    engine = scripted(
        [
            'Thought: I need to multiply.\nAction: multiply\nAction Input: {"a": 6, "b": 7}',
            "Thought: I can answer without using any more tools.\nAnswer: 42",
        ]
    )
    agent = ReActAgent(tools=TOOLS, llm=SafeInferLLM(engine=engine, mode="sgds"), streaming=False)
    result = await agent.run(user_msg=QUESTION)
    assert str(result) == "42"
    assert [call.tool_name for call in result.tool_calls] == ["multiply"]
    assert all(c["settings"]["mode"] == "sgds" and c["tools"] is None for c in engine.calls)
    assert engine.calls[1]["prompt"][-1] == {"role": "user", "content": "Observation: 42"}
