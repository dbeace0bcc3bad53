"""The ``safeinfer`` command line: download, generate, chat, bench, build-vector, optimize-vector, fit-gate,
calibrate, eval.

Every argparse parser of the package lives in this folder, one module per group of subcommands; each
``add_*`` function registers a parser and its handler. Heavy imports happen inside the handlers, so
``safeinfer --help`` is instant. Bad input prints one line, ``safeinfer: error: ...``, and exits with 2; any
other failure prints one line too and exits with 1. ``--debug`` shows the traceback instead."""

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


def _version() -> str:
    from .. import __version__

    return str(__version__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safeinfer", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--version", action="version", version=f"safeinfer {_version()}")
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
    except KeyboardInterrupt:
        print("safeinfer: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, (SafeInferError, ValueError, TypeError, OSError)):  # bad input
            print(f"safeinfer: error: {message}", file=sys.stderr)
            return 2
        print(
            f"safeinfer: internal error ({type(error).__name__}): {message} (--debug shows the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
