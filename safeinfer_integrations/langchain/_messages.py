"""LangChain messages to the engine's ``{"role", "content"}`` dicts.

Every role is kept: system, human (user), ai (assistant, with its tool calls), tool (with its name and
call id) and ``ChatMessage``'s own role; the engine's formatter merges or folds what a chat template
cannot take. Content is text: text blocks are joined, and tool-use blocks of an AI message are carried by
its ``tool_calls``; images, audio and files raise `InvalidInputError`, a ``ValueError`` (these are text-only models)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from ..errors import InvalidInputError, InvalidTypeError
from ..runtime.prompts import add_to_system
from ..runtime.tools import assistant_message, tool_result_message, with_tool_prompt

_IGNORED_BLOCKS = frozenset(
    {
        "tool_use",
        "tool_call",
        "tool_call_chunk",
        "function_call",
        "reasoning",
        "thinking",
        "refusal",
        "invalid_tool_call",
        "server_tool_call",
        "server_tool_result",
    }
)
_ROLE_ALIASES = {"human": "user", "ai": "assistant", "developer": "system", "function": "tool"}


def content_text(message: BaseMessage) -> str:
    """The text of a message's content; raises `InvalidInputError` (a ValueError) on non-text blocks other than
    tool use."""
    content = message.content
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for index, block in enumerate(content):
        if isinstance(block, str):
            parts.append(block)
            continue
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "text":
            parts.append(str(block.get("text", "")))
        elif kind in _IGNORED_BLOCKS:
            continue
        else:
            raise InvalidInputError(
                f"{type(message).__name__} content block {index} has type {kind!r}; SafeInfer models take text "
                "only (text blocks, plus tool calls on AI messages)"
            )
    return "".join(parts)


def to_engine_messages(messages: Sequence[BaseMessage], *, inline_tool_calls: bool) -> list[dict[str, Any]]:
    """Convert a LangChain history; ``inline_tool_calls`` writes an AI message's calls into its text too
    (for chat templates that ignore the ``tool_calls`` field)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        text = content_text(message)
        if isinstance(message, SystemMessage):
            out.append({"role": "system", "content": text})
        elif isinstance(message, HumanMessage):
            out.append({"role": "user", "content": text})
        elif isinstance(message, AIMessage):
            if message.tool_calls:
                out.append(assistant_message(text, message.tool_calls, inline=inline_tool_calls))
            else:
                out.append({"role": "assistant", "content": text})
        elif isinstance(message, ToolMessage):
            out.append(tool_result_message(text, name=message.name, tool_call_id=message.tool_call_id))
        elif isinstance(message, FunctionMessage):
            out.append(tool_result_message(text, name=message.name))
        elif isinstance(message, ChatMessage):
            out.append({"role": _ROLE_ALIASES.get(message.role, message.role), "content": text})
        else:
            raise InvalidTypeError(
                f"unsupported message type {type(message).__name__}; use System, Human, AI, Tool or Chat messages"
            )
    if not out:
        raise InvalidInputError("no messages: give at least one message")
    return out


def add_tool_instructions(
    messages: list[dict[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: str | None,
    *,
    template_renders_tools: bool,
) -> list[dict[str, Any]]:
    """Describe bound tools in the system message when the chat template cannot (``tools.tool_prompt``);
    with a tool-aware template only a forced ``tool_choice`` needs saying."""
    if not tools:
        return messages
    if not template_renders_tools:
        return with_tool_prompt(messages, tools, tool_choice=tool_choice)
    if tool_choice in (None, "auto", "none"):
        return messages
    note = (
        "You must call one of the tools now."
        if tool_choice in ("any", "required")
        else (f"You must call the tool {tool_choice} now.")
    )
    return add_to_system(messages, note)


def structured_output_instruction(schema: Mapping[str, Any] | None) -> str:
    """The system instruction of ``with_structured_output(method="json_schema" | "json_mode")``."""
    import json

    if schema is None:
        return "Reply with a single JSON object and nothing else."
    properties = schema.get("properties")
    if isinstance(properties, Mapping) and properties:
        # keys described in words: a small model given the raw schema tends to echo it back
        keys = ", ".join(f'"{name}" ({_kind(spec)})' for name, spec in properties.items())
        return f"Reply with a single JSON object with the keys {keys}, and nothing else."
    return (
        "Reply with a single JSON object that matches this JSON schema, and nothing else:\n"
        f"{json.dumps(schema, ensure_ascii=False)}"
    )


def _kind(spec: Any) -> str:
    """A property's type in words ("string", "integer", "list of string", ...; "value" when unstated)."""
    if not isinstance(spec, Mapping):
        return "value"
    kind = spec.get("type")
    if kind == "array":
        return f"list of {_kind(spec.get('items'))}"
    if isinstance(kind, str):
        return kind
    if "anyOf" in spec:
        return " or ".join(_kind(option) for option in spec["anyOf"])
    return str(spec.get("title") or "object" if "$ref" in spec else "value")
