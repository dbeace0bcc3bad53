"""``safeinfer build-vector``, ``optimize-vector``, ``fit-gate`` and ``calibrate``: make and calibrate safety
vectors (`training`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import InvalidSettingError
from .options import floats

METHODS: tuple[str, ...] = ("function", "optimized")
_FUNCTION_ONLY: dict[str, int] = {"heads": 10, "trials": 16, "shots": 10, "batch_size": 8}  # and their defaults


def add_gate_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--gate-from FILE`` / ``--no-gate`` for the commands that make a vector (default: fit a gate)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--gate-from",
        default=None,
        help="take the harm gate from this vector file instead of fitting one (the same fit, when "
        "that vector was made for the same model and data)",
    )
    source.add_argument("--no-gate", action="store_true", help="make the vector without a harm gate")


# ---------------------------------------------------------------------- build-vector
def add_build_vector(sub: Any) -> None:
    parser = sub.add_parser("build-vector", help="build a safety vector (and harm gate) for a model")
    parser.add_argument("--model", default=None, help="hub id or directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument(
        "--method",
        default="function",
        choices=METHODS,
        help="function: the paper's function vector from attention heads (default); optimized: a "
        "vector trained by gradient descent, the recipe of the shipped default vector",
    )
    parser.add_argument("--layer", type=int, default=None, help="steering layer (default: calibrated / depth/4)")
    parser.add_argument("--scale", type=float, default=None, help="steering scale (default: calibrated / 1.0)")
    parser.add_argument("--heads", type=int, default=None, help="function: k, the number of top heads summed (10)")
    parser.add_argument("--trials", type=int, default=None, help="function: ICL prompts averaged (16)")
    parser.add_argument("--shots", type=int, default=None, help="function: demonstrations per ICL prompt (10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the build (default 0)")
    parser.add_argument("--batch-size", type=int, default=None, help="function: prompts per forward pass (8)")
    add_gate_source_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        from ..method.gate import HarmGate
        from ..training.function_vector import build_vector
        from ..training.gate_fit import gate_from_file

        given = [f"--{name.replace('_', '-')}" for name in _FUNCTION_ONLY if getattr(args, name) is not None]
        if args.method != "function" and given:
            verb = "applies" if len(given) == 1 else "apply"
            raise InvalidSettingError(
                f"{', '.join(given)} {verb} only to --method function; got --method {args.method}"
            )
        gate: bool | HarmGate = not args.no_gate
        gate_metadata = None
        if args.gate_from:
            gate, gate_metadata = gate_from_file(args.gate_from)
        if args.method == "optimized":
            from ..training.optimized import build_optimized

            started = time.perf_counter()
            vector = build_optimized(
                args.model, layer=args.layer, scale=args.scale, seed=args.seed, gate=gate, gate_metadata=gate_metadata
            )
            path = vector.save(Path(args.out))
            print(f"wrote {path} ({vector.vector_id}) in {time.perf_counter() - started:.0f}s", file=sys.stderr)
            print(json.dumps({"optimize": vector.metadata["optimize"], "gate": vector.metadata.get("gate")}, indent=2))
            return 0
        counts: dict[str, Any] = {
            name: getattr(args, name) if getattr(args, name) is not None else default
            for name, default in _FUNCTION_ONLY.items()
        }
        result = build_vector(
            args.model,
            layer=args.layer,
            scale=args.scale,
            seed=args.seed,
            gate=gate,
            gate_metadata=gate_metadata,
            **counts,
        )
        path = result.vector.save(Path(args.out))
        meta = result.vector.metadata
        print(f"wrote {path} ({result.vector.vector_id}) in {result.seconds:.0f}s", file=sys.stderr)
        print(json.dumps({"heads": meta["heads"], "build": meta["build"], "gate": meta.get("gate")}, indent=2))
        return 0

    parser.set_defaults(handler=run)


# ---------------------------------------------------------------------- optimize-vector
def add_optimize_vector(sub: Any) -> None:
    parser = sub.add_parser("optimize-vector", help="train a safety steering vector by gradient descent")
    parser.add_argument("--model", default=None, help="hub id or directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--layer", type=int, default=8, help="decoder layer the vector is trained for (default 8)")
    parser.add_argument("--scale", type=float, default=1.25, help="steering scale it is trained at (default 1.25)")
    parser.add_argument("--steps", type=int, default=30, help="optimisation steps (default 30)")
    parser.add_argument("--lr", type=float, default=0.2, help="learning rate (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_gate_source_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        from ..runtime.engine import SafeInferEngine
        from ..training.gate_fit import gate_from_file
        from ..training.optimized import optimize_vector

        gate = gate_from_file(args.gate_from)[0] if args.gate_from else None  # before loading the model
        engine = SafeInferEngine.from_pretrained(args.model)
        vector = optimize_vector(
            engine,
            layer=args.layer,
            scale=args.scale,
            steps=args.steps,
            lr=args.lr,
            seed=args.seed,
            gate=gate,
            fit_harm_gate=not args.no_gate,
        )
        path = vector.save(Path(args.out))
        print(f"wrote {path} ({vector.vector_id})", file=sys.stderr)
        return 0

    parser.set_defaults(handler=run)


# ---------------------------------------------------------------------- fit-gate
def add_fit_gate(sub: Any) -> None:
    parser = sub.add_parser(
        "fit-gate", help="refit the harm gate of a vector file on the bundled data (the vector itself is kept)"
    )
    parser.add_argument("--model", default=None, help="hub id or directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--vector", required=True, help="the safety vector file whose gate is refitted")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--layer", type=int, default=None, help="the gate's layer (default: best cross-validated)")
    parser.add_argument("--l2", type=float, default=None, help="the probe's L2 penalty (default: 0.003)")

    def run(args: argparse.Namespace) -> int:
        from ..method.vector import SafetyVector
        from ..models.loading import load_model_and_tokenizer
        from ..training.gate_fit import with_fitted_gate

        vector = SafetyVector.load(args.vector)  # before loading the model
        model, tokenizer = load_model_and_tokenizer(args.model)
        refitted = with_fitted_gate(vector, model, tokenizer, layer=args.layer, l2=args.l2, progress=True)
        path = refitted.save(Path(args.out))
        gate = refitted.metadata["gate"]
        print(
            f"wrote {path} ({refitted.vector_id}; gate layer {gate['layer']}, cross-validated AUC {gate['cv_auc']})",
            file=sys.stderr,
        )
        return 0

    parser.set_defaults(handler=run)


# ---------------------------------------------------------------------- calibrate
def add_calibrate(sub: Any) -> None:
    parser = sub.add_parser("calibrate", help="sweep layer x scale x gate sharpness (gate on/off) on the held-in split")
    parser.add_argument("--model", default=None, help="hub id or directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--vector", required=True, help="the safety vector file to calibrate")
    parser.add_argument("--layers", required=True, help="comma-separated layers, e.g. 4,8,12")
    parser.add_argument("--scales", required=True, help="comma-separated scales, e.g. 2,4,8")
    parser.add_argument("--out", required=True, help="directory for calibration.json/.csv/.png")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer (default 32)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
    parser.add_argument(
        "--experts",
        default="prompted,negated_vector",
        help="unsafe experts scored with mode=safeinfer at the chosen setting ('' for none)",
    )
    parser.add_argument(
        "--gate-sharpness",
        default="1:0",
        help="comma-separated factor:shift pairs for the gate-on settings, e.g. 1:0,2:2 "
        "(logit -> factor * logit + shift; 1:0 is the fitted gate)",
    )
    parser.add_argument(
        "--bare-only",
        action="store_true",
        help="bare one-turn chats only (default: also each question in one gate framing)",
    )
    parser.add_argument(
        "--write-vector",
        default=None,
        help="also write the vector with the chosen layer, scale and gate sharpness to this file",
    )

    def run(args: argparse.Namespace) -> int:
        from ..method.vector import SafetyVector
        from ..runtime.engine import SafeInferEngine
        from ..training.calibration import run_sweep
        from ..training.calibration_report import write_table
        from ..training.sharpness import PLAIN, parse_sharpness, sharpness_of, with_sharpness

        layers = [int(x) for x in floats(args.layers, "--layers")]
        scales = floats(args.scales, "--scales")
        sharpness = parse_sharpness(args.gate_sharpness)
        engine = SafeInferEngine.from_pretrained(args.model, vector=args.vector)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        table = run_sweep(
            engine,
            layers,
            scales,
            sharpness=sharpness,
            framed=not args.bare_only,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            log=out / "sweep.jsonl",
            experts=[e for e in args.experts.split(",") if e],
        )
        for path in write_table(table, out):
            print(f"wrote {path}", file=sys.stderr)
        print(json.dumps(table["chosen"], indent=2))
        if args.write_vector:
            vector = engine.vector
            if vector is None:
                raise InvalidSettingError("the engine lost its vector")
            chosen = table["chosen"]
            meta = dict(vector.metadata)
            meta.update(
                layer=chosen["layer"], scale=chosen["scale"], calibration={"rule": table["rule"], "chosen": chosen}
            )
            sharp = sharpness_of(chosen["gate_sharpness"])
            if vector.gate is not None and sharp != PLAIN:
                meta["gate"] = {**meta.get("gate", {}), "sharpened": {"factor": sharp[0], "shift": sharp[1]}}
            SafetyVector(
                vector.vector,
                layer=chosen["layer"],
                scale=chosen["scale"],
                metadata=meta,
                gate=with_sharpness(vector, sharp).gate,
            ).save(args.write_vector)
            print(f"wrote {args.write_vector}", file=sys.stderr)
        return 0

    parser.set_defaults(handler=run)
