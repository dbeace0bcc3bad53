"""Evaluation data: read questions (and categories, and accepted answers) from CSV, JSON or JSON Lines.

Column detection (case-insensitive, first match wins; override with ``question_column=`` /
``category_column=`` / ``answer_column=``):

- question: ``question``, ``prompt``, ``goal`` (AdvBench's ``harmful_behaviors.csv``), ``instruction``,
  ``behavior``, ``query``, ``text``;
- category: ``category``, ``topic`` (HarmEval), ``subcategory``, ``type``; when absent, HEx-PHI's layout
  (one headerless CSV per category, ``category_<n>.csv``) takes the category from the file name, and any
  other file gets the category ``"all"``;
- answers (``--qa`` files only): ``answers`` (a JSON list) or ``answer`` / ``answers`` as a string of
  ``|``-separated accepted answers.

Layouts: HarmEval (``Question,Topic``), AdvBench (``goal,target``: ``target`` is ignored), HEx-PHI
(headerless one-column CSVs, one per category), DangerousQA (a JSON list of plain strings), and the
shipped JSON Lines sets (``{"question", "category", ...}``). A JSON file may be a list of objects, a list
of strings, or an object holding such a list under ``data``, ``rows`` or ``questions``.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from ..errors import InvalidInputError, InvalidSettingError
from ..training.data import benign_prompts

Kind = Literal["harmful", "benign", "qa", "tool"]
KINDS: tuple[str, ...] = ("harmful", "benign", "qa", "tool")

QUESTION_COLUMNS: tuple[str, ...] = ("question", "prompt", "goal", "instruction", "behavior", "query", "text")
CATEGORY_COLUMNS: tuple[str, ...] = ("category", "topic", "subcategory", "type")
ANSWER_COLUMNS: tuple[str, ...] = ("answers", "answer", "reference", "references")
DEFAULT_CATEGORY = "all"
SHIPPED_BENIGN = "benign_eval.jsonl"
SHIPPED_QA = "helpfulness_qa.jsonl"
SHIPPED_TOOL_TURNS = "benign_tool_turns.jsonl"
_HEX_PHI_NAME = re.compile(r"^category_?(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class EvalItem:
    """One question to answer: its kind, its category, and (for ``qa``) the accepted answers. A ``tool`` item
    is a whole conversation (``conversation``: JSON of ``{"messages", "tools"}``, OpenAI-style) whose next
    turn must not be refused; its ``question`` is the last user message."""

    kind: Kind
    question: str
    category: str = DEFAULT_CATEGORY
    answers: tuple[str, ...] = ()
    conversation: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidSettingError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if not isinstance(self.question, str) or not self.question.strip():
            raise InvalidInputError(f"question must be a non-empty string; got {self.question!r}")
        if self.kind == "qa" and not self.answers:
            raise InvalidInputError(f"qa question {self.question!r} has no accepted answers")
        if (self.kind == "tool") != (self.conversation is not None):
            raise InvalidInputError(f"a conversation is given with (and only with) kind 'tool'; got kind {self.kind!r}")


def shipped_path(name: str) -> Path:
    """A data file shipped inside the package (``benign_prompts.jsonl``, ``helpfulness_qa.jsonl``)."""
    return Path(str(resources.files("safeinfer_integrations").joinpath("data").joinpath(name)))


def _pick(columns: Iterable[str], wanted: Sequence[str], override: str | None, what: str, path: Path) -> str | None:
    columns = list(columns)
    if override is not None:
        if override not in columns:
            raise InvalidInputError(f"{path}: no {what} column {override!r}; columns are {columns}")
        return override
    lowered = {column.lower().strip(): column for column in columns}
    for name in wanted:
        if name in lowered:
            return lowered[name]
    return None


def _read_records(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8-sig")
    if suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise InvalidInputError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        return records
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise InvalidInputError(f"{path}: not valid JSON ({error.msg})") from None
        if isinstance(data, Mapping):
            for key in ("data", "rows", "questions"):
                if isinstance(data.get(key), list):
                    return list(data[key])
            raise InvalidInputError(f"{path}: a JSON object must hold a list under 'data', 'rows' or 'questions'")
        if not isinstance(data, list):
            raise InvalidInputError(f"{path}: expected a JSON list; got {type(data).__name__}")
        return data
    if suffix in (".csv", ".tsv"):
        delimiter = "\t" if suffix == ".tsv" else ","
        rows = list(csv.reader(text.splitlines(), delimiter=delimiter))
        rows = [row for row in rows if any(cell.strip() for cell in row)]
        if not rows:
            return []
        header = [cell.strip().lower() for cell in rows[0]]
        known = set(QUESTION_COLUMNS) | set(CATEGORY_COLUMNS) | set(ANSWER_COLUMNS) | {"target"}
        if len(rows[0]) == 1 and header[0] not in known:  # HEx-PHI: headerless, one question per row
            return [row[0] for row in rows]
        return [dict(zip(rows[0], row, strict=False)) for row in rows[1:]]
    raise InvalidInputError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .csv, .tsv, .json or .jsonl")


def _answers(value: Any, path: Path, index: int) -> tuple[str, ...]:
    if isinstance(value, str):
        parts = value.split("|")
    elif isinstance(value, (list, tuple)):
        parts = [str(part) for part in value]
    elif value is None:
        parts = []
    else:
        raise InvalidInputError(f"{path}: row {index}: answers must be a string or a list; got {type(value).__name__}")
    return tuple(part.strip() for part in parts if part.strip())


def load_items(
    path: str | os.PathLike[str],
    kind: Kind,
    *,
    question_column: str | None = None,
    category_column: str | None = None,
    answer_column: str | None = None,
) -> list[EvalItem]:
    """Read one file into `EvalItem`s of ``kind`` (rows keep their order; duplicates are kept)."""
    if kind not in KINDS:
        raise InvalidSettingError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such evaluation file: {path}")
    records = _read_records(path)
    if not records:
        raise InvalidInputError(f"{path}: contains no questions")
    file_category = DEFAULT_CATEGORY
    match = _HEX_PHI_NAME.match(path.stem)
    if match:
        file_category = f"category_{match.group(1)}"

    items: list[EvalItem] = []
    if all(isinstance(record, str) for record in records):
        if kind == "qa":
            raise InvalidInputError(f"{path}: a qa file needs an answer column; got plain strings")
        return [EvalItem(kind, record.strip(), file_category) for record in records if record.strip()]
    if not all(isinstance(record, Mapping) for record in records):
        raise InvalidInputError(f"{path}: rows must all be objects or all be strings")
    columns = list(dict.fromkeys(key for record in records for key in record))
    q_col = _pick(columns, QUESTION_COLUMNS, question_column, "question", path)
    if q_col is None:
        raise InvalidInputError(
            f"{path}: no question column; looked for {', '.join(QUESTION_COLUMNS)} (case-insensitive) in "
            f"{columns}; pass question_column=... (--question-column)"
        )
    c_col = _pick(columns, CATEGORY_COLUMNS, category_column, "category", path)
    a_col = _pick(columns, ANSWER_COLUMNS, answer_column, "answer", path) if kind == "qa" else None
    if kind == "qa" and a_col is None:
        raise InvalidInputError(
            f"{path}: a qa file needs an answer column ({', '.join(ANSWER_COLUMNS)}); got {columns}"
        )
    for index, record in enumerate(records):
        question = record.get(q_col)
        if not isinstance(question, str) or not question.strip():
            raise InvalidInputError(
                f"{path}: row {index}: the {q_col!r} value must be a non-empty string; got {question!r}"
            )
        category = record.get(c_col) if c_col else None
        category = str(category).strip() if category not in (None, "") else file_category
        answers = _answers(record.get(a_col), path, index) if a_col else ()
        if kind == "qa" and not answers:
            raise InvalidInputError(f"{path}: row {index}: no accepted answers in column {a_col!r}")
        items.append(EvalItem(kind, question.strip(), category, answers))
    return items


def load_many(paths: Sequence[str | os.PathLike[str]], kind: Kind, **columns: str | None) -> list[EvalItem]:
    """`load_items` over several files, concatenated in order."""
    items: list[EvalItem] = []
    for path in paths:
        items.extend(load_items(path, kind, **columns))
    return items


def default_benign() -> list[EvalItem]:
    """The held-out benign prompts (200: ordinary and sensitive-sounding), categorised by ``kind``: the
    ``evaluation`` split of ``benign_prompts.jsonl`` (50; its other splits fit the harm gate and calibrate
    the vector) and ``benign_eval.jsonl`` (150: 100 questions and 50 imperative requests, used for nothing
    but evaluation)."""
    held_out = [{"question": p.question, "kind": p.kind} for p in benign_prompts("evaluation")]
    rows = held_out + _read_records(shipped_path(SHIPPED_BENIGN))
    return [
        EvalItem("benign", row["question"], row.get("kind") or row.get("category") or DEFAULT_CATEGORY) for row in rows
    ]


def default_qa() -> list[EvalItem]:
    """The shipped helpfulness questions with reference answers (134)."""
    return load_items(shipped_path(SHIPPED_QA), "qa")


def default_tool_turns(split: str = "evaluation") -> list[EvalItem]:
    """The benign agent and tool turns of one split of ``benign_tool_turns.jsonl`` (``evaluation``: 55, held out;
    ``calibration``: 25, held in), categorised by kind (tool_result, tool_request, extraction, formatting)."""
    rows = [row for row in _read_records(shipped_path(SHIPPED_TOOL_TURNS)) if row["split"] == split]
    if not rows:
        raise InvalidSettingError(f"tool-turn split must be calibration or evaluation; got {split!r}")
    return [
        EvalItem(
            "tool",
            next(m["content"] for m in reversed(row["messages"]) if m["role"] == "user"),
            row["kind"],
            conversation=json.dumps({"messages": row["messages"], "tools": row["tools"]}),
        )
        for row in rows
    ]


def limit_items(items: Sequence[EvalItem], limit: int | None) -> list[EvalItem]:
    """At most ``limit`` items, taken round-robin across categories (in file order within each) so that
    a small limit still covers every category. ``None`` keeps everything, in order."""
    if limit is None:
        return list(items)
    if limit < 1:
        raise InvalidSettingError(f"limit must be >= 1 or None; got {limit!r}")
    if limit >= len(items):
        return list(items)
    by_category: dict[str, list[EvalItem]] = {}
    for item in items:
        by_category.setdefault(item.category, []).append(item)
    queues = list(by_category.values())
    chosen: list[EvalItem] = []
    depth = 0
    while len(chosen) < limit:
        for queue in queues:
            if depth < len(queue) and len(chosen) < limit:
                chosen.append(queue[depth])
        depth += 1
    order = {id(item): position for position, item in enumerate(items)}
    return sorted(chosen, key=lambda item: order[id(item)])
