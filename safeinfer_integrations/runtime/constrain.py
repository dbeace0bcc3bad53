"""Constrained decoding: output that a JSON schema, a regular expression or a grammar allows, token by token.

``response_format`` (any call) takes the OpenAI forms and two of the package's own:

- ``{"type": "text"}`` (or None): no constraint.
- ``{"type": "json_object"}``: any JSON object.
- ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`` (OpenAI's form; ``{"type":
  "json_schema", "schema": {...}}`` works too): JSON valid under the schema.
- ``{"type": "regex", "pattern": "..."}``: text matching the regular expression.
- ``{"type": "grammar", "grammar": "..."}``: text of a Lark grammar (llguidance's syntax, which embeds JSON
  schemas and regexes as terminals).

A list gives one format per prompt of a batch (None for an unconstrained row). ``"refusal": True`` in a JSON
format (or a grammar whose top rule is ``start``) also allows, instead, one refusal sentence (`REFUSAL_REGEX`: "I
can't ...", "Sorry, I can't ...", ending at its first full stop), for the requests SafeInfer protects (mode other than
vanilla, gate weight at or above the cutoff): those can still be declined, as OpenAI's structured outputs return a
refusal; the others are held to the format alone (a plain model given the choice sometimes excuses itself from a
benign request). The adapters' structured output and forced tool calls use it.

The grammars are compiled and matched by llguidance (MIT; one small wheel with no dependencies): at each step
it gives the set of tokens that keep the output valid, and the engine keeps only those. The mask applies to the
steered model's scores before safety-guided decoding (so the plausibility rule is judged among allowed tokens)
and to the final scores after it: SafeInfer still chooses the content, the grammar only the form. End-of-sequence
is allowed exactly when the output is complete. A generation cut by ``max_new_tokens`` can still be incomplete.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import InvalidSettingError

FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "grammar")
_OPENINGS = (
    "I can't",
    "I cannot",
    "I can not",
    "I won't",
    "I will not",
    "I'm not able",
    "I am not able",
    "I'm unable",
    "I am unable",
    "Sorry, I can't",
    "I'm sorry, but I can't",
    "I'm sorry, I can't",
)  # each one the refusal detector (method/refusal.py) reads as a refusal; "I'm sorry" alone is not one
REFUSAL_REGEX = "(" + "|".join(o.replace("'", "['’]") for o in _OPENINGS) + ")[^\\n.!?{}]{0,120}[.!?]"
"""One refusal sentence: a first-person decline the refusal detector reads as one, then up to 120 characters,
ending at the first full stop (short, so it ends well within a structured call's token budget)."""


def check_format(value: Any, where: str = "response_format") -> dict[str, Any] | None:
    """A validated copy of one response format (None: unconstrained); `InvalidSettingError` names the problem."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidSettingError(f"{where} must be a dict like {{'type': 'json_object'}} or None; got {value!r:.80}")
    kind = value.get("type")
    if kind not in FORMAT_TYPES:
        raise InvalidSettingError(f"{where}['type'] must be one of {', '.join(FORMAT_TYPES)}; got {kind!r}")
    if kind == "text":
        return None
    if kind == "json_schema":
        schema = format_schema(value)
        if schema is None:
            raise InvalidSettingError(f"{where}: type 'json_schema' needs json_schema={{'schema': {{...}}}}")
        try:
            json.dumps(schema)
        except (TypeError, ValueError) as error:
            raise InvalidSettingError(f"{where}: the schema is not JSON ({error})") from error
    if kind == "regex" and not isinstance(value.get("pattern"), str):
        raise InvalidSettingError(f"{where}: type 'regex' needs pattern=<str>; got {value.get('pattern')!r}")
    if kind == "grammar" and not isinstance(value.get("grammar"), str):
        raise InvalidSettingError(f"{where}: type 'grammar' needs grammar=<str>; got {value.get('grammar')!r}")
    if not isinstance(value.get("refusal", False), bool) or (value.get("refusal") and kind == "regex"):
        raise InvalidSettingError(f"{where}: 'refusal' must be True or False, and not for a regex")
    if value.get("refusal") and kind == "grammar" and not _START.search(value["grammar"]):
        raise InvalidSettingError(f"{where}: 'refusal' with a grammar needs its top rule to be named 'start'")
    return dict(value)


_START = re.compile(r"^start\s*:", re.MULTILINE)


def format_schema(response_format: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The JSON schema a format carries, in OpenAI's form (``json_schema={"schema": ...}``) or the short one
    (``schema=...``); None when it carries none."""
    holder = response_format.get("json_schema", response_format)
    schema = holder.get("schema") if isinstance(holder, Mapping) else None
    return schema if isinstance(schema, Mapping) else None


def _or_refusal(lark: str) -> str:
    """A Lark grammar (llguidance's syntax) that allows what ``lark`` allows (its ``start`` rule renamed) or one
    refusal sentence."""
    renamed = _START.sub("answer__:", lark, count=1)
    return f"start: answer__ | refusal__\n{renamed}\nrefusal__: /{REFUSAL_REGEX}/"


def closed_schema(schema: Any) -> Any:
    """A copy of a JSON schema in which every object that lists its ``properties`` and says nothing of others
    allows no others (``additionalProperties: false``, as OpenAI's strict mode does). JSON Schema allows extra
    keys by default, and a small model given that freedom invents keys until it runs out of tokens; structured
    output and forced tool calls use this."""
    if isinstance(schema, Mapping):
        closed = {key: closed_schema(value) for key, value in schema.items()}
        if "properties" in closed and "additionalProperties" not in closed:
            closed["additionalProperties"] = False
        return closed
    if isinstance(schema, list):
        return [closed_schema(item) for item in schema]
    return schema


def _grammar(response_format: Mapping[str, Any]) -> str:
    """The llguidance grammar of a checked response format."""
    from llguidance import LLMatcher

    kind = response_format["type"]
    refusal = bool(response_format.get("refusal"))
    if kind in ("json_object", "json_schema"):
        schema = {"type": "object"} if kind == "json_object" else format_schema(response_format)
        if refusal:
            return str(LLMatcher.grammar_from_lark(_or_refusal(f"start: %json {json.dumps(schema)}")))
        return str(LLMatcher.grammar_from_json_schema(json.dumps(schema)))
    if kind == "regex":
        return str(LLMatcher.grammar_from_regex(response_format["pattern"]))
    lark = response_format["grammar"]
    return str(LLMatcher.grammar_from_lark(_or_refusal(lark) if refusal else lark))


_TOKENIZERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _ll_tokenizer(tokenizer: Any, vocab_size: int, eos: Sequence[int]) -> Any:
    """llguidance's view of a fast tokenizer (about 0.3 s to build; cached per tokenizer, size and EOS set)."""
    try:
        import llguidance.hf
    except ModuleNotFoundError as error:
        raise InvalidSettingError(
            "response_format needs llguidance: pip install 'safeinfer-integrations[structured]'"
        ) from error
    key = (vocab_size, tuple(sorted(eos)))
    with _LOCK:
        built = _TOKENIZERS.setdefault(tokenizer, {})
        if key not in built:
            try:
                built[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos))
            except Exception as error:  # a slow tokenizer, or one llguidance cannot read
                raise InvalidSettingError(f"response_format cannot be used with this tokenizer: {error}") from error
        return built[key]


