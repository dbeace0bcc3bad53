"""The framework-free tool-calling helpers: prompt, parser, history messages."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from safeinfer_integrations.runtime.engine import SafeInferEngine
from safeinfer_integrations.runtime.prompts import PromptFormatter
from safeinfer_integrations.runtime.tools import (
    ParsedToolCall,
    assistant_message,
    needs_tool_prompt,
    normalize_tool,
    parse_tool_calls,
    tool_prompt,
    tool_result_message,
    with_tool_prompt,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ADD = {
    "name": "add",
    "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
}


def _names_args(calls: list[ParsedToolCall]) -> list[tuple[str, dict[str, Any]]]:
    return [(c.name, c.arguments) for c in calls]


# ------------------------------------------------------------------------------------------------ parsing
def test_tagged_call_is_parsed_and_removed_from_content() -> None:
    text = 'Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert _names_args(calls) == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_")


def test_several_tagged_calls_and_a_list_inside_one_tag() -> None:
    text = (
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
        '<tool_call>[{"name": "add", "arguments": {"a": 3, "b": 4}}, '
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}]</tool_call>'
    )
    content, calls = parse_tool_calls(text)
    assert content == ""
    assert _names_args(calls) == [
        ("add", {"a": 1, "b": 2}),
        ("add", {"a": 3, "b": 4}),
        ("get_weather", {"city": "Oslo"}),
    ]
    assert len({c.id for c in calls}) == 3


def test_unterminated_tag_at_the_end_still_counts() -> None:
    content, calls = parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}')
    assert content == "" and _names_args(calls) == [("add", {"a": 1, "b": 2})]


def test_bare_json_object_list_fence_and_openai_shapes() -> None:
    for text in (
        '{"name": "add", "arguments": {"a": 1, "b": 2}}',
        '```json\n{"name": "add", "parameters": {"a": 1, "b": 2}}\n```',
        '[{"name": "add", "arguments": {"a": 1, "b": 2}}]',
        '{"type": "function", "function": {"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}}',
    ):
        content, calls = parse_tool_calls(text)
        assert content == "", text
        assert _names_args(calls) == [("add", {"a": 1, "b": 2})], text


def test_bare_json_embedded_in_prose() -> None:
    content, calls = parse_tool_calls('Sure: {"name": "add", "arguments": {"a": 5, "b": 6}} done')
    assert _names_args(calls) == [("add", {"a": 5, "b": 6})]
    assert content == "Sure:  done"


def test_tool_names_filter_applies_to_bare_json_only() -> None:
    text = '{"name": "Alice", "arguments": {"age": 3}}'
    assert parse_tool_calls(text, tool_names={"add"}) == (text, [])
    assert _names_args(parse_tool_calls(text)[1]) == [("Alice", {"age": 3})]
    tagged = '<tool_call>{"name": "other", "arguments": {}}</tool_call>'
    assert _names_args(parse_tool_calls(tagged, tool_names={"add"})[1]) == [("other", {})]


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>',
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',
        '{"name": "add"}',
        '{"name": "add", "arguments": "not json"}',
        "plain answer with { braces and [brackets",
        '{"city": "Paris"}',
        "",
        "[[[[[[[[[[[[" * 50,
    ],
)
def test_malformed_or_non_call_text_stays_content(text: str) -> None:
    assert parse_tool_calls(text) == (text, [])


def test_json_that_is_not_a_call_is_not_searched_inside() -> None:
    text = '{"result": {"name": "add", "arguments": {"a": 1}}}'
    assert parse_tool_calls(text) == (text, [])


def test_parse_rejects_non_string() -> None:
    with pytest.raises(TypeError, match="str"):
        parse_tool_calls(None)  # type: ignore[arg-type]


def test_round_trip_through_assistant_message() -> None:
    calls = [ParsedToolCall("add", {"a": 1, "b": 2}, id="call_1"), ParsedToolCall("get_weather", {"city": "Rome"})]
    message = assistant_message("thinking", calls)
    assert message["role"] == "assistant"
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["add", "get_weather"]
    assert message["tool_calls"][0]["id"] == "call_1"
    content, parsed = parse_tool_calls(message["content"])
    assert content == "thinking"
    assert _names_args(parsed) == _names_args(calls)


# ------------------------------------------------------------------------------------------------ messages
def test_assistant_message_accepts_langchain_style_dicts_and_no_inline() -> None:
    message = assistant_message("", [{"name": "add", "args": {"a": 1}, "id": "x", "type": "tool_call"}], inline=False)
    assert message == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "x", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}],
    }
    assert assistant_message("hi", []) == {"role": "assistant", "content": "hi"}
    with pytest.raises(ValueError, match="name"):
        assistant_message("", [{"args": {}}])


def test_tool_result_message() -> None:
    assert tool_result_message("sunny", name="get_weather", tool_call_id="c1") == {
        "role": "tool",
        "content": "sunny",
        "name": "get_weather",
        "tool_call_id": "c1",
    }
    assert json.loads(tool_result_message({"t": 20})["content"]) == {"t": 20}


# ------------------------------------------------------------------------------------------------ prompts
def test_tool_prompt_describes_every_tool_and_the_format() -> None:
    prompt = tool_prompt([WEATHER, ADD])
    for needle in (
        "get_weather",
        "Current weather in a city.",
        '"city"',
        "add",
        "Add two integers.",
        "<tool_call>",
        "</tool_call>",
        '"arguments"',
    ):
        assert needle in prompt
    assert "must call the tool add" in tool_prompt([ADD], tool_choice="add")
    assert "must call one of the tools" in tool_prompt([ADD], tool_choice="any")
    with pytest.raises(ValueError, match="tool_choice.*'nope'"):
        tool_prompt([ADD], tool_choice="nope")
    with pytest.raises(ValueError, match="at least one tool"):
        tool_prompt([])


def test_normalize_tool_errors_name_the_problem() -> None:
    assert normalize_tool(ADD)["function"]["name"] == "add"
    with pytest.raises(ValueError, match="name"):
        normalize_tool({"description": "x"})
    with pytest.raises(TypeError, match="dict"):
        normalize_tool("add")  # type: ignore[arg-type]


def test_with_tool_prompt_merges_into_system() -> None:
    base = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    out = with_tool_prompt(base, [ADD])
    assert out[0]["content"].startswith("Be brief.\n\n") and "add" in out[0]["content"]
    assert base[0]["content"] == "Be brief."  # not mutated
    out = with_tool_prompt(base[1:], [ADD])
    assert out[0]["role"] == "system" and out[1] == base[1]


def test_needs_tool_prompt_follows_the_template(tiny_tokenizer: Any) -> None:
    assert needs_tool_prompt(PromptFormatter(tiny_tokenizer))  # ChatML without tools
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% if tools %}{% for t in tools %}{{ t['function']['name'] }}{% endfor %}"
        "{% endif %}"
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    )
    assert not needs_tool_prompt(PromptFormatter(tok))


def test_history_renders_through_a_real_engine(tiny_tokenizer: Any, tiny_model_factory: Any) -> None:
    engine = SafeInferEngine(tiny_model_factory("llama"), tiny_tokenizer)
    call = ParsedToolCall("add", {"a": 1, "b": 2}, id="c1")
    history = [
        {"role": "user", "content": "add 1 and 2"},
        assistant_message("", [call]),
        tool_result_message("3", name="add", tool_call_id="c1"),
    ]
    text = engine.formatter.render_chat(with_tool_prompt(history, [ADD]))
    assert text.index("Add two integers.") < text.index("add 1 and 2")
    assert '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>' in text
    assert "tool\n3" in text
    # The tiny tokenizer makes the tool prompt too long for its 256-token window: generate on the history.
    [generation] = engine.generate(history, max_new_tokens=3, mode="vanilla")
    assert generation.usage.completion_tokens >= 1
