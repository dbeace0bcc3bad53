"""Converting between LlamaIndex objects and the engine's plain values: chat messages to role/content dicts,
tools to OpenAI-style schemas, and `Generation`s to LlamaIndex responses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    CachePoint,
    ChatMessage,
    ChatResponse,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)

from ..errors import InvalidInputError, InvalidSettingError, InvalidTypeError
from ..runtime.generation import Generation
from ..runtime.tools import ParsedToolCall, assistant_message, normalize_tool, parse_tool_calls, tool_result_message

# LlamaIndex roles -> the four roles chat templates know. Anything else is rejected with the allowed list.
_ROLES: dict[str, str] = {
    MessageRole.SYSTEM.value: "system",
    MessageRole.DEVELOPER.value: "system",
    MessageRole.USER.value: "user",
    MessageRole.ASSISTANT.value: "assistant",
    MessageRole.CHATBOT.value: "assistant",
    MessageRole.MODEL.value: "assistant",
    MessageRole.TOOL.value: "tool",
    MessageRole.FUNCTION.value: "tool",
}
_TOOL_CHOICES = ("auto", "none", "any", "required")


def _role_of(message: ChatMessage, index: int) -> str:
    role = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
    if role not in _ROLES:
        raise InvalidInputError(f"message {index} has role {role!r}; SafeInferLLM takes {', '.join(sorted(_ROLES))}")
    return _ROLES[role]


def _legacy_tool_calls(message: ChatMessage) -> list[Mapping[str, Any]]:
    """Tool calls kept in ``additional_kwargs['tool_calls']`` (older integrations, OpenAI-shaped dicts)."""
    calls = message.additional_kwargs.get("tool_calls") or []
    out = []
    for call in calls:
        if isinstance(call, Mapping):
            out.append(call)
        elif hasattr(call, "tool_name"):  # a ToolSelection
            out.append({"id": call.tool_id, "name": call.tool_name, "arguments": call.tool_kwargs})
        elif hasattr(call, "model_dump"):  # an OpenAI SDK object
            out.append(call.model_dump())
    return out


def to_engine_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex messages as the engine's ``{"role", "content"}`` dicts.

    Text blocks are joined; an assistant message's ``ToolCallBlock``s become OpenAI ``tool_calls`` (also
    written inline, for templates that ignore that field); a tool message gets the name of the call it
    answers. Thinking blocks and cache points are dropped; images, audio, documents raise ``ValueError``."""
    if not messages:
        raise InvalidInputError("messages is empty: give at least one ChatMessage")
    out: list[dict[str, Any]] = []
    names_by_id: dict[str, str] = {}
    for index, message in enumerate(messages):
        if not isinstance(message, ChatMessage):
            raise InvalidTypeError(f"message {index} must be a llama_index ChatMessage; got {type(message).__name__}")
        role = _role_of(message, index)
        texts: list[str] = []
        calls: list[Mapping[str, Any]] = []
        for block in message.blocks:
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolCallBlock):
                calls.append({"id": block.tool_call_id, "name": block.tool_name, "arguments": block.tool_kwargs})
            elif isinstance(block, (ThinkingBlock, CachePoint)):
                continue
            else:
                raise InvalidInputError(
                    f"message {index} has a {type(block).__name__}; only text and tool calls are supported"
                )
        calls.extend(_legacy_tool_calls(message))
        text = "\n".join(texts)
        if role == "assistant" and calls:
            rendered = assistant_message(text, calls)
            for call in rendered["tool_calls"]:
                names_by_id[call["id"]] = call["function"]["name"]
            out.append(rendered)
        elif role == "tool":
            call_id = message.additional_kwargs.get("tool_call_id")
            name = message.additional_kwargs.get("name") or names_by_id.get(str(call_id))
            out.append(tool_result_message(text, name=name, tool_call_id=call_id))
        else:
            out.append({"role": role, "content": text})
    return out


def to_tool_schemas(tools: Sequence[Any] | None) -> list[dict[str, Any]]:
    """OpenAI-style schemas from LlamaIndex tools (anything with ``metadata.to_openai_tool()``) or dicts."""
    schemas = []
    for index, tool in enumerate(tools or []):
        metadata = getattr(tool, "metadata", None)
        if metadata is not None and callable(getattr(metadata, "to_openai_tool", None)):
            schemas.append(normalize_tool(metadata.to_openai_tool(skip_length_check=True)))
        elif isinstance(tool, Mapping):
            schemas.append(normalize_tool(tool))
        else:
            raise InvalidTypeError(
                f"tool {index} must be a LlamaIndex tool (BaseTool) or an OpenAI-style schema dict; "
                f"got {type(tool).__name__}"
            )
    return schemas


def normalize_tool_choice(tool_choice: Any, tool_required: bool, names: Sequence[str]) -> str | None:
    """LlamaIndex's ``tool_choice`` (a name, a mode, or OpenAI's dict) and ``tool_required`` as one string."""
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        tool_choice = function.get("name") if isinstance(function, Mapping) else tool_choice.get("type")
    if tool_choice is None:
        return "required" if tool_required else None
    if not isinstance(tool_choice, str) or (tool_choice not in _TOOL_CHOICES and tool_choice not in names):
        allowed = ", ".join([*map(repr, _TOOL_CHOICES), *map(repr, names)])
        raise InvalidSettingError(
            f"tool_choice must be None, one of {allowed}, or OpenAI's dict form; got {tool_choice!r}"
        )
    return tool_choice


def raw_of(generation: Generation, model_name: str) -> dict[str, Any]:
    """The ``raw`` payload of a response: usage (``TokenCountingHandler`` reads it), finish reason, safety."""
    usage = generation.usage
    return {
        "model": model_name,
        "text": generation.text,
        "finish_reason": generation.finish_reason,
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        },
        "safety": generation.safety.as_dict(),
    }


def _extras(generation: Generation) -> dict[str, Any]:
    usage = generation.usage
    return {
        "finish_reason": generation.finish_reason,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def assistant_chat_message(text: str, tool_names: Sequence[str] | None) -> ChatMessage:
    """The assistant message for generated ``text``; with ``tool_names``, tool calls are parsed into
    ``ToolCallBlock``s and removed from the text."""
    calls: list[ParsedToolCall] = []
    content = text
    if tool_names:
        content, calls = parse_tool_calls(text, tool_names=tool_names)
    blocks: list[Any] = [TextBlock(text=content)]
    blocks += [ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments) for c in calls]
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks)


def chat_response(
    generation: Generation, model_name: str, tool_names: Sequence[str] | None, delta: str | None = None
) -> ChatResponse:
    return ChatResponse(
        message=assistant_chat_message(generation.text, tool_names),
        delta=delta,
        raw=raw_of(generation, model_name),
        additional_kwargs=_extras(generation),
    )
