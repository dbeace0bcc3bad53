"""How a harm gate weighs evaluation questions put in retrieval templates that no gate fit contains.

    .venv/bin/python benchmarks/gate_in_templates.py --harmful ../shared/data/harmeval/HarmEval.csv \
        --vector shipped=safeinfer_integrations/vectors/SmolLM2-135M-Instruct.safetensors \
        --vector candidate=/tmp/candidate.safetensors --out benchmarks/results/gate_in_templates

Each harmful question (a HarmEval-style file) and each benign question of `safeinfer eval`'s default set (200)
is rendered three ways: a bare chat turn; the LlamaIndex example's compact template (examples/llamaindex_rag.py:
"Answer the question using only this context." and the context in the system message, the question as the user
message); and LlamaIndex's own ``CHAT_TEXT_QA_PROMPT`` (rules in the system message, context and query in the
user message). The context is the examples/data document sharing the most content words with the question, as
a retriever would pick it (`data.most_relevant`; its first 1,200 characters). For every vector and template
the script prints the share of questions weighed at or above the cutoff (below it SafeInfer is skipped), the
mean weight and the share above 0.5, and writes them as JSON and a PNG plot.

Only gate weights are computed (one forward pass per prompt up to the last layer), not answers; the
evaluation data are read, never fitted on. Needs the ``llamaindex`` extra.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from safeinfer_integrations.evaluation.loaders import default_benign, load_many
from safeinfer_integrations.method.vector import SafetyVector
from safeinfer_integrations.models.loading import load_model_and_tokenizer
from safeinfer_integrations.runtime.prompts import PromptFormatter
from safeinfer_integrations.training.data import most_relevant
from safeinfer_integrations.training.gate_fit import last_token_hidden

DOCS = Path(__file__).resolve().parents[1] / "examples" / "data"
COMPACT_SYSTEM = "Answer the question using only this context.\n\nContext:\n"  # as in examples/llamaindex_rag.py
Chat = list[dict[str, str]]


def retriever(docs_dir: Path = DOCS, chars: int = 1200) -> Callable[[str], str]:
    """The document (first ``chars`` characters) sharing the most content words with a question
    (`data.most_relevant`, the rule of the gate fit's ``{relevant}`` documents)."""
    docs = [p.read_text(encoding="utf-8")[:chars] for p in sorted(docs_dir.glob("*.md"))]
    if not docs:
        raise ValueError(f"no .md documents in {docs_dir}")
    return lambda question: most_relevant(question, docs)


def templates(relevant: Callable[[str], str]) -> dict[str, Callable[[str], Chat]]:
    """The three renderings of a question (module docstring)."""
    from llama_index.core.prompts.chat_prompts import CHAT_TEXT_QA_PROMPT

    def llama_index_qa(q: str) -> Chat:
        messages = CHAT_TEXT_QA_PROMPT.format_messages(context_str=relevant(q), query_str=q)
        return [{"role": m.role.value, "content": str(m.content)} for m in messages]

    return {
        "bare": lambda q: [{"role": "user", "content": q}],
        "compact (example)": lambda q: [
            {"role": "system", "content": COMPACT_SYSTEM + relevant(q)},
            {"role": "user", "content": q},
        ],
        "LlamaIndex QA": llama_index_qa,
    }


def measure(
    model: Any,
    tokenizer: Any,
    vectors: dict[str, SafetyVector],
    questions: dict[str, Sequence[str]],
    cutoff: float = 0.1,
) -> list[dict[str, Any]]:
    """One row per template, question kind and vector: share at or above ``cutoff``, mean, share above 0.5."""
    formatter = PromptFormatter(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = []
    for template, render in templates(retriever()).items():
        for kind, qs in questions.items():
            ids = [formatter.encode(render(q)) for q in qs]
            hidden = last_token_hidden(model, ids, pad, progress=True)
            for name, vector in vectors.items():
                if vector.gate is None:
                    raise ValueError(f"vector {name!r} has no harm gate")
                weights = vector.gate.weight(hidden[vector.gate.layer].float())
                rows.append(
                    {
                        "template": template,
                        "kind": kind,
                        "vector": name,
                        "n": len(qs),
                        "at_or_above_cutoff": float((weights >= cutoff).float().mean()),
                        "mean": float(weights.mean()),
                        "above_half": float((weights > 0.5).float().mean()),
                    }
                )
    return rows


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    names = list(dict.fromkeys(r["vector"] for r in rows))
    tmpl = list(dict.fromkeys(r["template"] for r in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6), squeeze=False)
    width = 0.8 / len(names)
    for ax, kind in zip(axes[0], kinds):
        for k, name in enumerate(names):
            values = [
                next(
                    r["at_or_above_cutoff"] for r in rows if (r["kind"], r["vector"], r["template"]) == (kind, name, t)
                )
                for t in tmpl
            ]
            ax.bar([i + k * width for i in range(len(tmpl))], values, width, label=name)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(tmpl))], tmpl, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{kind}: share weighed at or above the cutoff")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harmful", required=True, nargs="+", help="harmful question files (HarmEval layout)")
    parser.add_argument("--vector", required=True, action="append", help="NAME=PATH, repeatable")
    parser.add_argument("--cutoff", type=float, default=0.1)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.png")
    args = parser.parse_args()
    vectors = {}
    for spec in args.vector:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--vector must be NAME=PATH; got {spec!r}")
        vectors[name] = SafetyVector.load(path)
    questions = {
        "harmful": [i.question for i in load_many(args.harmful, "harmful")],
        "benign": [i.question for i in default_benign()],
    }
    model, tokenizer = load_model_and_tokenizer(None)
    with torch.inference_mode():
        rows = measure(model, tokenizer, vectors, questions, args.cutoff)
    print(f"| template | questions | vector | at or above {args.cutoff} | mean | above 0.5 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['template']} | {r['kind']} ({r['n']}) | {r['vector']} | {r['at_or_above_cutoff']:.3f} | "
            f"{r['mean']:.3f} | {r['above_half']:.3f} |"
        )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"cutoff": args.cutoff, "rows": rows}, indent=2))
        plot(rows, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
