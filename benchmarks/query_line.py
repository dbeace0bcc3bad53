"""Should the gate also read the last line of the user message (a retrieval template's query line)? Estimated on
held-in prompts from the two `framed_held_in.py` runs that chose ``refuse_above``.

    .venv/bin/python benchmarks/query_line.py benchmarks/results/framed_held_in_openings.json

For every held-in prompt whose last user message has a last line of three or more words other than the whole
message, the gate weighs that line alone (the engine's extra reading). The prompt's weight becomes the larger of
its recorded weight and the line's. A prompt that thereby crosses ``refuse_above`` (0.95) is counted as refused
(its answer would open with a refusal); every other prompt keeps its recorded verdict (the ``all`` run's where the
recorded weight was above 0.95, the ``off`` run's elsewhere). Prints, per framing and kind, refusals before and
after, and the prompts that cross.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from safeinfer_integrations.runtime.config import REFUSE_ABOVE
from safeinfer_integrations.runtime.engine import last_line
from safeinfer_integrations.runtime.engine_cache import get_engine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="framed_held_in.py's JSON with the 'off' and 'all' variants")
    args = parser.parse_args()
    runs = json.loads(Path(args.results).read_text(encoding="utf-8"))
    off, opened = runs["off"]["records"], runs["all"]["records"]
    lines = {i: last_line(r["question"]) for i, r in enumerate(off) if r["framing"] != "tool_turns"}
    lines = {i: line for i, line in lines.items() if line is not None}
    engine = get_engine()
    chats = [[{"role": "user", "content": line}] for line in lines.values()]
    weights: dict[int, float] = {}
    for start in range(0, len(chats), 32):
        out = engine.generate(chats[start : start + 32], mode="sa", max_new_tokens=1, refuse_above=1.0)
        for index, generation in zip(list(lines)[start : start + 32], out):
            weights[index] = generation.safety.gate_weight or 0.0
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    crossing = []
    for i, record in enumerate(off):
        before = record["gate"] or 0.0
        after = max(before, weights.get(i, 0.0))
        refused = opened[i]["refused"] if before > REFUSE_ABOVE else record["refused"]
        crosses = after > REFUSE_ABOVE >= before
        row = counts[(record["framing"], record["kind"])]
        row[0] += 1
        row[1] += refused
        row[2] += refused or crosses
        if crosses:
            crossing.append((record["framing"], record["kind"], lines[i], round(before, 3), round(weights[i], 3)))
    print(f"{len(lines)} held-in prompts have a distinct last line\n")
    print("| framing | kind | n | refused | refused with the line read |")
    print("|---|---|---|---|---|")
    for (framing, kind), (n, before_count, after_count) in sorted(counts.items()):
        print(f"| {framing} | {kind} | {n} | {before_count} | {after_count} |")
    print("\nprompts that cross refuse_above (framing, kind, line, weight before, line's weight):")
    for item in crossing:
        print(item)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
