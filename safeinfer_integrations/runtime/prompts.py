"""Turning inputs into token ids: the one prompt formatter every entry point uses.

- A string is a completion prompt, tokenized as is (the tokenizer adds BOS if it normally does).
- Roles are ``system``, ``user``, ``assistant`` and ``tool``; any other is refused with that list.
- ``tools`` go through the chat template; the engine describes them in the system message instead when the
  template cannot render them (`SafeInferEngine`, with `tools.with_tool_prompt`), so they are never dropped.
- A list of ``{"role", "content"}`` messages is rendered with the model's chat template and tokenized
  without adding special tokens again (no double BOS). Roles the template rejects are folded: consecutive
  messages of one role are merged, then ``tool`` messages become user messages, then system messages are
  folded into the first user message. Models without a chat template get a plain ``Role: content`` format.
- A final assistant message marked ``"prefix": True`` is continued rather than answered (the template's
  ``continue_final_message``), so a caller can put words in the model's mouth.
- The ``prompted`` unsafe expert sees the same input under an unsafe system prompt (prepended to the
  system message, or to the text of a completion prompt).
- Message content is text. A control token of the tokenizer (``<|im_start|>``, ``<|eot_id|>``, ...) written
  inside any message's content, tool-call arguments or tool schema is encoded as the ordinary text it spells,
  never as the control token: a user message, a retrieved document or a tool result cannot open a turn of
  its own. Only the chat template writes control tokens. A completion prompt (a string) is the caller's whole
  prompt and is tokenized as is.
"""

from __future__ import annotations

import re
import uuid
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
            check_text(item, f"prompt {index}")
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
        if role not in _ROLES:
            raise InvalidInputError(
                f"prompt {index}, message {position}: role {role!r} is not one of {', '.join(_ROLES)}"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise InvalidTypeError(
                f"prompt {index}, message {position}: 'content' must be a string; got {type(content).__name__}"
            )
        if content:
            check_text(content, f"prompt {index}, message {position}: 'content'")


def check_text(text: str, where: str) -> None:
    """Raise `InvalidInputError` when ``text`` cannot be encoded as UTF-8 (a lone surrogate from a broken
    decode), naming ``where`` and the position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidInputError(
            f"{where} is not valid text: {text[error.start : error.end]!r} at character {error.start} cannot be "
            "encoded as UTF-8 (a lone surrogate); decode the source with errors='replace'"
        ) from None


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


def control_tokens(tokenizer: Any) -> tuple[str, ...]:
    """The texts of the tokenizer's control tokens (added tokens marked special), longest first."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found = {str(token.content) for token in decoder.values() if getattr(token, "special", False)}
    found.update(str(token) for token in getattr(tokenizer, "all_special_tokens", ()) or ())
    return tuple(sorted((t for t in found if t), key=lambda t: (-len(t), t)))


class _Masked:
    """User-supplied strings with every control token swapped for a placeholder that no template or user can
    produce by chance (a fresh random tag per prompt), and the way back."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self._pattern = pattern
        self._tag = f"SIQ{uuid.uuid4().hex[:12]}Q"
        self.originals: list[str] = []

    def mask(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._pattern.sub(self._swap, value)
        if isinstance(value, Mapping):
            return {key: self.mask(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.mask(item) for item in value]
        return value

    def _swap(self, match: re.Match[str]) -> str:
        self.originals.append(match.group(0))
        return f"{self._tag}{len(self.originals) - 1}{self._tag}"

    def unmask(self, text: str) -> str:
        return re.sub(f"{self._tag}(\\d+){self._tag}", lambda m: self.originals[int(m.group(1))], text)


class PromptFormatter:
    """Renders prompts for one tokenizer. Thread-safe (no state beyond the tokenizer)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        controls = control_tokens(tokenizer)
        self._controls = re.compile("|".join(re.escape(t) for t in controls)) if controls else None
        self._renders_tools: tuple[Any, bool] | None = None

    def forged_turns(self, text: str) -> list[str]:
        """The pieces of ``text`` between the control tokens written inside it (each without a first line that
        is a bare role name): what a forged turn would have said. Empty when ``text`` holds no control token."""
        if self._controls is None or not self._controls.search(text):
            return []
        pieces = []
        for piece in self._controls.split(text):
            head, _, rest = piece.partition("\n")
            if rest and head.strip().isalpha() and len(head.strip()) <= 20:
                piece = rest
            if piece.strip() and piece.strip() not in pieces:
                pieces.append(piece.strip())
        return pieces

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
        """Whether the chat template renders a ``tools`` argument at all (computed once per template)."""
        if not self.has_chat_template:
            return False
        template = self.tokenizer.chat_template
        if self._renders_tools is None or self._renders_tools[0] != template:
            self._renders_tools = (template, self._probe_tools())
        return self._renders_tools[1]

    def _probe_tools(self) -> bool:
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
        special = not self.has_chat_template  # the plain format gets the tokenizer's usual BOS
        masked = _Masked(self._controls) if self._controls is not None else None
        if masked is not None:
            messages, tools = masked.mask(messages), masked.mask(tools)
        text = self.render_chat(messages, tools=tools)
        if masked is None or not masked.originals:
            return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
        return self._encode_escaped(text, masked, special)

    def _encode_escaped(self, text: str, masked: _Masked, add_special: bool) -> list[int]:
        """Token ids of a rendered prompt whose user-supplied control tokens are placeholders: split where the
        template wrote control tokens (as the tokenizer itself splits), encode those as control tokens and every
        piece between them, placeholders restored, as ordinary text."""
        assert self._controls is not None
        ids: list[int] = []
        cursor = 0
        for match in self._controls.finditer(text):
            ids += self._text_ids(masked.unmask(text[cursor : match.start()]))
            ids.append(int(self.tokenizer.convert_tokens_to_ids(match.group(0))))
            cursor = match.end()
        ids += self._text_ids(masked.unmask(text[cursor:]))
        if add_special:
            ids = self._with_special(ids)
        return ids

    def _text_ids(self, text: str) -> list[int]:
        if not text:
            return []
        encoded = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)
        return list(encoded["input_ids"])

    def _with_special(self, ids: list[int]) -> list[int]:
        """``ids`` with the tokens the tokenizer adds around a text (BOS, EOS) when asked to."""
        bare = list(self.tokenizer("a", add_special_tokens=False)["input_ids"])
        full = list(self.tokenizer("a", add_special_tokens=True)["input_ids"])
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                return full[:start] + ids + full[start + len(bare) :]
        return ids
