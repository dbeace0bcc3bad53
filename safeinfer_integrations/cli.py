"""The ``safeinfer`` command line: download, generate, chat, bench (and build-vector, eval when present).

Each subcommand is one ``_add_*`` function that registers its parser and handler; heavy imports happen
inside the handlers so ``safeinfer --help`` is instant."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def _add_safety_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", default=None, help="vanilla | sa | sgds | safeinfer (default: safeinfer)")
    parser.add_argument("--alpha", type=float, default=None, help="guidance strength in [0, 1)")
    parser.add_argument("--plausibility", type=float, default=None, help="tau in [0, 1); 0 = paper's rule")
    parser.add_argument("--unsafe-expert", default=None, help="model | prompted | negated_vector")
    parser.add_argument("--scale", type=float, default=None, help="override the vector's scale")
    parser.add_argument("--layer", type=int, default=None, help="override the vector's layer")
    parser.add_argument("--no-gate", action="store_true", help="switch the harm gate off")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="hub id or directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--vector", default=None, help="safety vector file (default: the shipped one)")
    parser.add_argument("--unsafe-model", default=None, help="a separate unsafe expert model")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    for name in ("top_p", "top_k", "seed", "mode", "alpha", "plausibility", "unsafe_expert", "scale", "layer"):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    if getattr(args, "stop", None):
        settings["stop"] = args.stop
    if getattr(args, "no_gate", False):
        settings["gate"] = False
    return settings


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _engine(args: argparse.Namespace) -> Any:
    from .engine import SafeInferEngine

    return SafeInferEngine.from_pretrained(args.model, vector=args.vector, unsafe_model=args.unsafe_model)


# ---------------------------------------------------------------------- download
def _add_download(sub: Any) -> None:
    parser = sub.add_parser("download", help="fetch and convert the default model into the cache")
    parser.add_argument("--force", action="store_true", help="convert again even if cached")

    def run(args: argparse.Namespace) -> int:
        from .loading import download_default_model

        print(download_default_model(force=args.force))
        return 0

    parser.set_defaults(handler=run)


# ---------------------------------------------------------------------- generate
def _add_generate(sub: Any) -> None:
    parser = sub.add_parser("generate", help="answer one prompt (chat template applied unless --raw)")
    parser.add_argument("prompt")
    parser.add_argument("--raw", action="store_true", help="treat the prompt as a completion prompt")
    parser.add_argument("--system", default=None, help="a system message")
    parser.add_argument("--json", action="store_true", help="print the whole Generation as JSON")
    parser.add_argument("--no-stream", action="store_true")
    _add_model_options(parser)
    _add_generation_options(parser)
    _add_safety_options(parser)

    def run(args: argparse.Namespace) -> int:
        engine = _engine(args)
        prompt: Any = args.prompt
        if not args.raw:
            prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": args.prompt}
            ]
        if args.json or args.no_stream:
            generation = engine.generate(prompt, **_settings(args))[0]
            print(json.dumps(generation.as_dict(), indent=2) if args.json else generation.text)
            return 0
        for piece in engine.stream(prompt, **_settings(args)):
            print(piece, end="", flush=True)
        print()
        return 0

    parser.set_defaults(handler=run)


# ---------------------------------------------------------------------- chat
def _add_chat(sub: Any) -> None:
    parser = sub.add_parser("chat", help="an interactive chat (empty line or Ctrl-D quits)")
    parser.add_argument("--system", default=None)
    _add_model_options(parser)
    _add_generation_options(parser)
    _add_safety_options(parser)

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
            stream = engine.stream(history, **_settings(args))
            for piece in stream:
                print(piece, end="", flush=True)
            print()
            history.append({"role": "assistant", "content": stream.generation.text if stream.generation else ""})

    parser.set_defaults(handler=run)


# ---------------------------------------------------------------------- bench
def _add_bench(sub: Any) -> None:
    parser = sub.add_parser("bench", help="tokens/s of each mode against plain model.generate()")
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", default="benign,harmful",
                        help="prompt sets to time, comma-separated: benign, harmful")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--device", default=None,
                        help="where the models run, a torch device such as cuda (default: the CPU)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="model dtype (default: float32 on the CPU, the checkpoint's own on a GPU)")

    def run(args: argparse.Namespace) -> int:
        from .bench import main as bench_main

        return bench_main(args)

    parser.set_defaults(handler=run)


# Subcommands owned by other modules register themselves here (build-vector, eval).
_OPTIONAL: tuple[tuple[str, str], ...] = (
    ("safeinfer_integrations.building", "add_cli"),
    ("safeinfer_integrations.optimize", "add_cli"),
    ("safeinfer_integrations.evaluation", "add_cli"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safeinfer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_download, _add_generate, _add_chat, _add_bench):
        add(sub)
    import importlib

    for module_name, function in _OPTIONAL:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        getattr(module, function)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"safeinfer: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
