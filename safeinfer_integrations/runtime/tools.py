"""Tool calling for local chat models, without any framework: the prompt that describes tools, the parser
that reads tool calls back out of generated text, and the plain message dicts the engine renders.

How tools reach the model
    If the model's chat template renders a ``tools`` argument (``formatter.template_uses_tools()``), the
    OpenAI-style schemas go through the template (``engine.generate(..., tools=...)``). Otherwise
    (``needs_tool_prompt(formatter)`` is true, e.g. SmolLM2's template) the adapters put
    ``tool_prompt(tools)`` into the system message: a description of every tool and the one output format
    the parser reads, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

What the parser reads (``parse_tool_calls``)
    1. ``<tool_call>{json}</tool_call>`` blocks, anywhere in the text; a final block without its closing
       tag (generation stopped) counts too. The JSON may be one call or a list of calls.
    2. Otherwise, bare JSON: the whole reply (optionally in a ```json fence) or any JSON object/list inside
       it that has the shape of a call. With ``tool_names`` given, a bare-JSON call must name one of them
       (so an answer that merely contains JSON is not mistaken for a call).
    A call is an object with ``"name"`` and ``"arguments"`` (or ``"parameters"``), or OpenAI's
    ``{"function": {"name", "arguments"}}``; string arguments holding a JSON object are decoded. Anything
    malformed is never an error: it stays in the returned content, untouched.

History
    ``assistant_message`` renders an assistant turn that made tool calls (OpenAI ``tool_calls`` field, plus
    the calls written inline in the text for templates that ignore that field) and ``tool_result_message`` a
    tool's result; the engine folds roles a template rejects (see ``prompts.py``).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInputError, InvalidSettingError, InvalidTypeError
from .constrain import closed_schema
from .prompts import add_to_system

__all__ = [
    "ParsedToolCall",
    "ToolSplitter",
    "assistant_message",
    "forced_call_format",
    "needs_tool_prompt",
    "normalize_tool",
    "parse_tool_calls",
    "split_text",
    "tool_prompt",
    "tool_names_of",
    "tool_result_message",
    "with_tool_prompt",
]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ParsedToolCall:
    """One tool call read from generated text. ``id`` is fresh for every parsed call (``call_<hex>``)."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=_new_id)

    def as_openai(self) -> dict[str, Any]:
        """The OpenAI / chat-template form: ``{"id", "type": "function", "function": {...}}``."""
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}

    def as_json(self) -> str:
        """The call as the model is asked to write it (without the tags)."""
        return json.dumps({"name": self.name, "arguments": self.arguments}, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------- prompts
def normalize_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI-style tool schema: ``{"type": "function", "function": {name, description, parameters}}``.

    Accepts that form or the bare function dict ``{"name", "description", "parameters"}``; raises
    `InvalidInputError` (a ValueError) naming what is missing otherwise."""
    if not isinstance(tool, Mapping):
        raise InvalidTypeError(f"a tool must be a dict (an OpenAI-style tool schema); got {type(tool).__name__}")
    function = tool.get("function") if "function" in tool else tool
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
        raise InvalidInputError(
            "a tool must be {'type': 'function', 'function': {'name': ..., 'description': ..., 'parameters': "
            f"{{...}}}} or the inner function dict with a non-empty 'name'; got {dict(tool)!r:.200}"
        )
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, Mapping):
        raise InvalidInputError(
            f"tool {function['name']!r}: 'parameters' must be a JSON schema dict; got {parameters!r}"
        )
    return {
        "type": "function",
        "function": {
            "name": function["name"],
            "description": str(function.get("description") or ""),
            "parameters": dict(parameters),
        },
    }


def forced_call_format(tools: Sequence[Mapping[str, Any]], tool_choice: str | None) -> dict[str, Any] | None:
    """The response format (`constrain`) of a reply that must call a tool: one
    ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` block whose name is one of the tools (``"any"``,
    ``"required"``) or the named one, and whose arguments are valid under that tool's parameter schema (objects
    closed to unlisted keys, `constrain.closed_schema`), or, for a request SafeInfer protects, one refusal sentence
    (`constrain.REFUSAL_REGEX`: it can still be declined). None when the model may answer in text (``None``, ``"auto"``,
    ``"none"``)."""
    normalized = [normalize_tool(t) for t in tools]
    if tool_choice in ("any", "required"):
        chosen = normalized
    else:
        chosen = [t for t in normalized if t["function"]["name"] == tool_choice]
        if not chosen:
            return None
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": closed_schema({"type": "object", **t["function"]["parameters"]}),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    grammar = (
        f"start: {json.dumps(TOOL_CALL_OPEN)} call {json.dumps(TOOL_CALL_CLOSE)}\ncall: %json {json.dumps(schema)}"
    )
    return {"type": "grammar", "grammar": grammar, "refusal": True}


def tool_prompt(tools: Sequence[Mapping[str, Any]], *, tool_choice: str | None = None) -> str:
    """The fallback system prompt for chat templates that do not render tools.

    It lists each tool (name, description, JSON-schema parameters) and asks for calls written as
    ``<tool_call>{"name": <tool name>, "arguments": {...}}</tool_call>``, one block per call, or a normal
    answer when no tool is needed. ``tool_choice``: None/``"auto"`` (the model decides), ``"any"`` or
    ``"required"`` (it must call a tool), ``"none"`` (it must not), or a tool name (it must call that one).
    """
    normalized = [normalize_tool(t) for t in tools]
    if not normalized:
        raise InvalidInputError("tool_prompt needs at least one tool")
    names = [t["function"]["name"] for t in normalized]
    lines = [
        "You can call the following tools. Each is given as a JSON schema of its arguments.",
        "",
    ]
    for tool in normalized:
        function = tool["function"]
        lines.append(f"- {function['name']}: {function['description']}".rstrip(": ").rstrip())
        lines.append(f"  arguments: {json.dumps(function['parameters'], ensure_ascii=False)}")
    lines += [
        "",
        "To call a tool, reply with exactly this, and nothing else, for each call:",
        f'{TOOL_CALL_OPEN}{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}{TOOL_CALL_CLOSE}',
        "After a call you will receive the tool's result; then answer the user using it.",
    ]
    if tool_choice in (None, "auto"):
        lines.append("If no tool is needed, answer the user directly in plain text.")
    elif tool_choice in ("any", "required"):
        lines.append("You must call one of the tools now.")
    elif tool_choice == "none":
        lines.append("Do not call any tool now: answer the user directly in plain text.")
    elif tool_choice in names:
        lines.append(f"You must call the tool {tool_choice} now.")
    else:
        raise InvalidSettingError(
            f"tool_choice must be None, 'auto', 'any', 'required', 'none' or one of the tool names "
            f"({', '.join(names)}); got {tool_choice!r}"
        )
    return "\n".join(lines)


def needs_tool_prompt(formatter: Any) -> bool:
    """True when the chat template ignores ``tools`` (so ``tool_prompt`` must describe them instead)."""
    return not formatter.template_uses_tools()


def with_tool_prompt(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]], *, tool_choice: str | None = None
) -> list[dict[str, Any]]:
    """``messages`` with ``tool_prompt(tools)`` added to the system message (prepending one if none)."""
    return add_to_system(messages, tool_prompt(tools, tool_choice=tool_choice))


# ---------------------------------------------------------------------------------------------- history
def assistant_message(
    content: str, tool_calls: Iterable[ParsedToolCall | Mapping[str, Any]], *, inline: bool = True
) -> dict[str, Any]:
    """An assistant turn that made tool calls, as a plain dict for the engine.

    ``tool_calls`` items are ``ParsedToolCall``s or dicts with ``name``, ``args``/``arguments`` and an
    optional ``id`` (LangChain's ``ToolCall`` is such a dict). The result carries OpenAI's ``tool_calls``
    field; with ``inline`` (the default, for templates that ignore that field) the calls are also written
    into the content in the ``<tool_call>`` form the model was asked to use."""
    calls = [_as_parsed(call) for call in tool_calls]
    text = content or ""
    if inline and calls:
        blocks = "\n".join(f"{TOOL_CALL_OPEN}{call.as_json()}{TOOL_CALL_CLOSE}" for call in calls)
        text = f"{text}\n{blocks}" if text else blocks
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [call.as_openai() for call in calls]
    return message


def tool_result_message(content: Any, *, name: str | None = None, tool_call_id: str | None = None) -> dict[str, Any]:
    """A tool's result as a ``tool`` message; non-string content is written as JSON."""
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False, default=str)
    message: dict[str, Any] = {"role": "tool", "content": text}
    if name:
        message["name"] = name
    if tool_call_id:
        message["tool_call_id"] = tool_call_id
    return message


def _as_parsed(call: ParsedToolCall | Mapping[str, Any]) -> ParsedToolCall:
    if isinstance(call, ParsedToolCall):
        return call
    if not isinstance(call, Mapping):
        raise InvalidTypeError(f"a tool call must be a ParsedToolCall or a dict; got {type(call).__name__}")
    inner = call.get("function")
    source: Mapping[str, Any] = inner if isinstance(inner, Mapping) else call
    name = source.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"a tool call needs a non-empty 'name'; got {dict(call)!r:.200}")
    arguments = source.get("args", source.get("arguments", source.get("parameters", {})))
    if isinstance(arguments, str):
        decoded = _loads(arguments)
        arguments = decoded if isinstance(decoded, dict) else {"input": arguments}
    if not isinstance(arguments, Mapping):
        raise InvalidInputError(f"tool call {name!r}: arguments must be a dict; got {arguments!r:.200}")
    return ParsedToolCall(name=name, arguments=dict(arguments), id=str(call.get("id") or _new_id()))


# ---------------------------------------------------------------------------------------------- parsing
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
_DECODER = json.JSONDecoder()


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _call_from(obj: Any) -> ParsedToolCall | None:
    """A call from one decoded JSON object, or None when it is not call-shaped."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict) and "name" not in obj:
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    if "arguments" in obj:
        arguments = obj["arguments"]
    elif "parameters" in obj:
        arguments = obj["parameters"]
    else:
        return None
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        arguments = {}
    elif isinstance(arguments, str):
        arguments = _loads(arguments)  # a JSON-encoded object (OpenAI's form); anything else is malformed
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(name=name.strip(), arguments=arguments)


def _calls_from(obj: Any) -> list[ParsedToolCall] | None:
    """Calls from a decoded object or list of objects; None unless every item is call-shaped."""
    items = obj if isinstance(obj, list) else [obj]
    if not items:
        return None
    calls = [_call_from(item) for item in items]
    if any(call is None for call in calls):
        return None
    return calls  # type: ignore[return-value]


def _parse_tagged(text: str) -> tuple[str, list[ParsedToolCall]] | None:
    """Read ``<tool_call>`` blocks; None when the text has no opening tag."""
    if TOOL_CALL_OPEN not in text:
        return None
    calls: list[ParsedToolCall] = []
    kept: list[str] = []
    position = 0
    while True:
        start = text.find(TOOL_CALL_OPEN, position)
        if start < 0:
            kept.append(text[position:])
            break
        body_start = start + len(TOOL_CALL_OPEN)
        end = text.find(TOOL_CALL_CLOSE, body_start)
        body_end = end if end >= 0 else len(text)
        block_end = end + len(TOOL_CALL_CLOSE) if end >= 0 else len(text)
        body = text[body_start:body_end].strip()
        fenced = _FENCE.match(body)
        found = _calls_from(_loads(fenced.group(1) if fenced else body))
        if found:
            kept.append(text[position:start])
            calls.extend(found)
        else:  # malformed: leave the whole block as content
            kept.append(text[position:block_end])
        position = block_end
        if end < 0:
            break
    return _join(kept), calls


def _parse_bare(text: str, tool_names: Collection[str] | None) -> tuple[str, list[ParsedToolCall]]:
    """Read call-shaped JSON objects/lists anywhere in the text."""

    def allowed(found: list[ParsedToolCall]) -> bool:
        return tool_names is None or all(call.name in tool_names for call in found)

    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    whole = _calls_from(_loads(fenced.group(1) if fenced else stripped))
    if whole and allowed(whole):
        return "", whole
    calls: list[ParsedToolCall] = []
    kept: list[str] = []
    position = index = 0
    while index < len(text):
        if text[index] not in "{[":
            index += 1
            continue
        try:
            obj, end = _DECODER.raw_decode(text, index)
        except (ValueError, RecursionError):
            index += 1
            continue
        found = _calls_from(obj)
        if found and allowed(found):
            kept.append(text[position:index])
            calls.extend(found)
            position = end
        index = end  # a decoded value that is not a call is skipped whole (no calls read from inside it)
    if not calls:
        return text, []
    kept.append(text[position:])
    return _join(kept), calls


def _join(parts: list[str]) -> str:
    text = "".join(parts)
    text = re.sub(r"```(?:json)?\s*```", "", text)  # fences emptied by removing the call inside
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def parse_tool_calls(text: str, *, tool_names: Collection[str] | None = None) -> tuple[str, list[ParsedToolCall]]:
    """Split generated text into (remaining content, tool calls). Never raises on malformed JSON.

    ``<tool_call>`` blocks take precedence; bare JSON is read only when the text has no such block. With
    ``tool_names``, bare-JSON calls must name one of those tools (tagged calls are always read: the model
    said explicitly it is calling a tool). With no calls found, the content is ``text`` unchanged."""
    if not isinstance(text, str):
        raise InvalidTypeError(f"parse_tool_calls takes the generated text (a str); got {type(text).__name__}")
    tagged = _parse_tagged(text)
    if tagged is not None:
        content, calls = tagged
        return (content, calls) if calls else (text, [])
    return _parse_bare(text, tool_names)


# ---------------------------------------------------------------------------------------------- streaming
_TRIGGERS = "<{[`"


@dataclass
class ToolSplitter:
    """Splits generated text into content and tool calls, the same way for invoke and stream.

    The rule: the text up to the first ``<``, ``{``, ``[`` or backtick (where a tool call could start) is
    content as is, except trailing whitespace when calls follow; the rest is read by
    `parse_tool_calls` (calls removed, what remains appended). While streaming, text before that
    point is handed out as it comes; after it, text is held until generation ends. With no tools bound,
    everything is content."""

    tool_names: frozenset[str] | None  # None: no tools bound
    text: str = ""
    emitted: int = 0
    cut: int | None = None  # index of the first trigger character, once seen
    content: str = ""  # the whole content, once finished

    def push(self, piece: str) -> str:
        """Add a piece of generated text; return the content that is decided now."""
        self.text += piece
        if self.tool_names is None:
            return self._emit(len(self.text))
        if self.cut is None:
            hits = [i for i in (self.text.find(c, self.emitted) for c in _TRIGGERS) if i >= 0]
            if hits:
                self.cut = min(hits)
        head = self.text if self.cut is None else self.text[: self.cut]
        return self._emit(len(head.rstrip()))

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        """Generation ended: (the rest of the content, the tool calls). ``content`` then holds it all."""
        calls: list[ParsedToolCall] = []
        if self.tool_names is not None and self.cut is not None:
            head, tail = self.text[: self.cut], self.text[self.cut :]
            rest, calls = parse_tool_calls(tail, tool_names=self.tool_names)
        if not calls:
            self.content = self.text
            return self._emit(len(self.text)), []
        self.content = head.rstrip() + (("\n" if head.strip() else "") + rest if rest else "")
        remaining = self.content[self.emitted :]
        self.emitted = len(self.content)
        return remaining, calls

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece


def split_text(text: str, tool_names: frozenset[str] | None) -> tuple[str, list[ParsedToolCall]]:
    """The content and tool calls of a whole generation (exactly what streaming assembles)."""
    splitter = ToolSplitter(tool_names)
    head = splitter.push(text)
    rest, calls = splitter.finish()
    return head + rest, calls


def tool_names_of(tools: Sequence[Mapping[str, Any]] | None) -> frozenset[str] | None:
    if not tools:
        return None
    return frozenset(str(t.get("function", t).get("name")) for t in tools)
