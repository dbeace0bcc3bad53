"""The ``safeinfer`` command line: download, generate, chat, bench, build-vector, optimize-vector, fit-gate,
calibrate, eval.

Every argparse parser of the package lives in this folder, one module per group of subcommands; each
``add_*`` function registers a parser and its handler. Heavy imports happen inside the handlers, so
``safeinfer --help`` is instant. Bad input prints one line, ``safeinfer: error: ...``, and exits with 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import SafeInferError
from .bench import add_bench
from .evaluate import add_eval
from .run import add_chat, add_download, add_generate
from .vectors import add_build_vector, add_calibrate, add_fit_gate, add_optimize_vector

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safeinfer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        add_download,
        add_generate,
        add_chat,
        add_bench,
        add_build_vector,
        add_optimize_vector,
        add_fit_gate,
        add_calibrate,
        add_eval,
    ):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (SafeInferError, ValueError, TypeError, FileNotFoundError) as error:
        print(f"safeinfer: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
