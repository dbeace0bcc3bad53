"""Time `build_vector` on the default model, stage by stage, and write the result as JSON.

    .venv/bin/python benchmarks/build_vector.py --threads 2 --out benchmarks/results/build_vector.json

Stages: load, head means over the ICL prompts, indirect effects of every head, harm-gate fit. The load
average at start and end is recorded because the numbers depend on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--heads", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from safeinfer_integrations.models.loading import load_model_and_tokenizer
    from safeinfer_integrations.training import function_vector as building
    from safeinfer_integrations.training import gate_fit as gate
    from safeinfer_integrations.training import heads

    stages: dict[str, float] = {}
    originals = {
        name: getattr(mod, name)
        for mod, name in ((building, "capture_head_means"), (building, "indirect_effects"), (building, "fit_gate"))
    }

    def timed(name: str):  # type: ignore[no-untyped-def]
        function = originals[name]

        def wrapper(*a, **k):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                stages[name] = stages.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    for name in originals:
        setattr(building, name, timed(name))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(None)
    stages["load"] = time.perf_counter() - start
    result = building.build_vector(
        model, tokenizer, model_name="SmolLM2-135M-Instruct", trials=args.trials, heads=args.heads, seed=args.seed
    )
    total = time.perf_counter() - start
    report = {
        "model": "SmolLM2-135M-Instruct",
        "threads": args.threads,
        "trials": args.trials,
        "heads": args.heads,
        "total_seconds": round(total, 1),
        "stages_seconds": {k: round(v, 1) for k, v in stages.items()},
        "loadavg_start": round(load_before, 2),
        "loadavg_end": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "vector_id": result.vector.vector_id,
        "top_heads": result.vector.metadata["heads"],
    }
    del gate, heads
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
