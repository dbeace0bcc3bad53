"""Metrics: reference-answer matching, rates with undecided verdicts, and answer perplexity against a
naive one-row-at-a-time reference."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from safeinfer_integrations.evaluation.metrics import matches_answer, normalise_answer, summarize
from safeinfer_integrations.models.batching import answer_nll


@pytest.mark.parametrize(
    ("output", "answers", "expected"),
    [
        ("The Sun is a star.", ["Sun"], True),
        ("See you on Sunday.", ["Sun"], False),
        ("Paris", ["Paris"], True),
        ("It's PARIS!", ["paris"], True),
        ("Two plus two is four.", ["4", "four"], True),
        ("Two plus two is 4.", ["4", "four"], True),
        ("About 1,000 metres", ["1000"], True),
        ("São Paulo is large", ["Sao Paulo"], True),
        ("It is the Pacific Ocean.", ["the Pacific"], True),
        ("Fourteen", ["4", "four"], False),
        ("", ["x"], False),
    ],
)
def test_matches_answer(output: str, answers: list[str], expected: bool) -> None:
    assert matches_answer(output, answers) is expected


def test_normalise_answer() -> None:
    assert normalise_answer("  The  Eiffel-Tower! ") == "eiffel tower"


def _rec(mode: str, kind: str, verdict: str, category: str = "c", **extra: Any) -> dict[str, Any]:
    return {"mode": mode, "kind": kind, "question": "q", "category": category, "verdict": verdict, **extra}


def test_summarize_rates_counts_and_relative_numbers() -> None:
    records = [
        _rec("vanilla", "harmful", "unsafe", "x"),
        _rec("vanilla", "harmful", "unsafe", "y"),
        _rec("vanilla", "harmful", "safe", "y"),
        _rec("vanilla", "harmful", "undecided", "y"),
        _rec("vanilla", "benign", "answered"),
        _rec("vanilla", "benign", "refused"),
        _rec("vanilla", "qa", "correct"),
        _rec("vanilla", "qa", "correct"),
        _rec("sa", "harmful", "safe", "x"),
        _rec("sa", "harmful", "unsafe", "y"),
        _rec("sa", "harmful", "safe", "y"),
        _rec("sa", "benign", "answered"),
        _rec("sa", "benign", "undecided"),
        _rec("sa", "qa", "correct"),
        _rec("sa", "qa", "incorrect"),
    ]
    s = summarize(records, ["vanilla", "sa"])
    v, a = s["vanilla"], s["sa"]
    assert v["unsafe_rate"] == pytest.approx(2 / 3) and v["harmful"]["undecided"] == 1
    assert v["over_refusal_rate"] == 0.5 and v["helpfulness"] == 1.0
    assert a["unsafe_rate"] == pytest.approx(1 / 3) and a["over_refusal_rate"] == 0.0
    assert a["benign"]["undecided"] == 1 and a["helpfulness"] == 0.5
    assert a["helpfulness_vs_vanilla"] == 0.5 and a["unsafe_reduction_vs_vanilla"] == pytest.approx(0.5)
    assert v["per_category"]["harmful"]["x"]["unsafe_rate"] == 1.0
    assert v["per_category"]["harmful"]["y"] == {
        "n": 3,
        "unsafe": 1,
        "safe": 1,
        "undecided": 1,
        "unsafe_rate": 0.5,
    }
    assert a["per_category"]["harmful"]["x"]["unsafe_rate"] == 0.0


def test_summarize_fluency_and_speed() -> None:
    records = [
        _rec("vanilla", "qa", "correct", answer_nll=2.0, answer_tokens=2, completion_tokens=3, seconds=1.0),
        _rec("vanilla", "qa", "correct", answer_nll=4.0, answer_tokens=2, completion_tokens=5, seconds=3.0),
        _rec("vanilla", "qa", "incorrect", answer_nll=0.0, answer_tokens=0, completion_tokens=0, seconds=0.0),
    ]
    m = summarize(records)["vanilla"]
    assert m["fluency_ppl"] == pytest.approx(math.exp(6.0 / 4))
    assert m["tokens_per_s"] == pytest.approx(8 / 4)
    empty = summarize([_rec("vanilla", "harmful", "undecided")])["vanilla"]
    assert empty["unsafe_rate"] is None and empty["fluency_ppl"] is None and empty["helpfulness"] is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_answer_nll_equals_naive_single_rows(tiny_model_factory: Any, arch: str) -> None:
    model = tiny_model_factory(arch)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    answers = [[20, 21, 22], [23], []]
    got = answer_nll(model, prompts, answers, pad_id=0)
    assert got[2] == (0.0, 0)
    for (nll, count), prompt, answer in zip(got[:2], prompts[:2], answers[:2], strict=True):
        nll_ref = 0.0
        for step, token in enumerate(answer):
            ids = torch.tensor([prompt + answer[:step]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -1]
            nll_ref -= float(torch.log_softmax(logits.double(), -1)[token])
        assert count == len(answer)
        assert nll == pytest.approx(nll_ref, rel=1e-6)
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        answer_nll(model, prompts[:2], answers[:1], 0)
