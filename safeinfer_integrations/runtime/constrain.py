"""Constrained decoding: output that a JSON schema, a regular expression or a grammar allows, token by token.

``response_format`` (any call) takes the OpenAI forms and two of the package's own:

- ``{"type": "text"}`` (or None): no constraint.
- ``{"type": "json_object"}``: any JSON object.
- ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`` (OpenAI's form; ``{"type":
  "json_schema", "schema": {...}}`` works too): JSON valid under the schema.
- ``{"type": "regex", "pattern": "..."}``: text matching the regular expression.
- ``{"type": "grammar", "grammar": "..."}``: text of a Lark grammar (llguidance's syntax, which embeds JSON
  schemas and regexes as terminals).

A list gives one format per prompt of a batch (None for an unconstrained row).

The grammars are compiled and matched by llguidance (MIT; one small wheel with no dependencies): at each step
it gives the set of tokens that keep the output valid, and the engine keeps only those. The mask applies to the
steered model's scores before safety-guided decoding (so the plausibility rule is judged among allowed tokens)
and to the final scores after it: SafeInfer still chooses the content, the grammar only the form. End-of-sequence
is allowed exactly when the output is complete. A generation cut by ``max_new_tokens`` can still be incomplete.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import InvalidSettingError

FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "grammar")


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
        holder = value.get("json_schema", value)
        schema = holder.get("schema") if isinstance(holder, Mapping) else None
        if not isinstance(schema, Mapping):
            raise InvalidSettingError(f"{where}: type 'json_schema' needs json_schema={{'schema': {{...}}}}")
        try:
            json.dumps(schema)
        except (TypeError, ValueError) as error:
            raise InvalidSettingError(f"{where}: the schema is not JSON ({error})") from error
    if kind == "regex" and not isinstance(value.get("pattern"), str):
        raise InvalidSettingError(f"{where}: type 'regex' needs pattern=<str>; got {value.get('pattern')!r}")
    if kind == "grammar" and not isinstance(value.get("grammar"), str):
        raise InvalidSettingError(f"{where}: type 'grammar' needs grammar=<str>; got {value.get('grammar')!r}")
    return dict(value)


def _grammar(response_format: Mapping[str, Any]) -> str:
    """The llguidance grammar of a checked response format."""
    from llguidance import LLMatcher

    kind = response_format["type"]
    if kind == "json_object":
        return str(LLMatcher.grammar_from_json_schema(json.dumps({"type": "object"})))
    if kind == "json_schema":
        schema = response_format.get("json_schema", response_format)["schema"]
        return str(LLMatcher.grammar_from_json_schema(json.dumps(schema)))
    if kind == "regex":
        return str(LLMatcher.grammar_from_regex(response_format["pattern"]))
    return str(LLMatcher.grammar_from_lark(response_format["grammar"]))


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

        ll_tokenizer = _ll_tokenizer(tokenizer, vocab_size, eos)
        grammar = _grammar(response_format)
        self._matcher = LLMatcher(ll_tokenizer, grammar)
        if self._matcher.is_error():
            raise InvalidSettingError(f"response_format cannot be compiled: {self._matcher.get_error()}")
        self.vocab_size = vocab_size

    def allowed(self, into: torch.Tensor) -> None:
        """Write this row's mask into ``into`` (int32 bits, as llguidance packs them)."""
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self._matcher, into, 0)

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise InvalidSettingError(f"token {token} breaks the response format: {self._matcher.get_error()}")

    @property
    def complete(self) -> bool:
        return bool(self._matcher.is_accepting())


def allowed_mask(constraints: Sequence[Constraint | None], width: int) -> torch.Tensor | None:
    """A [rows, width] bool mask of the tokens each row may choose next (all True for an unconstrained row);
    None when no row is constrained."""
    if all(c is None for c in constraints):
        return None
    from llguidance.torch import allocate_token_bitmask, apply_token_bitmask_inplace

    mask = torch.ones(len(constraints), width, dtype=torch.bool)
    for row, constraint in enumerate(constraints):
        if constraint is None:
            continue
        bits = allocate_token_bitmask(1, constraint.vocab_size)
        constraint.allowed(bits)
        bias = torch.zeros(1, width)
        apply_token_bitmask_inplace(bias, bits)
        mask[row] = torch.isfinite(bias[0])
    return mask


def row_formats(value: Any, rows: int) -> list[dict[str, Any] | None]:
    """One checked format per row: a single format for every row, or a list with one per row."""
    if isinstance(value, (list, tuple)):
        if len(value) != rows:
            raise InvalidSettingError(f"response_format has {len(value)} entries for {rows} prompts")
        return [check_format(item, f"response_format[{index}]") for index, item in enumerate(value)]
    single = check_format(value)
    return [single] * rows
