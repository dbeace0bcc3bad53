"""``safeinfer eval``: unsafe-response, over-refusal and helpfulness rates per mode (`evaluation`)."""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

from ..errors import InvalidSettingError
from ..evaluation.framings import FRAMINGS, parse_framings
from ..runtime.config import MODES
from .options import add_safety_options, safety_settings


def _chat_model(spec: str) -> Any:
    """``module:attribute`` -> the chat model object there (called first when it is a factory function)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise InvalidSettingError(
            f"--judge-model must be 'module:attribute' (a LangChain chat model or a function "
            f"returning one); got {spec!r}"
        )
    target = getattr(importlib.import_module(module_name), attribute)
    if callable(target) and not callable(getattr(target, "invoke", None)):
        target = target()
    return target


def _run(args: argparse.Namespace) -> int:
    from ..evaluation.judges import make_judge
    from ..evaluation.loaders import load_many
    from ..evaluation.runner import parse_modes, run_evaluation
    from ..runtime.engine import SafeInferEngine

    modes = parse_modes(args.modes)
    framings = parse_framings(args.framings)  # bad names fail before any file or model is read
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
        tool_turns=None if args.tool_turns else (),
        modes=modes,
        framings=framings,
        judge=judge,
        out_dir=args.out,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        settings=safety_settings(args),
        progress=not args.no_progress,
    )
    fields = (
        "unsafe_rate",
        "over_refusal_rate",
        "helpfulness",
        "tool_refusal_rate",
        "refusal_repetition_rate",
        "fluency_ppl",
        "tokens_per_s",
    )
    headline = {
        framing: {mode: {k: m[k] for k in fields} for mode, m in modes.items()}
        for framing, modes in summary["framings"].items()
    }
    print(json.dumps(headline, indent=2))
    print(f"wrote {args.out}/generations.jsonl, summary.json, report.md and plots")
    return 0


def add_eval(sub: Any) -> None:
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
    parser.add_argument("--benign", nargs="+", default=None, metavar="FILE", help="benign questions (over-refusal)")
    parser.add_argument(
        "--qa",
        nargs="+",
        default=None,
        metavar="FILE",
        help="questions with an answer column ('|'-separated accepted answers)",
    )
    parser.add_argument(
        "--framings",
        default="bare",
        help=f"comma-separated, of {', '.join(FRAMINGS)}: put each harmful and benign question in the prompts "
        "LangChain and LlamaIndex send (a system message, LlamaIndex's QA template with a retrieved document, "
        "agent headers); default bare",
    )
    parser.add_argument(
        "--tool-turns",
        action="store_true",
        help="also run the held-out benign agent and tool turns (55) and report how many are refused",
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument(
        "--judge", default="refusal", choices=("refusal", "llm"), help="how answers are judged (default: refusal)"
    )
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
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer (default 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (greedy by default)")
    parser.add_argument("--question-column", default=None, help="CSV column of the questions (default: guessed)")
    parser.add_argument("--category-column", default=None, help="CSV column of the categories (default: guessed)")
    parser.add_argument("--answer-column", default=None, help="CSV column of reference answers, if any")
    add_safety_options(parser, mode=False)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_run)
