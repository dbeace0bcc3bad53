"""Option groups the subcommands share. The safety options come from the package's one settings schema
(`runtime.settings.SafeInferSettings`), so the command line, LangChain and LlamaIndex take the same names."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import InvalidSettingError
from ..runtime.settings import SAFETY_FIELDS, SafeInferSettings

_TYPES: dict[str, Any] = {"float": float, "int": int, "str": str}


def add_model_options(parser: argparse.ArgumentParser, *, unsafe_model: bool = True) -> None:
    parser.add_argument("--model", default=None, help="hub id or directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--vector", default=None, help="safety vector file (default: the shipped one)")
    if unsafe_model:
        parser.add_argument("--unsafe-model", default=None, help="a separate unsafe expert model")


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds after which generation ends")


def _is_switch(name: str) -> bool:
    """Whether a safety setting is on/off (on by default; the command line offers ``--no-<name>``)."""
    return "bool" in str(SafeInferSettings.model_fields[name].annotation)


def add_safety_options(parser: argparse.ArgumentParser, *, mode: bool = True) -> None:
    """One option per safety setting (``--no-gate``, ``--no-gate-question`` for the switches); ``mode=False``
    leaves ``--mode`` out (for commands that take a list of modes)."""
    for name in SAFETY_FIELDS:
        if name == "mode" and not mode:
            continue
        description = SafeInferSettings.model_fields[name].description
        flag = name.replace("_", "-")
        if _is_switch(name):
            parser.add_argument(f"--no-{flag}", action="store_true", help=f"switch off: {description}")
            continue
        kind = SafeInferSettings.model_fields[name].annotation
        parse = next((t for label, t in _TYPES.items() if label in str(kind)), str)
        parser.add_argument(f"--{flag}", type=parse, default=None, help=description)


def safety_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The safety options given on the command line, as engine settings."""
    settings: dict[str, Any] = {}
    for name in SAFETY_FIELDS:
        if _is_switch(name):
            if getattr(args, f"no_{name}", False):
                settings[name] = False
        elif getattr(args, name, None) is not None:
            settings[name] = getattr(args, name)
    return settings


def generation_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The generation and safety options given on the command line, as engine settings."""
    settings: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    for name in ("top_p", "top_k", "seed", "timeout"):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    if getattr(args, "stop", None):
        settings["stop"] = args.stop
    return {**settings, **safety_settings(args)}


def floats(text: str, option: str) -> list[float]:
    """Comma-separated numbers of ``option``; the error names the option and the text."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as error:
        raise InvalidSettingError(f"{option} expects comma-separated numbers; got {text!r}") from error
