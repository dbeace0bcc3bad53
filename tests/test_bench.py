"""`safeinfer bench`'s prompt sets and table (the timings themselves are run by hand, not in tests)."""

from __future__ import annotations

import pytest

from safeinfer_integrations.evaluation import speed as bench
from safeinfer_integrations.training import data


def test_prompt_sets() -> None:
    harmful = bench.prompt_set("harmful")
    held_out = {d.question: d.category for d in data.harmful_demos("evaluation")}
    assert len(harmful) == 8 and all(q in held_out for q in harmful)
    assert len({held_out[q] for q in harmful}) == 8  # one per category
    assert bench.prompt_set("benign") == bench.PROMPTS
    with pytest.raises(ValueError, match="prompt set must be one of benign, harmful; got 'evil'"):
        bench.prompt_set("evil")
    with pytest.raises(ValueError, match="got 'evil'"):
        bench.run(prompt_sets=("benign", "evil"))  # fails before loading a model
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16; got 'float8'"):
        bench.run(dtype="float8")  # fails before loading a model


def test_table_reports_gate_weights_and_every_cell() -> None:
    cell = {"tokens_per_s": 10.0, "time_ratio": 1.25, "tokens": 64}
    results = {
        "model": "m",
        "vector": "shipped",
        "max_new_tokens": 64,
        "threads": 2,
        "gate_cutoff": 0.1,
        "sets": {
            "benign": {"gate_weights": [0.01, 0.05], "batches": {"1": {"generate()": cell, "sa": cell}}},
            "harmful": {"gate_weights": [0.95, 0.05], "batches": {"8": {"sa": cell}}},
        },
    }
    table = bench.format_table(results)
    assert "benign prompts: gate weights 0.01-0.05, 2 of 2 below the cutoff" in table
    assert "harmful prompts: gate weights 0.05-0.95, 1 of 2 below the cutoff" in table
    assert "| benign | sa | 1 | 10.0 | 1.25x |" in table and "| harmful | sa | 8 | 10.0 | 1.25x |" in table
    assert table.count("| benign |") == 2
    assert table.splitlines()[0].endswith("gate_cutoff 0.1, device cpu, dtype float32")  # results before --device
    on_gpu = bench.format_table({**results, "device": "cuda:0", "dtype": "bfloat16"})
    assert on_gpu.splitlines()[0].endswith("gate_cutoff 0.1, device cuda:0, dtype bfloat16")
