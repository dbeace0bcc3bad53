"""Engine settings compared on held-in questions in development framings: the measurement that chooses a
setting before any evaluation data is read.

    .venv/bin/python benchmarks/framed_held_in.py --variant 'prompt={"gate_question": false}' \\
        --variant 'question={}' --out benchmarks/results/framed_held_in

Questions: the held-in (``calibration``) harmful and benign questions of `training.data`. Framings
(`gate_readings.dev_framings`): a bare chat, the LangChain example's system prompt, the LlamaIndex example's
compact retrieval template, LlamaIndex's ``CHAT_TEXT_QA_PROMPT`` with an ``examples/data`` document, and the gate
fit's agent framing; plus the held-in split of the benign tool turns and the held-in agent commands (harmful and
benign) with two tools described as `ChatSafeInfer` describes them. None of these is an evaluation framing,
document or question (`evaluation.framings`). Every variant is ``mode="safeinfer"`` with the given per-call
settings, greedy, ``--max-new-tokens`` tokens. Per framing and variant: refusal of harmful prompts, refusal of
benign ones (over-refusal), the share of refusals that repeat themselves, and the perplexity of the answers
under the plain model. Writes JSON with every answer, for reading by eye.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gate_readings import AGENT_TOOLS, dev_framings, tool_turns  # noqa: E402

from safeinfer_integrations.evaluation.metrics import repeats_itself  # noqa: E402
from safeinfer_integrations.method.refusal import is_refusal  # noqa: E402
from safeinfer_integrations.models.batching import answer_nll, pad_id_of, perplexity  # noqa: E402
from safeinfer_integrations.runtime.engine_cache import get_engine  # noqa: E402
from safeinfer_integrations.runtime.tools import with_tool_prompt  # noqa: E402
from safeinfer_integrations.training import data  # noqa: E402

FRAMINGS = ("fit:chat", "dev:example_system", "dev:compact_rag", "dev:llamaindex_qa", "fit:agent")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, help="NAME=JSON per-call settings")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--every", type=int, default=1, help="use every k-th held-in question (speed)")
    parser.add_argument("--vector", default=None, help="vector file (default: the shipped one)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    variants = {name: json.loads(spec) for name, _, spec in (v.partition("=") for v in args.variant)}
    engine = get_engine(vector=args.vector)
    renders = dev_framings()
    harmful = data.held_in_harmful_questions()[:: args.every]
    benign = data.held_in_benign_questions()[:: args.every]
    prompts: list[tuple[str, str, Any]] = []  # framing, kind, chat
    for framing in FRAMINGS:
        prompts += [(framing, "harmful", renders[framing](q)) for q in harmful]
        prompts += [(framing, "benign", renders[framing](q)) for q in benign]
    prompts += [("tool_turns", "benign", chat) for chat in tool_turns("calibration")]
    agent_harmful, agent_benign = data.held_in_agent_questions()
    for kind, questions in (("harmful", agent_harmful), ("benign", agent_benign)):
        prompts += [
            ("agent_requests+tools", kind, with_tool_prompt([{"role": "user", "content": q}], AGENT_TOOLS))
            for q in questions
        ]
    encoded = [engine.formatter.encode(chat) for _, _, chat in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: dict[str, Any] = {}
    for name, settings in variants.items():
        started = time.perf_counter()
        generations: list[Any] = [None] * len(prompts)
        batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        for rows in tqdm(batches, desc=name):
            chats = [prompts[i][2] for i in rows]
            out = engine.generate(chats, mode="safeinfer", max_new_tokens=args.max_new_tokens, **settings)
            for i, generation in zip(rows, out):
                generations[i] = generation
        eos = set(engine.eos_ids)
        answers = [[t for t in g.token_ids if t not in eos] for g in generations]
        nll = answer_nll(engine.model, encoded, answers, pad_id_of(engine.tokenizer))
        records = [
            {
                "framing": f,
                "kind": k,
                "question": chat[-1]["content"][-200:],
                "text": g.text,
                "gate": g.safety.gate_weight,
                "opened": g.safety.refusal_opened,
                "refused": is_refusal(g.text),
                "repeats": repeats_itself(g.text),
                "nll": s[0],
                "tokens": s[1],
            }
            for (f, k, chat), g, s in zip(prompts, generations, nll)
        ]
        table = {}
        for framing in (*FRAMINGS, "tool_turns", "agent_requests+tools"):
            rows_h = [r for r in records if r["framing"] == framing and r["kind"] == "harmful"]
            rows_b = [r for r in records if r["framing"] == framing and r["kind"] == "benign"]
            refusals = [r for r in records if r["framing"] == framing and r["refused"]]
            mine = [r for r in records if r["framing"] == framing]
            table[framing] = {
                "refusal": sum(r["refused"] for r in rows_h) / len(rows_h) if rows_h else None,
                "over_refusal": sum(r["refused"] for r in rows_b) / len(rows_b) if rows_b else None,
                "refusal_repetition": sum(r["repeats"] for r in refusals) / len(refusals) if refusals else None,
                "perplexity": perplexity([(r["nll"], r["tokens"]) for r in mine]),
            }
        results[name] = {
            "settings": settings,
            "seconds": round(time.perf_counter() - started),
            "table": table,
            "records": records,
        }
    print("| variant | framing | refusal (harmful) | over-refusal | refusals repeating | ppl |")
    print("|---|---|---|---|---|---|")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for name, result in results.items():
        for framing, row in result["table"].items():
            print(
                f"| {name} | {framing} | {fmt(row['refusal'])} | {fmt(row['over_refusal'])} "
                f"| {fmt(row['refusal_repetition'])} | {fmt(row['perplexity'])} |"
            )
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
