"""Turning inputs into token ids: the one prompt formatter every entry point uses.

- A string is a completion prompt, tokenized as is (the tokenizer adds BOS if it normally does).
- A list of ``{"role", "content"}`` messages is rendered with the model's chat template and tokenized
  without adding special tokens again (no double BOS). Roles the template rejects are folded: consecutive
  messages of one role are merged, then ``tool`` messages become user messages, then system messages are
  folded into the first user message. Models without a chat template get a plain ``Role: content`` format.
- A final assistant message marked ``"prefix": True`` is continued rather than answered (the template's
  ``continue_final_message``), so a caller can put words in the model's mouth.
- The ``prompted`` unsafe expert sees the same input under an unsafe system prompt (prepended to the
  system message, or to the text of a completion prompt).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InvalidInputError, InvalidTypeError

Message = Mapping[str, Any]
PromptInput = str | Sequence[Message]

_ROLES = ("system", "user", "assistant", "tool")


def is_messages(value: object) -> bool:
    """True for a chat conversation: a non-string sequence whose items are mappings."""
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) > 0
        and all(isinstance(item, Mapping) for item in value)
    )


def normalize_batch(inputs: object) -> list[PromptInput]:
    """Accept one prompt (a string or a message list) or a list of prompts; return a list of prompts."""
    if isinstance(inputs, str) or is_messages(inputs):
        batch = [inputs]
    elif isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)):
        batch = list(inputs)
    else:
        raise InvalidTypeError(
            f"inputs must be a string, a list of chat messages, or a list of those; got {type(inputs).__name__}"
        )
    if not batch:
        raise InvalidInputError("inputs is empty: give at least one prompt")
    for index, item in enumerate(batch):
        if isinstance(item, str):
            if item == "":
                raise InvalidInputError(f"prompt {index} is an empty string")
        elif is_messages(item):
            _check_messages(item, index)  # type: ignore[arg-type]
        else:
            raise InvalidTypeError(
                f"prompt {index} must be a string or a non-empty list of {{'role', 'content'}} messages; "
                f"got {item!r:.80}"
            )
    return batch  # type: ignore[return-value]


def _check_messages(messages: Sequence[Message], index: int) -> None:
    for position, message in enumerate(messages):
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidInputError(
                f"prompt {index}, message {position}: 'role' must be a non-empty string; got {role!r}"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise InvalidTypeError(
                f"prompt {index}, message {position}: 'content' must be a string; got {type(content).__name__}"
            )


def _merge_consecutive(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    merged: list[dict[str, Any]] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"] and "tool_calls" not in message:
            merged[-1] = {**merged[-1], "content": f"{merged[-1]['content']}\n\n{message['content']}"}
        else:
            merged.append(dict(message))
    return merged


def _tools_as_user(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for message in messages:
        if message["role"] == "tool":
            name = message.get("name") or "tool"
            out.append({"role": "user", "content": f"[{name} result]\n{message['content']}"})
        else:
            out.append(
                {k: v for k, v in message.items() if k != "tool_calls"} if message["role"] == "assistant" else message
            )
    return out


def _system_into_user(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [m for m in messages if m["role"] != "system"]
    if not system:
        return rest
    if rest and rest[0]["role"] == "user":
        return [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]


def add_to_system(messages: Sequence[Message], text: str, *, first: bool = False) -> list[dict[str, Any]]:
    """A copy of ``messages`` with ``text`` added to the system message, after its content (before it with
    ``first``), separated by a blank line and stripped of surrounding whitespace; a system message with only
    ``text`` is prepended when there is none.
    Every instruction the package adds (the unsafe expert's prompt, tool descriptions, output formats) goes in
    this way."""
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system":
        existing = out[0].get("content") or ""
        parts = (text, existing) if first else (existing, text)
        out[0]["content"] = "\n\n".join(part for part in parts if part).strip()
        return out
    return [{"role": "system", "content": text}, *out]


def with_unsafe_system(messages: Sequence[Message], unsafe_prompt: str) -> list[dict[str, Any]]:
    """The conversation under the unsafe system prompt, keeping any system content (it may carry context)."""
    return add_to_system(messages, unsafe_prompt, first=True)


def _plain_format(messages: list[dict[str, Any]], continue_final: bool = False) -> str:
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) if continue_final else "\n".join(lines) + "\nAssistant:"


def continues_final_message(messages: Sequence[Message]) -> bool:
    """True when the last message is an assistant message marked ``"prefix": True``: the model then
    continues that text instead of opening a new assistant turn (e.g. to force the start of a tool call)."""
    last = messages[-1] if messages else {}
    return bool(last.get("role") == "assistant" and last.get("prefix"))


class PromptFormatter:
    """Renders prompts for one tokenizer. Thread-safe (no state beyond the tokenizer)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render_chat(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The chat-template text of ``messages`` with the assistant turn opened."""
        prepared = [{**m, "content": m.get("content") or ""} for m in messages]
        continue_final = continues_final_message(prepared)
        if not self.has_chat_template:
            return _plain_format(_tools_as_user(prepared), continue_final)
        attempts = (
            lambda ms: ms,
            _merge_consecutive,
            lambda ms: _merge_consecutive(_tools_as_user(ms)),
            lambda ms: _merge_consecutive(_system_into_user(_tools_as_user(ms))),
        )
        first_error: Exception | None = None
        for fold in attempts:
            try:
                text = self.tokenizer.apply_chat_template(
                    fold(prepared),
                    tools=list(tools) if tools else None,
                    tokenize=False,
                    add_generation_prompt=not continue_final,
                    continue_final_message=continue_final,
                )
                return str(text)
            except Exception as error:  # jinja2 TemplateError and friends: try the next fold
                first_error = first_error or error
        raise InvalidInputError(f"the chat template rejects this conversation even after folding roles: {first_error}")

    def template_uses_tools(self) -> bool:
        """Whether the chat template renders a ``tools`` argument at all."""
        if not self.has_chat_template:
            return False
        probe = [{"role": "user", "content": "hi"}]
        tool = {
            "type": "function",
            "function": {
                "name": "probe_tool_xyz",
                "description": "d",
                "parameters": {"type": "object", "properties": {}},
            },
        }
        try:
            return "probe_tool_xyz" in self.render_chat(probe, tools=[tool])
        except ValueError:
            return False

    def encode(
        self, prompt: PromptInput, *, unsafe_prompt: str | None = None, tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """Token ids of ``prompt`` (under ``unsafe_prompt`` when given)."""
        if isinstance(prompt, str):
            text = prompt if unsafe_prompt is None else f"{unsafe_prompt}\n\n{prompt}"
            return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        messages = list(prompt) if unsafe_prompt is None else with_unsafe_system(prompt, unsafe_prompt)
        text = self.render_chat(messages, tools=tools)
        special = not self.has_chat_template  # the plain format gets the tokenizer's usual BOS
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
