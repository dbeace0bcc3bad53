"""``safeinfer bench``: tokens/s of each mode against plain ``model.generate()`` (`evaluation.speed`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


# ---------------------------------------------------------------------- bench
def add_bench(sub: Any) -> None:
    parser = sub.add_parser("bench", help="tokens/s of each mode against plain model.generate()")
    parser.add_argument("--model", default=None, help="hub id or local directory (default: the default model)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per generation (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per setting (default 3)")
    parser.add_argument(
        "--prompts", default="benign,harmful", help="prompt sets to time, comma-separated: benign, harmful"
    )
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument(
        "--device", default=None, help="where the models run, a torch device such as cuda (default: the CPU)"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="model dtype (default: float32 on the CPU, the checkpoint's own on a GPU)",
    )

    def run(args: argparse.Namespace) -> int:
        from ..evaluation.speed import format_table, run

        batch_sizes = tuple(int(size) for size in str(args.batch_sizes).split(","))
        prompt_sets = tuple(name for name in str(args.prompts).split(",") if name)
        results = run(
            args.model,
            batch_sizes,
            args.max_new_tokens,
            args.repeats,
            prompt_sets,
            device=args.device,
            dtype=args.dtype,
        )
        print(format_table(results))
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
        return 0

    parser.set_defaults(handler=run)
