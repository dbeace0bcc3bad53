"""What differs between the transformers versions the package supports (``transformers>=5.17,<6``; 5.17 and
5.24 are tested).

transformers 5.24 renamed the models' ``past_key_values`` argument to ``cache`` (the old name still works
there, with a deprecation warning). Before 5.24 a ``cache=`` argument is taken by the models' ``**kwargs``
and silently ignored: every call would run without its KV cache, so a decode step would see only its new
token. Every forward call with a cache therefore names it through `cache_kwarg`.
"""

from __future__ import annotations

import re
from typing import Any

import transformers

RENAMED_IN = (5, 24)


def _release(version: str) -> tuple[int, ...]:
    """The leading numeric parts of a version string: "5.24.0.dev0" -> (5, 24, 0), "6.0.0rc1" -> (6, 0, 0)."""
    parts: list[int] = []
    for piece in version.split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() < len(piece):  # "0rc1": a pre-release suffix ends the release part
            break
    return tuple(parts)


def cache_keyword(version: str = transformers.__version__) -> str:
    """The name of the models' KV-cache argument in this transformers version."""
    return "cache" if _release(version) >= RENAMED_IN else "past_key_values"


CACHE_KEYWORD = cache_keyword()


def cache_kwarg(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for a model call, under the name this transformers version reads."""
    return {CACHE_KEYWORD: cache}
