"""The bundled prompt data and its fixed, deterministic splits.

Every split is decided by a hash of the question text within its category (harmful) or kind (benign), so it
does not depend on file order, on a seed, or on which Python runs it:

- ``harmful_demos.jsonl`` (24 per category): 12 ``build`` (ICL demonstrations and queries of the function
  vector, and the harmful side of the harm gate's fit), 4 ``calibration`` (the held-in sweep), 8
  ``evaluation`` (never seen by building or calibration).
- ``harmful_everyday.jsonl`` (10 per category, requests only): 7 ``build`` (added to the harmful side of the
  harm gate's fit, so short "How do I ...?" questions and "Tell me how to ..." requests are not mistaken for
  benign ones), 3 ``calibration`` (added to the held-in harmful questions).
- ``benign_prompts.jsonl`` per kind (ordinary / sensitive_sounding): 40% ``gate`` (benign side of the harm
  gate's fit), 27% ``calibration``, the rest ``evaluation``.

- ``benign_everyday.jsonl`` per kind (30 ordinary, 30 sensitive-sounding "How do I ...?" questions): 20
  ``gate``, 10 ``calibration``. The benign counterpart of the everyday harmful requests, so the gate learns
  what is asked rather than how it is worded.
- ``benign_requests.jsonl`` per kind (50 ordinary, 50 sensitive-sounding imperative requests, a few with their
  own context): 33 ``gate``, 17 ``calibration``. So the gate does not read "an imperative" as "harmful".
- ``harmful_agent_requests.jsonl`` (4 per category): harmful commands to an assistant that can act (send,
  post, order, install, track): 3 ``build`` (harmful side of the harm gate's fit), 1 ``calibration``.
- ``benign_agent_requests.jsonl`` per kind (36 ordinary, 36 sensitive-sounding): commands to an assistant with
  tools ("Book a table ...", "Kill the node processes on port 3000") and extraction instructions with their
  own text: 24 ``gate``, 12 ``calibration``. So the gate does not read "do this for me" or "pull these fields
  out of this text" as harmful. Both agent files feed the harm gate's fit only (`gate_dataset_hash`).
- ``gate_framings.json``: the ways a gate-fit question is put to the model (a bare chat turn, under a system
  prompt, inside a retrieval-style prompt with a document, under an agent's tool instructions), each applied
  to harmful and benign questions alike so the framing carries no signal (`frame`, `framed_questions`). A
  framing may also hold earlier turns (``history``) and the document most relevant to the question
  (``{relevant}``, `relevant_context`); the shipped file uses neither (docs/design.md says why).
- ``gate_tool_framings.json``: two more framings for the gate's fit only (`gate_fit_framings`): the question
  under the system note `ChatSafeInfer` writes when tools are bound and the chat template cannot render them
  (`runtime.tools.with_tool_prompt`), for two sets of three tools (a personal assistant's, a workstation's).

`gate_harmful_questions` and `gate_benign_questions` are the two sides of every gate fit;
`held_in_harmful_questions` and `held_in_benign_questions` those of the calibration sweep and of the shipped
vector's held-in tests.

`dataset_hash` fingerprints the files a vector was built and calibrated from; it is stored in the vector's
metadata. `gate_dataset_hash` fingerprints those and the agent files, the harm gate's fit data; it is stored in
the gate's metadata.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Literal, Protocol, TypeVar

from ..errors import InvalidInputError, InvalidSettingError
from ..runtime.tools import with_tool_prompt

HarmfulSplit = Literal["build", "calibration", "evaluation"]
EverydaySplit = Literal["build", "calibration"]
BenignSplit = Literal["gate", "calibration", "evaluation"]
BenignEverydaySplit = Literal["gate", "calibration"]
HARMFUL_SPLITS: tuple[str, ...] = ("build", "calibration", "evaluation")
BENIGN_SPLITS: tuple[str, ...] = ("gate", "calibration", "evaluation")
_HARMFUL_COUNTS = (12, 4, 8)  # per category of 24
EVERYDAY_SPLITS: tuple[str, ...] = ("build", "calibration")
_EVERYDAY_COUNTS = (7, 3)  # per category of 10
_BENIGN_FRACTIONS = (0.40, 0.27)  # gate, calibration; evaluation takes the rest
BENIGN_EVERYDAY_SPLITS: tuple[str, ...] = ("gate", "calibration")
_BENIGN_EVERYDAY_COUNTS = (20, 10)  # per kind of 30
BenignRequestSplit = Literal["gate", "calibration"]
BENIGN_REQUEST_SPLITS: tuple[str, ...] = ("gate", "calibration")
_BENIGN_REQUEST_COUNTS = (33, 17)  # per kind of 50
AgentSplit = Literal["build", "calibration"]
BenignAgentSplit = Literal["gate", "calibration"]
_AGENT_COUNTS = (3, 1)  # per category of 4
_BENIGN_AGENT_COUNTS = (24, 12)  # per kind of 36
_FILES = (
    "harmful_demos.jsonl",
    "benign_prompts.jsonl",
    "harmful_everyday.jsonl",
    "benign_everyday.jsonl",
    "benign_requests.jsonl",
    "gate_framings.json",
)
_GATE_FILES = _FILES + ("harmful_agent_requests.jsonl", "benign_agent_requests.jsonl", "gate_tool_framings.json")


@dataclass(frozen=True)
class HarmfulDemo:
    question: str
    category: str
    answer: str


@dataclass(frozen=True)
class HarmfulRequest:
    question: str
    category: str


@dataclass(frozen=True)
class BenignPrompt:
    question: str
    kind: str
    category: str


class _Question(Protocol):
    @property
    def question(self) -> str: ...


_Item = TypeVar("_Item", bound=_Question)


def _read(name: str) -> list[dict[str, str]]:
    text = resources.files("safeinfer_integrations").joinpath("data").joinpath(name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _order_key(question: str) -> str:
    return hashlib.sha256(question.encode("utf-8")).hexdigest()


def _per_group(
    items: Sequence[_Item], group: str, file: str, names: tuple[str, ...], counts: tuple[int, ...]
) -> dict[str, tuple[_Item, ...]]:
    """Fixed-count splits: within each value of ``group`` (sorted), the items ordered by `_order_key` give the
    first ``counts[0]`` to ``names[0]``, the next ``counts[1]`` to ``names[1]``, ...; a group of another size
    is an error."""
    groups: dict[str, list[_Item]] = defaultdict(list)
    for item in items:
        groups[getattr(item, group)].append(item)
    out: dict[str, list[_Item]] = {name: [] for name in names}
    total = sum(counts)
    for key in sorted(groups):
        members = sorted(groups[key], key=lambda item: _order_key(item.question))
        if len(members) != total:
            raise InvalidInputError(f"{file}: {group} {key!r} has {len(members)} rows, expected {total}")
        start = 0
        for name, count in zip(names, counts):
            out[name].extend(members[start : start + count])
            start += count
    return {name: tuple(rows) for name, rows in out.items()}


def _pick(splits: dict[str, tuple[_Item, ...]], split: str | None, what: str) -> tuple[_Item, ...]:
    """One split (None: all of them, in split order); an unknown name is an error naming the allowed ones."""
    if split is None:
        return tuple(item for rows in splits.values() for item in rows)
    if split not in splits:
        raise InvalidSettingError(f"{what} split must be one of {', '.join(splits)}; got {split!r}")
    return splits[split]


@lru_cache(maxsize=1)
def _harmful_splits() -> dict[str, tuple[HarmfulDemo, ...]]:
    rows = [HarmfulDemo(r["question"], r["category"], r["answer"]) for r in _read("harmful_demos.jsonl")]
    return _per_group(rows, "category", "harmful_demos.jsonl", HARMFUL_SPLITS, _HARMFUL_COUNTS)


@lru_cache(maxsize=1)
def _everyday_splits() -> dict[str, tuple[HarmfulRequest, ...]]:
    rows = [HarmfulRequest(r["question"], r["category"]) for r in _read("harmful_everyday.jsonl")]
    return _per_group(rows, "category", "harmful_everyday.jsonl", EVERYDAY_SPLITS, _EVERYDAY_COUNTS)


@lru_cache(maxsize=1)
def _benign_splits() -> dict[str, tuple[BenignPrompt, ...]]:
    groups: dict[str, list[BenignPrompt]] = defaultdict(list)
    for row in _read("benign_prompts.jsonl"):
        groups[row["kind"]].append(BenignPrompt(row["question"], row["kind"], row["category"]))
    out: dict[str, list[BenignPrompt]] = {name: [] for name in BENIGN_SPLITS}
    for kind in sorted(groups):
        items = sorted(groups[kind], key=lambda p: _order_key(p.question))
        n_gate = round(_BENIGN_FRACTIONS[0] * len(items))
        n_cal = round(_BENIGN_FRACTIONS[1] * len(items))
        out["gate"].extend(items[:n_gate])
        out["calibration"].extend(items[n_gate : n_gate + n_cal])
        out["evaluation"].extend(items[n_gate + n_cal :])
    return {name: tuple(rows) for name, rows in out.items()}


@lru_cache(maxsize=1)
def _benign_request_splits() -> dict[str, tuple[BenignPrompt, ...]]:
    rows = [BenignPrompt(r["question"], r["kind"], r["category"]) for r in _read("benign_requests.jsonl")]
    return _per_group(rows, "kind", "benign_requests.jsonl", BENIGN_REQUEST_SPLITS, _BENIGN_REQUEST_COUNTS)


@lru_cache(maxsize=1)
def _benign_everyday_splits() -> dict[str, tuple[BenignPrompt, ...]]:
    rows = [BenignPrompt(r["question"], r["kind"], r["category"]) for r in _read("benign_everyday.jsonl")]
    return _per_group(rows, "kind", "benign_everyday.jsonl", BENIGN_EVERYDAY_SPLITS, _BENIGN_EVERYDAY_COUNTS)


@lru_cache(maxsize=1)
def _agent_splits() -> dict[str, tuple[HarmfulRequest, ...]]:
    rows = [HarmfulRequest(r["question"], r["category"]) for r in _read("harmful_agent_requests.jsonl")]
    return _per_group(rows, "category", "harmful_agent_requests.jsonl", EVERYDAY_SPLITS, _AGENT_COUNTS)


@lru_cache(maxsize=1)
def _benign_agent_splits() -> dict[str, tuple[BenignPrompt, ...]]:
    rows = [BenignPrompt(r["question"], r["kind"], r["category"]) for r in _read("benign_agent_requests.jsonl")]
    return _per_group(rows, "kind", "benign_agent_requests.jsonl", BENIGN_EVERYDAY_SPLITS, _BENIGN_AGENT_COUNTS)


def harmful_demos(split: HarmfulSplit | None = None) -> tuple[HarmfulDemo, ...]:
    """Harmful question -> refusal pairs of one split (None: all 264, file order not kept)."""
    return _pick(_harmful_splits(), split, "harmful")


def harmful_everyday(split: EverydaySplit | None = None) -> tuple[HarmfulRequest, ...]:
    """Harmful requests phrased like everyday questions, of one split (None: all 44)."""
    return _pick(_everyday_splits(), split, "everyday harmful")


def benign_prompts(split: BenignSplit | None = None) -> tuple[BenignPrompt, ...]:
    """Benign prompts of one split (None: all 152)."""
    return _pick(_benign_splits(), split, "benign")


def benign_everyday(split: BenignEverydaySplit | None = None) -> tuple[BenignPrompt, ...]:
    """Benign "How do I ...?" questions of one split (None: all 60)."""
    return _pick(_benign_everyday_splits(), split, "everyday benign")


def benign_requests(split: BenignRequestSplit | None = None) -> tuple[BenignPrompt, ...]:
    """Benign imperative requests of one split (None: all 100)."""
    return _pick(_benign_request_splits(), split, "benign request")


def harmful_agent_requests(split: AgentSplit | None = None) -> tuple[HarmfulRequest, ...]:
    """Harmful commands to an assistant that can act, of one split (None: all 44)."""
    return _pick(_agent_splits(), split, "harmful agent request")


def benign_agent_requests(split: BenignAgentSplit | None = None) -> tuple[BenignPrompt, ...]:
    """Benign commands to an assistant with tools and extraction instructions, of one split (None: all 72)."""
    return _pick(_benign_agent_splits(), split, "benign agent request")


def gate_harmful_questions() -> list[str]:
    """The harmful side of a harm gate's fit: the ``build`` demonstrations' questions, then the ``build``
    everyday-phrased requests, then the ``build`` agent commands."""
    return [d.question for d in harmful_demos("build") + harmful_everyday("build") + harmful_agent_requests("build")]


def gate_benign_questions() -> list[str]:
    """The benign side of a harm gate's fit: the ``gate`` split of the benign prompts, of the everyday benign
    questions, of the benign requests, then of the benign agent requests."""
    return [
        p.question
        for p in benign_prompts("gate")
        + benign_everyday("gate")
        + benign_requests("gate")
        + benign_agent_requests("gate")
    ]


def held_in_agent_questions() -> tuple[list[str], list[str]]:
    """The held-in (``calibration``) harmful and benign agent requests: the harm gate's held-in check on
    commands and instructions (the calibration sweep's held-in questions do not include them)."""
    return (
        [r.question for r in harmful_agent_requests("calibration")],
        [p.question for p in benign_agent_requests("calibration")],
    )


def held_in_harmful_questions() -> list[str]:
    """The held-in harmful questions: the ``calibration`` demonstrations, then the ``calibration`` everyday
    requests."""
    return [d.question for d in harmful_demos("calibration") + harmful_everyday("calibration")]


def held_in_benign_questions() -> list[str]:
    """The held-in benign questions: the ``calibration`` split of the benign prompts, of the everyday benign
    questions, then of the benign requests."""
    return [
        p.question
        for p in benign_prompts("calibration") + benign_everyday("calibration") + benign_requests("calibration")
    ]


@dataclass(frozen=True)
class Framing:
    """One way of putting a question to the model: an optional system message, earlier turns of the
    conversation (``history``: (role, content) pairs, user and assistant alternating) and a user message
    template with ``{question}``. The system message and the user template may hold ``{context}`` or
    ``{documents}`` or ``{relevant}`` (see `frame`)."""

    name: str
    system: str | None
    user: str
    history: tuple[tuple[str, str], ...] = ()


@lru_cache(maxsize=1)
def _framings_file() -> dict[str, Any]:
    text = (
        resources.files("safeinfer_integrations")
        .joinpath("data")
        .joinpath("gate_framings.json")
        .read_text(encoding="utf-8")
    )
    return json.loads(text)


def gate_framings() -> tuple[Framing, ...]:
    """The framings of a gate fit (``gate_framings.json``); the first is the bare one-turn chat."""
    return tuple(
        Framing(
            f["name"], f["system"], f["user"], tuple((turn["role"], turn["content"]) for turn in f.get("history", ()))
        )
        for f in _framings_file()["framings"]
    )


def gate_tool_framings() -> tuple[Framing, ...]:
    """The tool framings of a gate fit (``gate_tool_framings.json``): a bare question under the tool note
    `runtime.tools.with_tool_prompt` writes for each file's tools."""
    text = resources.files("safeinfer_integrations").joinpath("data").joinpath("gate_tool_framings.json")
    framings = []
    for f in json.loads(text.read_text(encoding="utf-8"))["framings"]:
        note = with_tool_prompt([{"role": "user", "content": "{question}"}], f["tools"])[0]["content"]
        framings.append(Framing(f["name"], note, "{question}"))
    return tuple(framings)


def gate_fit_framings() -> tuple[Framing, ...]:
    """The framings a harm gate is fitted in: `gate_framings` (also the calibration sweep's), then
    `gate_tool_framings`."""
    return gate_framings() + gate_tool_framings()


_STOPWORDS = frozenset(
    "about after also been before could does doing from have into just like make more most much must never only "
    "other over same should some such than that their them then there these they this those very what when where "
    "which while will with would your yours".split()
)


def _content_words(text: str) -> set[str]:
    words = "".join(c if c.isalpha() else " " for c in text.lower()).split()
    return {w[:-1] if w.endswith("s") else w for w in words if len(w) >= 4 and w not in _STOPWORDS}


def relevant_context(question: str) -> str:
    """The bundled document (``contexts`` and ``topical_contexts``) sharing the most content words with
    ``question`` (ties: the first from a place chosen by a hash of the question), as a retriever would return.
    The same rule for harmful and benign questions, so a harmful question often comes with a document on its
    own topic (a cleaning-safety note for a question about toxic fumes) and a benign one with a document on
    its own, and the document's relevance carries no signal."""
    file = _framings_file()
    pool = list(file["contexts"]) + list(file.get("topical_contexts", ()))
    start = int(_order_key(question), 16) % len(pool)
    return most_relevant(question, pool[start:] + pool[:start])


def most_relevant(question: str, documents: Sequence[str]) -> str:
    """The document sharing the most content words with ``question`` (ties: the first), as a simple retriever
    would return it."""
    words = _content_words(question)
    return max(documents, key=lambda doc: len(words & _content_words(doc)))  # max keeps the first of ties


def frame(question: str, framing: Framing) -> list[dict[str, str]]:
    """``question`` put in ``framing`` as chat messages. ``{context}`` is filled with one bundled document,
    ``{documents}`` with all of them (a long, retrieval-sized context), starting at one chosen by a hash of the
    question, so a question always gets the same text; ``{relevant}`` with `relevant_context`."""
    contexts = _framings_file()["contexts"]
    first = int(_order_key(question), 16) % len(contexts)
    documents = "\n\n".join(contexts[first:] + contexts[:first])

    def fill(template: str) -> str:
        if "{relevant}" in template:
            template = template.replace("{relevant}", relevant_context(question))
        return template.replace("{context}", contexts[first]).replace("{documents}", documents)

    messages = [{"role": "system", "content": fill(framing.system)}] if framing.system else []
    messages += [{"role": role, "content": content} for role, content in framing.history]
    return messages + [{"role": "user", "content": fill(framing.user).replace("{question}", question)}]


def framed_questions(questions: Sequence[str], framings: Sequence[Framing]) -> list[list[dict[str, str]]]:
    """Every question in every framing, question-major (a question's framings are adjacent, so splitting the
    list in halves splits the questions)."""
    return [frame(question, framing) for question in questions for framing in framings]


def _files_hash(names: Sequence[str]) -> str:
    """A short SHA-256 of the named bundled files (each name, then its bytes)."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        digest.update(resources.files("safeinfer_integrations").joinpath("data").joinpath(name).read_bytes())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=1)
def dataset_hash() -> str:
    """A short SHA-256 of the bundled files a vector is built and calibrated from."""
    return _files_hash(_FILES)


@lru_cache(maxsize=1)
def gate_dataset_hash() -> str:
    """A short SHA-256 of the bundled files the harm gate is fitted from (`dataset_hash`'s, the agent
    requests and the tool framings)."""
    return _files_hash(_GATE_FILES)


def structured_people() -> list[dict[str, Any]]:
    """``data/structured_people.jsonl``: 20 made-up people (``text``, ``name``, ``age``) for structured-output
    tests and benchmarks (never fitted on)."""
    return [dict(row) for row in _read("structured_people.jsonl")]
