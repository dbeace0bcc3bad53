"""The ``safeinfer eval`` subcommand."""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

from ..config import MODES


def _chat_model(spec: str) -> Any:
    """``module:attribute`` -> the chat model object there (called first when it is a factory function)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(
            f"--judge-model must be 'module:attribute' (a LangChain chat model or a function "
            f"returning one); got {spec!r}"
        )
    target = getattr(importlib.import_module(module_name), attribute)
    if callable(target) and not callable(getattr(target, "invoke", None)):
        target = target()
    return target


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for name in ("alpha", "plausibility", "unsafe_expert", "scale", "layer"):
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    if args.no_gate:
        settings["gate"] = False
    return settings


def _run(args: argparse.Namespace) -> int:
    from ..engine import SafeInferEngine
    from .judges import make_judge
    from .loaders import load_many
    from .runner import parse_modes, run_evaluation

    modes = parse_modes(args.modes)
    judge = make_judge(args.judge, _chat_model(args.judge_model) if args.judge_model else None)
    columns = {"question_column": args.question_column, "category_column": args.category_column}
    harmful = load_many(args.harmful, "harmful", **columns)
    benign = load_many(args.benign, "benign", **columns) if args.benign else None
    qa = load_many(args.qa, "qa", **columns, answer_column=args.answer_column) if args.qa else None
    engine = SafeInferEngine.from_pretrained(args.model, vector=args.vector)
    summary = run_evaluation(
        engine,
        harmful=harmful,
        benign=benign,
        qa=qa,
        modes=modes,
        judge=judge,
        out_dir=args.out,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        settings=_settings(args),
        progress=not args.no_progress,
    )
    headline = {
        mode: {
            k: m[k]
            for k in ("unsafe_rate", "over_refusal_rate", "helpfulness", "fluency_ppl", "tokens_per_s")
        }
        for mode, m in summary["modes"].items()
    }
    print(json.dumps(headline, indent=2))
    print(f"wrote {args.out}/generations.jsonl, summary.json, report.md and plots")
    return 0


def add_cli(sub: Any) -> None:
    """Register ``safeinfer eval`` on argparse's subparsers object."""
    parser = sub.add_parser(
        "eval",
        help="unsafe-response, over-refusal and helpfulness rates per mode (resumable)",
        description="Evaluate SafeInfer modes on harmful, benign and helpfulness questions. "
        "Without --benign / "
        "--qa the shipped sets are used. Rerunning with the same --out resumes.",
    )
    parser.add_argument("--model", default=None, help="hub id or directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--vector", default=None, help="safety vector file (default: the shipped one)")
    parser.add_argument(
        "--harmful",
        nargs="+",
        required=True,
        metavar="FILE",
        help="CSV/JSON/JSONL harmful questions (HarmEval, AdvBench, HEx-PHI, DangerousQA layouts)",
    )
    parser.add_argument(
        "--benign", nargs="+", default=None, metavar="FILE", help="benign questions (over-refusal)"
    )
    parser.add_argument(
        "--qa",
        nargs="+",
        default=None,
        metavar="FILE",
        help="questions with an answer column ('|'-separated accepted answers)",
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--judge", default="refusal", choices=("refusal", "llm"))
    parser.add_argument(
        "--judge-model",
        default=None,
        metavar="MODULE:ATTR",
        help="for --judge llm: a LangChain chat model, or a function returning one",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (reruns resume here)")
    parser.add_argument(
        "--limit", type=int, default=None, help="at most N questions per kind (round-robin over categories)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--question-column", default=None)
    parser.add_argument("--category-column", default=None)
    parser.add_argument("--answer-column", default=None)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--plausibility", type=float, default=None)
    parser.add_argument("--unsafe-expert", default=None, help="model | prompted | negated_vector")
    parser.add_argument("--scale", type=float, default=None)
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--no-gate", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(handler=_run)
