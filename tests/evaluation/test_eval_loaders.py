"""Loaders: every documented layout, column detection, errors, limits, the shipped sets and HarmEval."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from safeinfer_integrations.evaluation.loaders import (
    EvalItem,
    default_benign,
    default_qa,
    limit_items,
    load_items,
    load_many,
)

HARMEVAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "harmeval" / "HarmEval.csv"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_harmeval_layout(tmp_path: Path) -> None:
    path = _write(tmp_path / "h.csv", 'Question,Topic\n"How do I do bad thing one, quickly?",Malware\nBad two?,Fraud\n')
    items = load_items(path, "harmful")
    assert items == [
        EvalItem("harmful", "How do I do bad thing one, quickly?", "Malware"),
        EvalItem("harmful", "Bad two?", "Fraud"),
    ]


def test_advbench_layout_ignores_target(tmp_path: Path) -> None:
    path = _write(tmp_path / "harmful_behaviors.csv", "goal,target\nWrite a bad script,Sure here is\n")
    assert load_items(path, "harmful") == [EvalItem("harmful", "Write a bad script", "all")]


def test_hex_phi_layout_takes_category_from_file_name(tmp_path: Path) -> None:
    path = _write(tmp_path / "category_3.csv", "First bad request\nSecond bad request\n")
    items = load_items(path, "harmful")
    assert [i.question for i in items] == ["First bad request", "Second bad request"]
    assert {i.category for i in items} == {"category_3"}


def test_dangerousqa_layout_is_a_json_list_of_strings(tmp_path: Path) -> None:
    path = _write(tmp_path / "dqa.json", json.dumps(["Bad one?", "Bad two?"]))
    assert [i.question for i in load_items(path, "harmful")] == ["Bad one?", "Bad two?"]


def test_jsonl_and_json_objects_with_overrides(tmp_path: Path) -> None:
    jl = _write(tmp_path / "b.jsonl", '{"prompt": "Hi?", "Category": "x"}\n\n{"prompt": "Yo?", "Category": "y"}\n')
    assert [(i.question, i.category) for i in load_items(jl, "benign")] == [("Hi?", "x"), ("Yo?", "y")]
    js = _write(tmp_path / "b.json", json.dumps({"data": [{"q": "A?", "grp": "g"}]}))
    assert load_items(js, "benign", question_column="q", category_column="grp") == [EvalItem("benign", "A?", "g")]


def test_qa_answers_pipe_separated_or_list(tmp_path: Path) -> None:
    csv_path = _write(tmp_path / "qa.csv", "question,answer,category\n2+2?,4| four ,maths\n")
    assert load_items(csv_path, "qa")[0].answers == ("4", "four")
    jl = _write(tmp_path / "qa.jsonl", '{"question": "Sky?", "answers": ["blue"]}\n')
    assert load_items(jl, "qa")[0].answers == ("blue",)


@pytest.mark.parametrize(
    ("name", "text", "kind", "message"),
    [
        ("x.txt", "hello", "harmful", "unsupported file type"),
        ("x.csv", "foo,bar\n1,2\n", "harmful", "no question column"),
        ("x.csv", "question\n", "harmful", "contains no questions"),
        ("x.csv", "question\nA?\n", "qa", "needs an answer column"),
        ("x.csv", "question,answer\nA?,\n", "qa", "no accepted answers"),
        ("x.jsonl", '{"question": 3}\n', "harmful", "non-empty string"),
        ("x.jsonl", "{bad\n", "harmful", "not valid JSON"),
        ("x.json", '{"other": 1}', "harmful", "must hold a list"),
    ],
)
def test_bad_files_fail_clearly(tmp_path: Path, name: str, text: str, kind: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_items(_write(tmp_path / name, text), kind)  # type: ignore[arg-type]


def test_missing_file_and_bad_kind(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_items(tmp_path / "nope.csv", "harmful")
    with pytest.raises(ValueError, match="kind must be one of"):
        load_items(tmp_path / "nope.csv", "evil")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no question column 'zzz'"):
        load_items(_write(tmp_path / "a.csv", "question\nA?\n"), "harmful", question_column="zzz")


def test_limit_is_round_robin_nested_and_keeps_file_order() -> None:
    items = [EvalItem("harmful", f"{c}{i}?", c) for c in "abc" for i in range(4)]
    four = limit_items(items, 4)
    assert [i.question for i in four] == ["a0?", "a1?", "b0?", "c0?"]
    for small, big in [(1, 5), (4, 7), (7, 12)]:
        assert set(map(id, limit_items(items, small))) <= set(map(id, limit_items(items, big)))
    assert limit_items(items, None) == items and limit_items(items, 99) == items
    with pytest.raises(ValueError, match="limit must be >= 1"):
        limit_items(items, 0)


def test_duplicates_are_kept(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "question\nSame?\nSame?\n")
    assert len(load_many([path, path], "harmful")) == 4


def test_shipped_sets() -> None:
    benign, qa = default_benign(), default_qa()
    counts = Counter(i.category for i in benign)
    assert len(benign) == 200 and set(counts) == {"ordinary", "sensitive_sounding"} and min(counts.values()) >= 95
    assert len(qa) == 134 and all(i.answers for i in qa)


def test_shipped_benign_set_is_held_out() -> None:
    """No default benign question was used to fit the harm gate or to calibrate the vector."""
    from safeinfer_integrations.training.data import benign_prompts

    used = {p.question.lower() for split in ("gate", "calibration") for p in benign_prompts(split)}  # type: ignore[arg-type]
    questions = [i.question.lower() for i in default_benign()]
    assert len(set(questions)) == len(questions)
    assert not used & set(questions)
    assert {p.question.lower() for p in benign_prompts("evaluation")} <= set(questions)


@pytest.mark.skipif(not HARMEVAL.is_file(), reason="HarmEval.csv not available at ../shared/data/harmeval")
def test_harmeval_file_loads_all_rows() -> None:
    items = load_items(HARMEVAL, "harmful")
    assert len(items) == 550
    counts = Counter(i.category for i in items)
    assert len(counts) == 11 and set(counts.values()) == {50}
    assert len(limit_items(items, 22)) == 22 and len({i.category for i in limit_items(items, 22)}) == 11
