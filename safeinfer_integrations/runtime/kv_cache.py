"""KV-cache forking: a copy of a `DynamicCache` that shares the original's tensors.

The decode loop runs a prompt's first tokens once and then needs the cache twice (the gate reads the last
token on one copy, the steered pass extends the other). A shallow copy of the cache and of each layer is
enough when a layer's update rebinds its tensors (concatenation into new ones) rather than editing them in
place: true of plain `DynamicLayer`s, not of their subclasses (the sliding-window layer edits in place).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


def forkable(cache: Any) -> bool:
    """Whether ``cache`` is a layered cache of plain `DynamicLayer`s only (so `fork` is safe)."""
    layers = getattr(cache, "layers", None)
    return isinstance(layers, list) and all(type(layer) is DynamicLayer for layer in layers)


def fork(cache: Any) -> Any:
    """A copy of a `DynamicCache` that shares its tensors: updates to the fork (which concatenate into new
    tensors) leave the original untouched."""
    forked = copy.copy(cache)
    forked.layers = [copy.copy(layer) for layer in cache.layers]
    return forked


def first_rows(cache: Any, n: int, rows: int, device: torch.device) -> Any:
    """A fork of ``cache`` holding its first ``n`` of ``rows`` batch rows."""
    forked = fork(cache)
    if rows != n:
        forked.batch_select_indices(torch.arange(n, device=device))
    return forked
