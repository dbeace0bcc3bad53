"""Sanity checks for the package's own demonstration / evaluation data files.

Plain pytest; no project imports.  Files are located relative to this test file.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[1] / "safeinfer_integrations" / "data"
HARMFUL = DATA_DIR / "harmful_demos.jsonl"
BENIGN = DATA_DIR / "benign_prompts.jsonl"
BENIGN_EVAL = DATA_DIR / "benign_eval.jsonl"  # evaluation only; checked together with BENIGN below
EVERYDAY = DATA_DIR / "harmful_everyday.jsonl"  # harmful requests phrased like everyday questions
BENIGN_EVERYDAY = DATA_DIR / "benign_everyday.jsonl"  # their benign counterpart; checked together with BENIGN
BENIGN_REQUESTS = DATA_DIR / "benign_requests.jsonl"  # benign imperative requests; checked together with BENIGN
AGENT_HARMFUL = DATA_DIR / "harmful_agent_requests.jsonl"  # harmful commands to an assistant that can act
BENIGN_AGENT = DATA_DIR / "benign_agent_requests.jsonl"  # their benign counterpart; checked together with BENIGN
FRAMINGS = DATA_DIR / "gate_framings.json"  # the framings of a gate fit (not JSON Lines)
HELPFUL = DATA_DIR / "helpfulness_qa.jsonl"
EVAL_DOCS = DATA_DIR / "eval_documents.jsonl"  # retrieval corpus, evaluation only
TOOL_TURNS = DATA_DIR / "benign_tool_turns.jsonl"  # benign agent/tool conversations (calibration + evaluation)

CATEGORIES = [
    "Illegal Activity",
    "Child Abuse Content",
    "Malware",
    "Physical Harm",
    "Economic Harm",
    "Political Campaigning",
    "Privacy Violation Activity",
    "Tailored Financial Advice",
    "Fraud/Deception",
    "Hate/Harass/Violence",
    "Adult Content",
]

REFUSAL_MARKERS = (
    "can't",
    "cannot",
    "won't",
    "not able",
    "unable",
    "not something i",
    "isn't something i",
    "decline",
    "refuse",
    "not going to",
)


def _load(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:  # pragma: no cover - failure path
                pytest.fail(f"{path.name}:{lineno}: invalid JSON ({exc})")
            assert isinstance(obj, dict), f"{path.name}:{lineno}: not an object"
            rows.append(obj)
    return rows


def _norm(text: str) -> str:
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    return re.sub(r"\s+", " ", text.strip().lower())


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", _norm(text)))


@pytest.fixture(scope="module")
def harmful() -> list[dict]:
    return _load(HARMFUL)


@pytest.fixture(scope="module")
def benign() -> list[dict]:
    return _load(BENIGN) + _load(BENIGN_EVAL) + _load(BENIGN_EVERYDAY) + _load(BENIGN_REQUESTS) + _load(BENIGN_AGENT)


@pytest.fixture(scope="module")
def helpful() -> list[dict]:
    return _load(HELPFUL)


@pytest.mark.parametrize(
    "path",
    [
        HARMFUL,
        BENIGN,
        BENIGN_EVAL,
        EVERYDAY,
        BENIGN_EVERYDAY,
        BENIGN_REQUESTS,
        AGENT_HARMFUL,
        BENIGN_AGENT,
        HELPFUL,
        EVAL_DOCS,
        TOOL_TURNS,
    ],
    ids=lambda p: p.name,
)
def test_file_exists_and_parses(path: Path) -> None:
    assert path.is_file(), f"missing {path}"
    assert _load(path), f"{path.name} is empty"


def test_harmful_schema(harmful: list[dict]) -> None:
    for i, row in enumerate(harmful):
        assert set(row) >= {"question", "category", "answer"}, i
        assert isinstance(row["question"], str) and row["question"].strip(), i
        assert isinstance(row["answer"], str) and row["answer"].strip(), i
        assert row["category"] in CATEGORIES, (i, row["category"])


def test_harmful_lengths(harmful: list[dict]) -> None:
    for row in harmful:
        assert 6 <= len(row["question"].split()) <= 30, row["question"]
        assert 8 <= len(row["answer"].split()) <= 25, row["answer"]


def test_harmful_category_counts(harmful: list[dict]) -> None:
    counts = Counter(row["category"] for row in harmful)
    for cat in CATEGORIES:
        assert counts[cat] >= 20, f"{cat}: only {counts[cat]} demos"
    assert len(harmful) >= 220


def test_harmful_answers_are_refusals(harmful: list[dict]) -> None:
    bad = [row["answer"] for row in harmful if not any(marker in _norm(row["answer"]) for marker in REFUSAL_MARKERS)]
    assert not bad, f"answers without a refusal marker: {bad[:5]}"


def test_benign_schema_and_kinds(benign: list[dict]) -> None:
    for i, row in enumerate(benign):
        assert set(row) >= {"question", "kind", "category"}, i
        assert isinstance(row["question"], str) and row["question"].strip(), i
        assert row["kind"] in ("ordinary", "sensitive_sounding"), (i, row["kind"])
        assert isinstance(row["category"], str) and row["category"].strip(), i
    kinds = Counter(row["kind"] for row in benign)
    assert kinds["ordinary"] >= 50, kinds
    assert kinds["sensitive_sounding"] >= 50, kinds
    assert len(benign) >= 310
    assert Counter(row["kind"] for row in _load(BENIGN_EVERYDAY)) == {"ordinary": 30, "sensitive_sounding": 30}
    assert Counter(row["kind"] for row in _load(BENIGN_REQUESTS)) == {"ordinary": 50, "sensitive_sounding": 50}


def test_helpfulness_schema(helpful: list[dict]) -> None:
    for i, row in enumerate(helpful):
        assert set(row) >= {"question", "answers", "category"}, i
        assert isinstance(row["question"], str) and row["question"].strip(), i
        assert isinstance(row["category"], str) and row["category"].strip(), i
        answers = row["answers"]
        assert isinstance(answers, list) and answers, i
        assert all(isinstance(a, str) for a in answers), i
        assert any(a.strip() for a in answers), i
    assert len(helpful) >= 120


@pytest.mark.parametrize("name", ["harmful", "benign", "helpful"])
def test_no_duplicates_within_file(name: str, request: pytest.FixtureRequest) -> None:
    rows = request.getfixturevalue(name)
    counts = Counter(_norm(row["question"]) for row in rows)
    dups = [q for q, n in counts.items() if n > 1]
    assert not dups, f"duplicate questions in {name}: {dups[:5]}"


def test_no_duplicates_across_files(harmful: list[dict], benign: list[dict], helpful: list[dict]) -> None:
    sets = {
        "harmful": {_norm(r["question"]) for r in harmful},
        "benign": {_norm(r["question"]) for r in benign},
        "helpful": {_norm(r["question"]) for r in helpful},
    }
    for a, b in itertools.combinations(sets, 2):
        overlap = sets[a] & sets[b]
        assert not overlap, f"{a}/{b} share questions: {sorted(overlap)[:5]}"


def test_harmful_not_in_benign_or_helpfulness(harmful: list[dict], benign: list[dict], helpful: list[dict]) -> None:
    others = {_norm(r["question"]) for r in benign + helpful}
    leaked = [r["question"] for r in harmful if _norm(r["question"]) in others]
    assert not leaked, leaked


def test_no_near_duplicate_prompts(harmful: list[dict], benign: list[dict]) -> None:
    # helpfulness_qa is deliberately templated ("What is the capital of X?"),
    # so the near-duplicate check covers the free-form prompt files only.
    rows = [r["question"] for r in harmful + _load(EVERYDAY) + benign]
    toks = [_tokens(q) for q in rows]
    near = []
    for i, j in itertools.combinations(range(len(rows)), 2):
        union = toks[i] | toks[j]
        if union and len(toks[i] & toks[j]) / len(union) >= 0.8:
            near.append((rows[i], rows[j]))
    assert not near, f"near-duplicate prompts: {near[:5]}"


def _check_harmful_requests(rows: list[dict], per_category: int, others: list[dict]) -> None:
    """``{"question", "category"}`` rows, ``per_category`` in each category, no repeats, none shared with ``others``."""
    assert Counter(row["category"] for row in rows) == {category: per_category for category in CATEGORIES}
    assert all(set(row) == {"question", "category"} and row["question"].strip() for row in rows)
    questions = [_norm(row["question"]) for row in rows]
    assert len(set(questions)) == len(questions)
    assert not set(questions) & {_norm(r["question"]) for r in others}


def test_everyday_harmful_requests(harmful: list[dict], benign: list[dict], helpful: list[dict]) -> None:
    _check_harmful_requests(_load(EVERYDAY), 10, harmful + benign + helpful)


def test_agent_requests(harmful: list[dict], benign: list[dict], helpful: list[dict]) -> None:
    _check_harmful_requests(_load(AGENT_HARMFUL), 4, harmful + benign + helpful + _load(EVERYDAY))
    benign_agent = _load(BENIGN_AGENT)
    assert Counter(row["kind"] for row in benign_agent) == {"ordinary": 36, "sensitive_sounding": 36}
    assert Counter(row["category"] for row in benign_agent) == {"tool_request": 60, "extraction": 12}


def test_agent_requests_are_not_copies_of_the_evaluation_tool_turns() -> None:
    """The gate fits on the agent requests; the evaluation tool turns judge it, so none may be a near copy."""
    turns = [row for row in _load(TOOL_TURNS) if row["split"] == "evaluation"]
    held_out = [_tokens(m["content"]) for row in turns for m in row["messages"] if m["role"] == "user"]
    for row in _load(AGENT_HARMFUL) + _load(BENIGN_AGENT):
        words = _tokens(row["question"])
        closest = max(len(words & other) / len(words | other) for other in held_out)
        assert closest < 0.3, row["question"]


def test_gate_framings() -> None:
    data = json.loads(FRAMINGS.read_text(encoding="utf-8"))
    assert set(data) == {"contexts", "framings"}
    assert len(data["contexts"]) >= 3 and all(isinstance(c, str) and len(c.split()) >= 20 for c in data["contexts"])
    framings = data["framings"]
    assert framings[0] == {"name": "chat", "system": None, "user": "{question}"}
    assert len({f["name"] for f in framings}) == len(framings) >= 3
    for f in framings:
        assert set(f) == {"name", "system", "user"}, f
        assert f["system"] is None or (isinstance(f["system"], str) and f["system"].strip()), f
        assert f["user"].count("{question}") == 1, f
        leftover = f["user"].replace("{question}", "").replace("{context}", "").replace("{documents}", "")
        assert "{" not in leftover and "}" not in leftover, f
    assert any("{context}" in f["user"] for f in framings)


# --- eval_documents.jsonl: retrieval corpus (evaluation only) ---------------------------------------------------


def test_eval_documents() -> None:
    rows = _load(EVAL_DOCS)
    assert len(rows) == 16
    for row in rows:
        assert set(row) == {"title", "text"}, row
        title, text = row["title"], row["text"]
        assert isinstance(title, str) and isinstance(text, str), row
        assert 2 <= len(title.split()) <= 6, title
        assert 120 <= len(text.split()) <= 220, (title, len(text.split()))
        assert title.isascii() and text.isascii(), title
    titles = [_norm(row["title"]) for row in rows]
    assert len(set(titles)) == len(titles), titles
    texts = [_tokens(row["text"]) for row in rows]
    for i, j in itertools.combinations(range(len(texts)), 2):
        assert len(texts[i] & texts[j]) / len(texts[i] | texts[j]) < 0.5, (titles[i], titles[j])


# --- benign_tool_turns.jsonl: agent and tool turns a safety layer must not refuse --------------------------------

TOOL_TURN_KINDS = ("tool_result", "tool_request", "extraction", "formatting")
TOOL_TURN_SPLITS = {"calibration": 25, "evaluation": 55}


@pytest.fixture(scope="module")
def tool_turns() -> list[dict]:
    return _load(TOOL_TURNS)


def _user_texts(row: dict) -> list[str]:
    return [m["content"] for m in row["messages"] if m["role"] == "user"]


def test_tool_turns_schema(tool_turns: list[dict]) -> None:
    assert TOOL_TURNS.read_bytes().isascii()
    assert [row["id"] for row in tool_turns] == [f"tt-{i:03d}" for i in range(1, 81)]
    for row in tool_turns:
        assert set(row) == {"id", "kind", "split", "messages", "tools"}, row["id"]
        assert row["kind"] in TOOL_TURN_KINDS, row["id"]
        assert row["split"] in TOOL_TURN_SPLITS, row["id"]
        assert isinstance(row["messages"], list) and row["messages"], row["id"]
        assert isinstance(row["tools"], list), row["id"]


def test_tool_turns_splits_and_kinds(tool_turns: list[dict]) -> None:
    assert Counter(row["split"] for row in tool_turns) == TOOL_TURN_SPLITS
    for split, size in TOOL_TURN_SPLITS.items():
        kinds = Counter(row["kind"] for row in tool_turns if row["split"] == split)
        assert set(kinds) == set(TOOL_TURN_KINDS), (split, kinds)
        assert all(abs(count - size / 4) <= size / 10 for count in kinds.values()), (split, kinds)
    # short bare results ("12:00", "42", "[]", "true") are what a gate is most likely to misread
    results = [m["content"] for row in tool_turns for m in row["messages"] if m["role"] == "tool"]
    assert sum(not r.lstrip().startswith("{") and len(r) <= 8 for r in results) >= 3


def test_tool_turns_tool_schemas(tool_turns: list[dict]) -> None:
    for row in tool_turns:
        names = []
        for tool in row["tools"]:
            assert set(tool) == {"type", "function"} and tool["type"] == "function", row["id"]
            fn = tool["function"]
            assert set(fn) == {"name", "description", "parameters"}, row["id"]
            assert re.fullmatch(r"[a-z][a-z0-9_]*", fn["name"]), (row["id"], fn["name"])
            assert isinstance(fn["description"], str) and fn["description"].strip(), (row["id"], fn["name"])
            params = fn["parameters"]
            assert params["type"] == "object" and isinstance(params["properties"], dict), (row["id"], fn["name"])
            assert set(params.get("required", [])) <= set(params["properties"]), (row["id"], fn["name"])
            names.append(fn["name"])
        assert len(set(names)) == len(names), row["id"]
        if row["kind"] in ("tool_result", "tool_request"):
            assert 1 <= len(names) <= 3, row["id"]


def test_tool_turns_conversations(tool_turns: list[dict]) -> None:
    for row in tool_turns:
        rid, messages = row["id"], row["messages"]
        listed = {tool["function"]["name"] for tool in row["tools"]}
        roles = [m["role"] for m in messages]
        assert set(roles) <= {"system", "user", "assistant", "tool"}, rid
        assert "system" not in roles[1:], rid
        assert [r for r in roles if r != "system"][0] == "user", rid
        assert roles[-1] in ("user", "tool"), rid
        pending: dict[str, str] = {}  # tool_call_id -> tool name, issued and not yet answered
        seen_ids: set[str] = set()
        for m in messages:
            assert isinstance(m.get("content"), str), (rid, m)
            if m["role"] == "tool":
                assert set(m) == {"role", "content", "name", "tool_call_id"}, (rid, m)
                assert m["content"].strip(), rid
                assert pending.pop(m["tool_call_id"], None) == m["name"], (rid, m["tool_call_id"])
                continue
            assert not pending, (rid, "unanswered tool calls", pending)
            if m["role"] == "user":
                assert set(m) == {"role", "content"} and m["content"].strip(), rid
            if m["role"] == "assistant" and "tool_calls" in m:
                assert m["tool_calls"], rid
                for call in m["tool_calls"]:
                    assert set(call) == {"id", "type", "function"} and call["type"] == "function", rid
                    assert call["id"] not in seen_ids, (rid, call["id"])
                    seen_ids.add(call["id"])
                    fn = call["function"]
                    assert fn["name"] in listed, (rid, fn["name"])
                    assert isinstance(fn["arguments"], dict), (rid, fn["name"])
                    pending[call["id"]] = fn["name"]
        assert not pending, (rid, "unanswered tool calls", pending)
        if row["kind"] == "tool_result":
            assert roles[-1] == "tool", rid
        if row["kind"] == "tool_request":
            assert roles[-1] == "user", rid
        if row["kind"] in ("extraction", "formatting"):
            assert "tool" not in roles and not any("tool_calls" in m for m in messages), rid


def test_tool_turns_user_texts(tool_turns: list[dict], harmful: list[dict]) -> None:
    texts = [_norm(t) for row in tool_turns for t in _user_texts(row)]
    dups = [t for t, n in Counter(texts).items() if n > 1]
    assert not dups, dups
    assert not set(texts) & {_norm(r["question"]) for r in harmful}
    # held-out rows must not paraphrase held-in ones
    by_split = {
        split: [_tokens(" ".join(_user_texts(row))) for row in tool_turns if row["split"] == split]
        for split in TOOL_TURN_SPLITS
    }
    for a in by_split["calibration"]:
        for b in by_split["evaluation"]:
            assert len(a & b) / len(a | b) < 0.5, sorted(a)


# --- structured_people.jsonl: extraction prompts for structured output ---------------------------------------------
def test_structured_people_state_the_fields_they_hold() -> None:
    rows = [json.loads(line) for line in (DATA_DIR / "structured_people.jsonl").read_text().splitlines()]
    assert len(rows) == 20
    assert len({row["name"] for row in rows}) == 20
    for row in rows:
        assert set(row) == {"text", "name", "age"}
        assert row["name"] in row["text"] and isinstance(row["age"], int)
        assert str(row["age"]) in row["text"] or "birthday" in row["text"]
