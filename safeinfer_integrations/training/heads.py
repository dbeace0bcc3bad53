"""Attention heads as function-vector components (Todd et al., ICLR 2024), for any supported architecture.

- `capture_head_means`: the mean output of every attention head at the last prompt token, read at the input
  of the attention output projection (``o_proj`` in Llama/Mistral/Qwen2, ``c_proj`` in GPT-2), which is the
  concatenation of all heads' outputs, ``n_heads * head_dim`` wide, grouped-query attention included.
- `indirect_effects`: causal mediation. For each head (L, H), its mean output is patched into the last token
  of *corrupted* prompts and the rise of a target probability is measured against the unpatched run.
- `function_vector`: ``sum over heads of out_proj_L(e_H(a[L, H])) - out_proj_L(0)``: each head's block of
  the output projection applied to its mean output (the projection's bias, shared by all heads, is left out).

Prompts are left-padded, so the last prompt token is the last column of every row.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import InvalidInputError, InvalidSettingError
from ..models.architecture import attention_out_proj, decoder_layers, model_shape
from ..models.batching import left_pad
from ..models.compat import cache_kwarg


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@contextmanager
def _pre_hooks(modules: Sequence[nn.Module], hook: Callable[[int, tuple[Any, ...]], Any]) -> Iterator[None]:
    """Forward pre-hooks ``hook(index, inputs)`` on each module; all removed on exit, whatever happens."""
    handles = []
    try:
        for index, module in enumerate(modules):
            handles.append(module.register_forward_pre_hook(lambda _m, inputs, i=index: hook(i, inputs)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def out_projections(model: nn.Module) -> list[nn.Module]:
    """Every layer's attention output projection."""
    return [attention_out_proj(model, layer) for layer in range(len(decoder_layers(model)))]


@torch.inference_mode()
def capture_head_means(
    model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int, *, batch_size: int = 8, progress: bool = False
) -> torch.Tensor:
    """Mean over ``sequences`` of every head's output at the last token: shape (layers, heads, head_dim),
    float32, read at the input of each layer's attention output projection."""
    shape = model_shape(model)
    projections = out_projections(model)
    total = torch.zeros(shape.num_layers, shape.num_heads * shape.head_dim, dtype=torch.float64)

    def hook(layer: int, inputs: tuple[Any, ...]) -> None:
        total[layer] += inputs[0][:, -1, :].detach().to("cpu", torch.float64).sum(0)

    device = _device(model)
    with _pre_hooks(projections, hook):
        for part in tqdm(list(_batches(len(sequences), batch_size)), desc="head means", disable=not progress):
            ids, mask, positions = left_pad(sequences[part], pad_id, device)
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1)
    means = total / len(sequences)
    return means.view(shape.num_layers, shape.num_heads, shape.head_dim).to(torch.float32)


