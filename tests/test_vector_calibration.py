"""The calibration sweep and its choice rule, on a tiny random model (fast), plus the perplexity metric."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
import torch

from safeinfer_integrations.method.gate import HarmGate
from safeinfer_integrations.method.vector import SafetyVector
from safeinfer_integrations.models.batching import answer_nll, perplexity
from safeinfer_integrations.runtime.engine import SafeInferEngine
from safeinfer_integrations.training import calibration, data
from safeinfer_integrations.training.calibration import SweepRow, choose
from safeinfer_integrations.training.calibration_report import write_table
from safeinfer_integrations.training.function_vector import build_vector
from safeinfer_integrations.training.prepass import HeldIn
from safeinfer_integrations.training.sharpness import parse_sharpness


def _row(layer: int, scale: float, refusal: float, over: float, ppl: float, gate: bool = True) -> SweepRow:
    return SweepRow(
        mode="sa",
        layer=layer,
        scale=scale,
        gate=gate,
        unsafe_expert=None,
        refusal=refusal,
        over_refusal=over,
        perplexity=ppl,
        gate_weight_harmful=None,
        gate_weight_benign=None,
        n_harmful=10,
        n_benign=10,
        seconds=0.0,
    )


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


def test_answer_nll_perplexity_matches_a_naive_loop(tiny_model_factory: Any) -> None:
    model = tiny_model_factory("llama")
    prompts, answers = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    ppl = perplexity(answer_nll(model, prompts, answers + [], 0, batch_size=2))
    nll, count = 0.0, 0
    with torch.no_grad():
        for p, a in zip(prompts, answers):
            logits = model(input_ids=torch.tensor([p + a])).logits[0].double()
            log_probs = torch.log_softmax(logits, -1)
            for i, token in enumerate(a):
                nll -= float(log_probs[len(p) + i - 1, token])
                count += 1
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-6)
    assert math.isnan(perplexity(answer_nll(model, prompts, [[], []], 0)))


def test_sweep_runs_end_to_end_on_a_tiny_model(
    tiny_model_factory: Any, tiny_tokenizer: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    model = tiny_model_factory("qwen2")
    vector = build_vector(
        model,
        tiny_tokenizer,
        model_name="tiny",
        heads=2,
        trials=2,
        shots=1,
        layer=1,
        framings=data.gate_framings()[:1],
        progress=False,
    ).vector
    engine = SafeInferEngine(model, tiny_tokenizer, vector=vector, model_name="tiny")
    harmful, benign = calibration.held_in()
    monkeypatch.setattr(calibration, "held_in", lambda: (harmful[:3], benign[:2]))
    table = calibration.run_sweep(
        engine,
        [0, 2],
        [1.0, 4.0],
        sharpness=[(1.0, 0.0), (2.0, 1.0)],
        max_new_tokens=3,
        batch_size=4,
        log=tmp_path / "sweep.jsonl",
        progress=False,
    )
    rows = table["rows"]
    assert len(rows) == 1 + 2 * 2 * 2 + 2 * 2 + 2  # vanilla, layer x scale x sharpness (gate on), gate off, experts
    assert {(r["layer"], r["scale"], r["gate"], r["gate_sharpness"]) for r in rows if r["mode"] == "sa"} == {
        (lay, sc, g, s) for lay in (0, 2) for sc in (1.0, 4.0) for g, s in ((False, None), (True, "1:0"), (True, "2:1"))
    }
    gated = [r for r in rows if r["mode"] == "sa" and r["gate"]]
    assert all(0.0 <= r["gate_weight_harmful"] <= 1.0 for r in gated)
    # the sharpened gate weighs the same prompts by sigmoid(2 * logit + 1), a monotone map of the fitted one
    plain = next(r for r in gated if r["gate_sharpness"] == "1:0")
    sharp = next(r for r in gated if r["gate_sharpness"] == "2:1")
    assert plain["gate_weight_harmful"] != sharp["gate_weight_harmful"]
    assert all(r["gate_weight_harmful"] is None for r in rows if r["mode"] == "sa" and not r["gate"])
    assert [r["unsafe_expert"] for r in rows[-2:]] == ["prompted", "negated_vector"]
    assert all(r["gate_sharpness"] == table["chosen"]["gate_sharpness"] for r in rows[-2:])
    # the framings that fit the tiny model's 256 positions double the prompts: 3 + 3 harmful, 2 + 2 benign
    assert (table["split"]["n_harmful"], table["split"]["n_benign"]) == (6, 4) and table["split"]["framed"]
    assert all(r["refusal_framed"] is not None for r in rows)
    assert (tmp_path / "sweep.jsonl").read_text().count("\n") == len(rows)
    written = write_table(table, tmp_path / "out")
    assert [p.name for p in written] == ["calibration.json", "calibration.csv", "calibration.png"]
    assert written[2].stat().st_size > 10_000


def test_held_in_prompts_add_each_question_once_in_a_framing(tiny_model_factory: Any, tiny_tokenizer: Any) -> None:
    engine = SafeInferEngine(tiny_model_factory("llama"), tiny_tokenizer, model_name="tiny")
    harmful, benign = ["Steal a car for me", "Make a bomb", "Hack a bank"], ["Bake bread", "Hi"]
    prompts = calibration.held_in_prompts(engine, harmful, benign)
    fitting = [
        f
        for f in data.gate_framings()[1:]
        if all(len(engine.formatter.encode(data.frame(q, f))) + 32 <= 256 for q in harmful + benign)
    ]
    assert fitting and len(fitting) < len(data.gate_framings()) - 1  # the long ones do not fit 256 positions
    assert prompts.questions == tuple(harmful * 2 + benign * 2) and prompts.n_harmful == 6
    assert prompts.framings == ("chat",) * 3 + tuple(f.name for f in (fitting * 3)[:3]) + ("chat",) * 2 + tuple(
        f.name for f in fitting[:2]
    )
    assert prompts.chats[0] == [{"role": "user", "content": "Steal a car for me"}]
    assert prompts.chats[3] == data.frame("Steal a car for me", fitting[0])
    assert prompts.framed == [False] * 3 + [True] * 3 + [False] * 2 + [True] * 2
    bare = calibration.held_in_prompts(engine, harmful, benign, framed=False)
    assert bare.framings == ("chat",) * 5 and bare.n_harmful == 3


def test_gate_sharpness_is_a_monotone_map_of_the_gate_logit() -> None:
    gate = HarmGate(direction=torch.tensor([0.5, -1.0, 2.0]), layer=1, bias=-0.25)
    hidden = torch.randn(7, 3)
    logit = hidden @ gate.direction + gate.bias
    torch.testing.assert_close(gate.sharpened(2.0, 1.5).weight(hidden), torch.sigmoid(2.0 * logit + 1.5))
    torch.testing.assert_close(gate.sharpened(1.0).weight(hidden), gate.weight(hidden))
    with pytest.raises(ValueError, match="factor must be a finite number > 0; got 0.0"):
        gate.sharpened(0.0)
    with pytest.raises(ValueError, match="shift must be finite; got nan"):
        gate.sharpened(1.0, float("nan"))
    assert parse_sharpness("1:0, 2:2") == [(1.0, 0.0), (2.0, 2.0)]
    with pytest.raises(ValueError, match="factor:shift pairs such as 1:0,2:2; got '2'"):
        parse_sharpness("1:0,2")
    with pytest.raises(ValueError, match="gate sharpness '-1:0': the factor must be > 0"):
        parse_sharpness("-1:0")


def test_choice_prefers_the_fitted_gate_on_ties() -> None:
    base = _row(0, 0.0, 0.1, 0.0, 4.0)
    rows = [
        replace(_row(8, 1.0, 0.7, 0.1, 5.0), gate_sharpness="2:2"),
        replace(_row(8, 1.0, 0.7, 0.1, 5.0), gate_sharpness="1:0"),
        replace(_row(8, 1.0, 0.8, 0.1, 5.0), gate_sharpness="3:1"),
    ]
    assert choose(rows, base).gate_sharpness == "3:1"
    assert choose(rows[:2], base).gate_sharpness == "1:0"


def test_cli_writes_the_chosen_sharpness_into_the_vector(
    tiny_model_factory: Any, tiny_tokenizer: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    from safeinfer_integrations.cli import main

    directory = tmp_path / "tiny-llama"
    model = tiny_model_factory("llama")
    model.save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    vector = build_vector(
        model,
        tiny_tokenizer,
        model_name="tiny",
        heads=2,
        trials=2,
        shots=1,
        layer=1,
        framings=data.gate_framings()[:1],
        progress=False,
    ).vector
    source = vector.save(tmp_path / "v.safetensors")
    harmful, benign = calibration.held_in()
    monkeypatch.setattr(calibration, "held_in", lambda: (harmful[:2], benign[:2]))
    monkeypatch.setattr(
        calibration, "choose", lambda rows, base: next(r for r in rows if r.gate and r.gate_sharpness == "3:1")
    )
    out = tmp_path / "chosen.safetensors"
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(directory),
                "--vector",
                str(source),
                "--layers",
                "1",
                "--scales",
                "2",
                "--gate-sharpness",
                "1:0,3:1",
                "--experts",
                "",
                "--max-new-tokens",
                "2",
                "--bare-only",
                "--out",
                str(tmp_path / "cal"),
                "--write-vector",
                str(out),
            ]
        )
        == 0
    )
    written = SafetyVector.load(out)
    torch.testing.assert_close(written.gate.direction, vector.gate.direction * 3.0)
    assert written.gate.bias == pytest.approx(vector.gate.bias * 3.0 + 1.0)
    assert written.metadata["gate"]["sharpened"] == {"factor": 3.0, "shift": 1.0}
    assert written.metadata["calibration"]["chosen"]["gate_sharpness"] == "3:1"
    assert (written.layer, written.scale) == (1, 2.0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_sweep_path_matches_the_engine(tiny_model_factory: Any, tiny_tokenizer: Any, arch: str) -> None:
    """The sweep's shared-prefix SA generation (in groups of like lengths) gives the engine's mode="sa" tokens,
    gate on and off, and its perplexity equals the plain recomputation."""
    model = tiny_model_factory(arch)
    vector = build_vector(
        model,
        tiny_tokenizer,
        model_name="tiny",
        heads=3,
        trials=2,
        shots=1,
        layer=1,
        framings=data.gate_framings()[:1],
        progress=False,
    ).vector
    engine = SafeInferEngine(model, tiny_tokenizer, vector=vector, model_name="tiny")
    questions = ["How do I bake bread?", "Steal a car for me now please", "Weather?"]
    chats = [[{"role": "user", "content": q}] for q in questions]
    chats.append(data.frame("Is it raining?", data.gate_framings()[1]))  # longer: a group of its own
    held = HeldIn(engine, chats, group_tokens=120)
    assert len(held.groups) >= 2
    for layer, scale, gate in [(0, 3.0, True), (2, 8.0, False)]:
        steered = vector.with_settings(layer=layer, scale=scale)
        tokens, weights = held.generate(steered, gate=gate, max_new_tokens=6)
        reference = engine.generate(
            chats, mode="sa", layer=layer, scale=scale, gate=gate, max_new_tokens=6, **calibration.SWEEP_SETTINGS
        )
        assert tokens == [list(g.token_ids) for g in reference]
        if gate:
            assert weights is not None
            # float32 gate arithmetic over differently padded batches (groups here, one batch in the engine)
            assert weights.tolist() == pytest.approx([g.safety.gate_weight for g in reference], rel=1e-5)
        assert held.perplexity(tokens) == pytest.approx(
            perplexity(answer_nll(model, held.prompts, tokens, 0)), rel=1e-6
        )
    vanilla, _ = held.generate(None, gate=False, max_new_tokens=6)
    assert vanilla == [list(g.token_ids) for g in engine.generate(chats, mode="vanilla", max_new_tokens=6)]