class Constraint:
    """One row's grammar state: which tokens may come next, and the tokens chosen so far."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos: Sequence[int], response_format: Mapping[str, Any]):
        from llguidance import LLMatcher

        self._tokenizer = _ll_tokenizer(tokenizer, vocab_size, eos)
        self._format = dict(response_format)
        self._matcher = LLMatcher(self._tokenizer, _grammar(self._format))
        if self._matcher.is_error():
            raise InvalidSettingError(f"response_format cannot be compiled: {self._matcher.get_error()}")
        self.vocab_size = vocab_size

    def drop_refusal(self) -> None:
        """Hold a request SafeInfer does not protect (plain decoding, or a gate weight under the cutoff) to the
        format alone: its refusal branch is for protected requests. Only before the first token."""
        from llguidance import LLMatcher

        if self._format.get("refusal"):
            self._format["refusal"] = False
            self._matcher = LLMatcher(self._tokenizer, _grammar(self._format))

    def allowed(self, into: torch.Tensor, row: int) -> None:
        """Write this constraint's next-token bits into row ``row`` of ``into`` (int32 words, as llguidance packs
        them: token t is bit t % 32 of word t // 32)."""
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self._matcher, into, row)

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise InvalidSettingError(f"token {token} breaks the response format: {self._matcher.get_error()}")


def allowed_mask(constraints: Sequence[Constraint | None], width: int) -> torch.Tensor | None:
    """A [rows, width] bool mask of the tokens each row may choose next (all True for an unconstrained row);
    None when no row is constrained. One packed bitmask for the batch, unpacked in one vectorised step."""
    if all(c is None for c in constraints):
        return None
    words = (width + 31) // 32
    bits = torch.full((len(constraints), words), -1, dtype=torch.int32)  # every bit set: all allowed
    for row, constraint in enumerate(constraints):
        if constraint is not None:
            constraint.allowed(bits, row)
    unpacked = (bits[:, :, None] >> _SHIFTS) & 1
    return unpacked.reshape(len(constraints), words * 32)[:, :width].bool()


_SHIFTS = torch.arange(32, dtype=torch.int32)


class RefusalOpening:
    """An answer held to open with a refusal (the engine's ``refuse_above``): its first tokens follow one of
    ``sequences`` (the token ids of `method.refusal.REFUSAL_OPENINGS`), the model's scores choosing among them;
    once one is complete nothing more is constrained. Needs no grammar library."""

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        self._sequences = [tuple(sequence) for sequence in sequences if sequence]
        self._taken: list[int] = []
        self.done = not self._sequences

    def next_tokens(self) -> list[int]:
        """The tokens that continue an opening (empty once one is complete)."""
        if self.done:
            return []
        at = len(self._taken)
        return sorted({s[at] for s in self._sequences if len(s) > at and list(s[:at]) == self._taken})

    def advance(self, token: int) -> None:
        if self.done:
            return
        self._taken.append(token)
        self.done = any(list(s) == self._taken for s in self._sequences)


def restrict_to(mask: torch.Tensor | None, rows: Mapping[int, Sequence[int]], shape: tuple[int, int]) -> torch.Tensor:
    """``mask`` (None: all allowed) with each row of ``rows`` (row -> tokens) allowing just those tokens."""
    out = torch.ones(shape, dtype=torch.bool) if mask is None else mask.clone()
    for row, tokens in rows.items():
        out[row] = False
        out[row, list(tokens)] = True
    return out


def row_formats(value: Any, rows: int) -> list[dict[str, Any] | None]:
    """One checked format per row: a single format for every row, or a list with one per row."""
    if isinstance(value, (list, tuple)):
        if len(value) != rows:
            raise InvalidSettingError(f"response_format has {len(value)} entries for {rows} prompts")
        return [check_format(item, f"response_format[{index}]") for index, item in enumerate(value)]
    single = check_format(value)
    return [single] * rows
