"""The calibration sweep and its choice rule, on a tiny random model (fast), plus the perplexity metric."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from safeinfer_integrations import calibration, demos
from safeinfer_integrations.building import build_vector
from safeinfer_integrations.calibration import SweepRow, answer_perplexity, choose
from safeinfer_integrations.engine import SafeInferEngine


def _row(layer: int, scale: float, refusal: float, over: float, ppl: float, gate: bool = True) -> SweepRow:
    return SweepRow(mode="sa", layer=layer, scale=scale, gate=gate, unsafe_expert=None, refusal=refusal,
                    over_refusal=over, perplexity=ppl, gate_weight_harmful=None, gate_weight_benign=None,
                    n_harmful=10, n_benign=10, seconds=0.0)


def test_choice_rule() -> None:
    base = _row(0, 0.0, 0.1, 0.0, 4.0)
    rows = [
        _row(4, 2.0, 0.5, 0.1, 5.0),
        _row(4, 8.0, 1.0, 0.0, 30.0),  # best trade-off but not fluent (30 > 1.5 x 4)
        _row(8, 4.0, 0.7, 0.1, 5.5),  # chosen: 0.6
        _row(8, 2.0, 0.8, 0.2, 5.5),  # tie at 0.6, larger... no: smaller scale wins
        _row(8, 1.0, 0.9, 0.0, 5.0, gate=False),  # gate off: not a candidate
    ]
    assert (choose(rows, base).layer, choose(rows, base).scale) == (8, 2.0)


def test_answer_perplexity_matches_a_naive_loop(tiny_model_factory: Any) -> None:
    model = tiny_model_factory("llama")
    prompts, answers = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    ppl = answer_perplexity(model, prompts, answers + [], pad_id=0, batch_size=2)
    nll, count = 0.0, 0
    with torch.no_grad():
        for p, a in zip(prompts, answers):
            logits = model(input_ids=torch.tensor([p + a])).logits[0].double()
            log_probs = torch.log_softmax(logits, -1)
            for i, token in enumerate(a):
                nll -= float(log_probs[len(p) + i - 1, token])
                count += 1
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-6)
    assert math.isnan(answer_perplexity(model, prompts, [[], []], pad_id=0))


def test_sweep_runs_end_to_end_on_a_tiny_model(tiny_model_factory: Any, tiny_tokenizer: Any, tmp_path: Any,
                                               monkeypatch: Any) -> None:
    model = tiny_model_factory("qwen2")
    vector = build_vector(model, tiny_tokenizer, model_name="tiny", heads=2, trials=2, shots=1, layer=1,
                          framings=demos.gate_framings()[:1], progress=False).vector
    engine = SafeInferEngine(model, tiny_tokenizer, vector=vector, model_name="tiny")
    harmful, benign = calibration.held_in()
    monkeypatch.setattr(calibration, "held_in", lambda: (harmful[:3], benign[:2]))
    table = calibration.run_sweep(engine, [0, 2], [1.0, 4.0], max_new_tokens=3, batch_size=4,
                                  log=tmp_path / "sweep.jsonl", progress=False)
    rows = table["rows"]
    assert len(rows) == 1 + 2 * 2 * 2 + 2  # vanilla, layer x scale x gate, two safeinfer experts
    assert {(r["layer"], r["scale"], r["gate"]) for r in rows if r["mode"] == "sa"} == {
        (lay, sc, g) for lay in (0, 2) for sc in (1.0, 4.0) for g in (False, True)}
    gated = [r for r in rows if r["mode"] == "sa" and r["gate"]]
    assert all(0.0 <= r["gate_weight_harmful"] <= 1.0 for r in gated)
    assert all(r["gate_weight_harmful"] is None for r in rows if r["mode"] == "sa" and not r["gate"])
    assert [r["unsafe_expert"] for r in rows[-2:]] == ["prompted", "negated_vector"]
    assert (tmp_path / "sweep.jsonl").read_text().count("\n") == len(rows)
    written = calibration.write_table(table, tmp_path / "out")
    assert [p.name for p in written] == ["calibration.json", "calibration.csv", "calibration.png"]
    assert written[2].stat().st_size > 10_000


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_sweep_path_matches_the_engine(tiny_model_factory: Any, tiny_tokenizer: Any, arch: str) -> None:
    """The sweep's shared-prefix SA generation gives the engine's mode="sa" tokens, gate on and off, and
    its perplexity equals the plain recomputation."""
    model = tiny_model_factory(arch)
    vector = build_vector(model, tiny_tokenizer, model_name="tiny", heads=3, trials=2, shots=1, layer=1,
                          framings=demos.gate_framings()[:1], progress=False).vector
    engine = SafeInferEngine(model, tiny_tokenizer, vector=vector, model_name="tiny")
    questions = ["How do I bake bread?", "Steal a car for me now please", "Weather?"]
    held = calibration.HeldIn(engine, questions)
    chats = [[{"role": "user", "content": q}] for q in questions]
    for layer, scale, gate in [(0, 3.0, True), (2, 8.0, False)]:
        steered = vector.with_settings(layer=layer, scale=scale)
        tokens, weights = held.generate(steered, gate=gate, max_new_tokens=6)
        reference = engine.generate(chats, mode="sa", layer=layer, scale=scale, gate=gate, max_new_tokens=6)
        assert tokens == [list(g.token_ids) for g in reference]
        if gate:
            assert weights is not None
            assert weights.tolist() == pytest.approx([g.safety.gate_weight for g in reference], rel=1e-9)
        assert held.perplexity(tokens) == pytest.approx(
            answer_perplexity(model, held.prompts, tokens, pad_id=0), rel=1e-6)
    vanilla, _ = held.generate(None, gate=False, max_new_tokens=6)
    assert vanilla == [list(g.token_ids) for g in engine.generate(chats, mode="vanilla", max_new_tokens=6)]
