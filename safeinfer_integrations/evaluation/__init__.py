"""Evaluation harness: unsafe-response rate on harmful prompts, over-refusal on benign prompts, helpfulness
against reference answers, fluency and speed, per SafeInfer mode and category; resumable, offline by
default. The CLI is ``safeinfer eval`` (`cli.evaluate`); the Python API is `run_evaluation`.

The LLM judge takes any chat model object with ``invoke``; LangChain and LlamaIndex are imported only by
`framings`, lazily, to render their own prompts."""

from ..models.batching import answer_nll
from .judges import Judge, LLMJudge, RefusalJudge, make_judge, parse_verdict
from .loaders import EvalItem, default_benign, default_qa, limit_items, load_items, load_many
from .metrics import matches_answer, normalise_answer, summarize
from .report import render_markdown, write_report
from .runner import parse_modes, read_generations, run_evaluation

__all__ = [
    "EvalItem",
    "Judge",
    "LLMJudge",
    "RefusalJudge",
    "answer_nll",
    "default_benign",
    "default_qa",
    "limit_items",
    "load_items",
    "load_many",
    "make_judge",
    "matches_answer",
    "normalise_answer",
    "parse_modes",
    "parse_verdict",
    "read_generations",
    "render_markdown",
    "run_evaluation",
    "summarize",
    "write_report",
]
