"""The optimised safety vector (optimize.py) on a tiny random model: it lowers its objective, is
deterministic per seed, leaves the model as it found it, and saves/loads like any vector."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from safeinfer_integrations import SafeInferEngine, SafetyVector
from safeinfer_integrations.models.architecture import steering_module
from safeinfer_integrations.training import data
from safeinfer_integrations.training.optimized import optimize_vector


@pytest.fixture
def engine(tiny_model_factory: Any, tiny_tokenizer: Any) -> SafeInferEngine:
    return SafeInferEngine(tiny_model_factory("qwen2", 0), tiny_tokenizer)


def _run(engine: SafeInferEngine, **kwargs: Any) -> SafetyVector:
    settings = {
        "layer": 1,
        "scale": 1.0,
        "steps": 6,
        "lr": 0.05,
        "harmful_batch": 500,
        "benign_batch": 500,
        "answer_tokens": 4,
        "framings": data.gate_framings()[:1],
        "progress": False,
    }
    return optimize_vector(engine, **{**settings, **kwargs})


def test_full_batch_objective_decreases_and_model_is_untouched(engine: SafeInferEngine, tmp_path: Path) -> None:
    before = {name: p.detach().clone() for name, p in engine.model.named_parameters()}
    flags = [p.requires_grad for p in engine.model.parameters()]
    vector = _run(engine)
    history = vector.metadata["optimize"]["loss_history"]
    assert len(history) == 6 and history[-1][0] < history[0][0]  # the harmful objective went down
    assert vector.hidden_size == 48 and vector.layer == 1 and vector.metadata["method"] == "optimized"
    assert float(vector.vector.norm()) > 0
    assert vector.gate is not None and vector.metadata["gate"]["source"] == "fitted"
    assert vector.metadata["gate"]["layer"] == vector.gate.layer
    assert all(torch.equal(before[name], p) for name, p in engine.model.named_parameters())
    assert [p.requires_grad for p in engine.model.parameters()] == flags
    assert len(steering_module(engine.model, 1)._forward_hooks) == 0
    loaded = SafetyVector.load(vector.save(tmp_path / "v.safetensors"))
    assert torch.equal(loaded.vector, vector.vector) and loaded.metadata == vector.metadata
    SafeInferEngine(engine.model, engine.tokenizer, vector=loaded).generate("hi", mode="sa", max_new_tokens=2)


def test_deterministic_per_seed(engine: SafeInferEngine) -> None:
    first = _run(engine, steps=2, harmful_batch=8, benign_batch=4, seed=3)
    again = _run(engine, steps=2, harmful_batch=8, benign_batch=4, seed=3)
    other = _run(engine, steps=2, harmful_batch=8, benign_batch=4, seed=4)
    assert torch.equal(first.vector, again.vector)
    assert not torch.equal(first.vector, other.vector)


def test_gate_given_or_switched_off(engine: SafeInferEngine) -> None:
    fitted = _run(engine, steps=1)
    assert fitted.gate is not None
    given = _run(engine, steps=1, gate=fitted.gate)
    assert given.gate is not None and torch.equal(given.gate.direction, fitted.gate.direction)
    assert given.metadata["gate"] == {"source": "given"}
    none = _run(engine, steps=1, fit_harm_gate=False)
    assert none.gate is None and none.metadata["gate"] == {"source": "none"}


def test_bad_arguments(engine: SafeInferEngine) -> None:
    with pytest.raises(ValueError, match="layer must be in 0..2; got 9"):
        _run(engine, layer=9)
    with pytest.raises(ValueError, match="steps must be >= 1; got 0"):
        _run(engine, steps=0)


def test_shipped_default_vector_runs_in_the_engine(default_model_and_tokenizer: Any) -> None:
    """The default vector is an optimised one; the engine applies it with its gate."""
    from safeinfer_integrations.method.shipped import shipped_vector_path

    path = shipped_vector_path()
    assert path is not None
    vector = SafetyVector.load(path)
    model, tokenizer = default_model_and_tokenizer
    vector.check(model)  # hidden size, layer range, architecture hash, gate
    assert vector.metadata["method"] == "optimized" and vector.gate is not None
    chosen = json.loads(path.with_name("calibration.json").read_text(encoding="utf-8"))["chosen"]
    assert (vector.layer, vector.scale) == (chosen["layer"], chosen["scale"]) == (8, 1.25)
    engine = SafeInferEngine(model, tokenizer, vector=vector)
    result = engine.generate(
        [{"role": "user", "content": "What is the capital of France?"}], mode="sa", max_new_tokens=3
    )[0]
    assert result.safety.gate_weight is not None and result.safety.vector_id == vector.vector_id


def test_build_vector_method_optimized_is_the_optimize_recipe(
    tiny_model_factory: Any, tiny_tokenizer: Any, tmp_path: Path, capsys: Any
) -> None:
    """``safeinfer build-vector --method optimized`` trains `optimize_vector` with its defaults at a quarter of
    the depth and scale 1.0 (a model other than the default has no calibration); the function-vector options
    are refused with it, before any model loads."""
    from safeinfer_integrations.cli import main

    directory = tmp_path / "tiny-llama"
    tiny_model_factory("llama").save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    out = tmp_path / "optimized.safetensors"
    assert (
        main(
            [
                "build-vector",
                "--method",
                "optimized",
                "--model",
                str(directory),
                "--out",
                str(out),
                "--no-gate",
                "--seed",
                "2",
            ]
        )
        == 0
    )
    built = SafetyVector.load(out)
    expected = optimize_vector(
        SafeInferEngine.from_pretrained(directory), layer=1, scale=1.0, seed=2, fit_harm_gate=False, progress=False
    )
    assert torch.equal(built.vector, expected.vector) and (built.layer, built.scale) == (1, 1.0)
    assert built.metadata["method"] == "optimized" and built.gate is None and "calibration" not in built.metadata
    assert json.loads(capsys.readouterr().out)["optimize"]["seed"] == 2
    assert (
        main(
            [
                "build-vector",
                "--method",
                "optimized",
                "--model",
                str(directory),
                "--out",
                str(tmp_path / "x"),
                "--heads",
                "3",
                "--trials",
                "2",
            ]
        )
        == 2
    )
    assert "--heads, --trials apply only to --method function; got --method optimized" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_shipped_default_vector_training_reproduces(default_model_and_tokenizer: Any) -> None:
    """The shipped default vector's recorded training is what `optimize_vector` does today: its first two steps
    give the same losses (the full build, `safeinfer build-vector --method optimized`, takes ~10 minutes; it
    reproduced the vector to 2e-5 per element, norm 53)."""
    from safeinfer_integrations.method.shipped import shipped_vector_path

    model, tokenizer = default_model_and_tokenizer
    shipped = SafetyVector.load(shipped_vector_path())
    recorded = shipped.metadata["optimize"]
    again = optimize_vector(
        SafeInferEngine(model, tokenizer),
        layer=shipped.layer,
        steps=2,
        lr=recorded["lr"],
        seed=recorded["seed"],
        fit_harm_gate=False,
        progress=False,
    )
    history = again.metadata["optimize"]["loss_history"]
    flat, expected = ([loss for step in steps for loss in step] for steps in (history, recorded["loss_history"][:2]))
    assert len(flat) == 4 and flat == pytest.approx(expected, abs=2e-4)


def test_build_optimized_takes_the_default_models_calibrated_setting(
    default_model_and_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For the default model, ``build-vector --method optimized`` trains at the layer and scale chosen in
    vectors/calibration.json and records that choice; explicit values win. (Training is replaced by a stub.)"""
    import safeinfer_integrations.training.optimized as optimize
    from safeinfer_integrations.method.shipped import OPTIMIZED_CALIBRATION, shipped_calibration

    calls: list[dict[str, Any]] = []

    def fake(engine: Any, **kwargs: Any) -> SafetyVector:
        calls.append(kwargs)
        return SafetyVector(
            vector=torch.ones(576), layer=kwargs["layer"], scale=kwargs["scale"], metadata={"method": "optimized"}
        )

    monkeypatch.setattr(optimize, "optimize_vector", fake)
    chosen = shipped_calibration(OPTIMIZED_CALIBRATION)["chosen"]
    built = optimize.build_optimized(None, gate=False, progress=False)
    assert (calls[0]["layer"], calls[0]["scale"]) == (chosen["layer"], chosen["scale"]) == (8, 1.25)
    assert calls[0]["fit_harm_gate"] is False and calls[0]["gate"] is None
    assert built.metadata["calibration"]["chosen"] == chosen
    optimize.build_optimized(None, layer=4, scale=2.0, gate=False, progress=False)
    assert (calls[1]["layer"], calls[1]["scale"]) == (4, 2.0)