def _target_probability(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Probability mass of the target token set at the last position: shape (rows,)."""
    probs = torch.softmax(logits[:, -1, :].to(torch.float64), dim=-1)
    return probs[:, targets].sum(-1)


@torch.inference_mode()
def target_probability(
    model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int, targets: Sequence[int], *, batch_size: int = 8
) -> torch.Tensor:
    """Unpatched probability mass of ``targets`` as the next token after each sequence."""
    device = _device(model)
    target_ids = torch.tensor(list(targets), device=device)
    out = []
    for part in _batches(len(sequences), batch_size):
        ids, mask, positions = left_pad(sequences[part], pad_id, device)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1
        ).logits
        out.append(_target_probability(logits, target_ids).cpu())
    return torch.cat(out)


@torch.inference_mode()
def patched_probability(
    model: nn.Module, sequence: Sequence[int], layer: int, head: int, mean: torch.Tensor, targets: Sequence[int]
) -> float:
    """Direct recomputation for one prompt and one head (no cache, no batching): the probability mass of
    ``targets`` after replacing head (layer, head)'s output at the last token by ``mean``."""
    shape = model_shape(model)
    block = slice(head * shape.head_dim, (head + 1) * shape.head_dim)
    projection = attention_out_proj(model, layer)

    def hook(_index: int, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        x = inputs[0].clone()
        x[:, -1, block] = mean.to(x.dtype)
        return (x, *inputs[1:])

    device = _device(model)
    ids = torch.tensor([list(sequence)], device=device)
    with _pre_hooks([projection], hook):
        logits = model(input_ids=ids, use_cache=False).logits
    return float(_target_probability(logits, torch.tensor(list(targets), device=device))[0])


@torch.inference_mode()
def indirect_effects(
    model: nn.Module,
    corrupted: Sequence[Sequence[int]],
    pad_id: int,
    means: torch.Tensor,
    targets: Sequence[int],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """Average indirect effect of every head: shape (layers, heads).

    For each corrupted prompt and head (L, H), the head's output at the last token is replaced by
    ``means[L, H]``; the effect is the patched probability mass of ``targets`` minus the unpatched one,
    averaged over prompts. Patching the last token changes nothing at earlier positions (causal attention),
    so the prompts' prefixes are run once and each patched run recomputes only the last token from a copy of
    that KV cache, with all heads of one layer side by side in the batch."""
    from transformers import DynamicCache

    shape = model_shape(model)
    n_layers, n_heads, head_dim = shape.num_layers, shape.num_heads, shape.head_dim
    if tuple(means.shape) != (n_layers, n_heads, head_dim):
        raise InvalidInputError(f"means must have shape {(n_layers, n_heads, head_dim)}; got {tuple(means.shape)}")
    if any(len(s) < 2 for s in corrupted):
        raise InvalidInputError("each corrupted prompt needs at least 2 tokens")
    device = _device(model)
    target_ids = torch.tensor(list(targets), device=device)
    projections = out_projections(model)
    effects = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    # Patch state read by the hook: (layer, values (rows, n_heads*head_dim), row mask (rows, n_heads*head_dim)).
    state: dict[str, Any] = {}

    def hook(layer: int, inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if state.get("layer") != layer:
            return None
        x = inputs[0].clone()
        last = x[:, -1, :]
        x[:, -1, :] = torch.where(state["where"], state["values"].to(x.dtype), last)
        return (x, *inputs[1:])

    # Row r of a patched batch is prompt r // n_heads with head r % n_heads patched.
    head_of_row = torch.arange(n_heads).repeat(1)
    block_mask = torch.zeros(n_heads, n_heads * head_dim, dtype=torch.bool)
    for head in range(n_heads):
        block_mask[head, head * head_dim : (head + 1) * head_dim] = True
    parts = list(_batches(len(corrupted), batch_size))
    bar = tqdm(total=len(parts) * n_layers, desc="indirect effects", disable=not progress)
    with _pre_hooks(projections, hook):
        for part in parts:
            ids, mask, positions = left_pad(corrupted[part], pad_id, device)
            rows = ids.shape[0]
            prefix = DynamicCache(config=model.config)  # type: ignore[arg-type]
            model(
                input_ids=ids[:, :-1],
                attention_mask=mask[:, :-1],
                position_ids=positions[:, :-1],
                **cache_kwarg(prefix),
                use_cache=True,
                logits_to_keep=1,
            )
            state.clear()
            base = _target_probability(
                model(
                    input_ids=ids[:, -1:],
                    attention_mask=mask,
                    position_ids=positions[:, -1:],
                    **cache_kwarg(copy.deepcopy(prefix)),
                    use_cache=True,
                ).logits,
                target_ids,
            ).cpu()
            rep_ids = ids[:, -1:].repeat_interleave(n_heads, 0)
            rep_mask = mask.repeat_interleave(n_heads, 0)
            rep_pos = positions[:, -1:].repeat_interleave(n_heads, 0)
            where = block_mask[head_of_row].repeat(rows, 1).to(device)
            for layer in range(n_layers):
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(n_heads)
                values = means[layer].reshape(1, n_heads * head_dim).expand(rows * n_heads, -1).to(device)
                state.update(layer=layer, where=where, values=values)
                logits = model(
                    input_ids=rep_ids,
                    attention_mask=rep_mask,
                    position_ids=rep_pos,
                    **cache_kwarg(cache),
                    use_cache=True,
                ).logits
                patched = _target_probability(logits, target_ids).cpu().view(rows, n_heads)
                effects[layer] += (patched - base[:, None]).sum(0)
                state.clear()
                bar.update(1)
    bar.close()
    return (effects / len(corrupted)).to(torch.float32)


def top_heads(effects: torch.Tensor, k: int) -> list[tuple[int, int, float]]:
    """The ``k`` heads with the largest indirect effect, as (layer, head, effect), best first (ties: lower
    layer, then lower head)."""
    n_layers, n_heads = effects.shape
    if not 1 <= k <= n_layers * n_heads:
        raise InvalidSettingError(f"k must be between 1 and {n_layers * n_heads} (layers x heads); got {k}")
    flat = [(-float(effects[layer, head]), layer, head) for layer in range(n_layers) for head in range(n_heads)]
    flat.sort()
    return [(layer, head, -score) for score, layer, head in flat[:k]]


@torch.inference_mode()
def function_vector(model: nn.Module, means: torch.Tensor, heads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """FV = sum over ``heads`` of out_proj_L(e_H(means[L, H])) - out_proj_L(0): shape (hidden,), float32."""
    shape = model_shape(model)
    device = _device(model)
    dtype = next(model.parameters()).dtype
    total = torch.zeros(shape.hidden_size, dtype=torch.float64)
    width = shape.num_heads * shape.head_dim
    for layer, head in heads:
        if not (0 <= layer < shape.num_layers and 0 <= head < shape.num_heads):
            raise InvalidSettingError(
                f"head ({layer}, {head}) is out of range for {shape.num_layers} layers x {shape.num_heads} heads"
            )
        projection = attention_out_proj(model, layer)
        x = torch.zeros(2, 1, width, dtype=dtype, device=device)
        x[0, 0, head * shape.head_dim : (head + 1) * shape.head_dim] = means[layer, head].to(dtype)
        out = projection(x)
        total += (out[0, 0] - out[1, 0]).to("cpu", torch.float64)
    return total.to(torch.float32)
