"""Fitting the context-adaptive harm gate (`HarmGate`) from harmful vs benign questions.

The gate reads the hidden state after one decoder layer at the last prompt token, exactly as the engine
does (the prompt rendered with the chat template, unsteered). Two fits, both deterministic:

- ``probe`` (the default): an L2-penalised, class-balanced logistic regression on all standardised
  hidden features, solved by Newton's method. Folded back into raw hidden space it is still one
  direction and a bias. Layer choice: the best 2-fold cross-validated AUC (fit on one half, score on
  the other; ties: the lower layer). The default penalty, 0.003, was chosen on the held-in split (the best
  mean AUC over the framings of `data.gate_framings`). On the default model (fit:
  `data.gate_harmful_questions` vs `data.gate_benign_questions`, each in every framing) this fit picks
  layer 22 (docs/vectors.md has its held-in scores).
- ``mean_difference``: the direction ``mean(harmful) - mean(benign)``, layer chosen the same way, then
  a one-dimensional logistic regression of the standardised projection.

All but the last layer are candidates (the last hidden state may be normalised). The fit data must be
disjoint from anything the gate is evaluated on (see `data`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import InvalidInputError, InvalidSettingError, VectorFileError
from ..method.gate import HarmGate
from ..method.vector import SafetyVector
from ..models.architecture import context_window, decoder_layers
from ..models.batching import left_pad, pad_id_of, right_pad
from ..models.compat import cache_kwarg
from ..runtime.prompts import PromptFormatter
from . import data
from .data import Framing, framed_questions

DEFAULT_PROBE_L2 = 0.003


@dataclass(frozen=True)
class GateFit:
    gate: HarmGate
    layer_auc: tuple[float, ...]  # cross-validated AUC per candidate layer
    train_accuracy: float
    n_harmful: int
    n_benign: int
    framings: tuple[str, ...] = ()  # names of the framings fitted on (empty: bare one-turn chats)


def chat_ids(tokenizer: Any, questions: Sequence[str]) -> list[list[int]]:
    """Token ids of each question as a one-turn chat, as the engine renders it."""
    formatter = PromptFormatter(tokenizer)
    return [formatter.encode([{"role": "user", "content": q}]) for q in questions]


def framed_ids(tokenizer: Any, questions: Sequence[str], framings: Sequence[Framing]) -> list[list[int]]:
    """Token ids of every question in every framing (`data.framed_questions`: question-major), as the engine
    renders them."""
    formatter = PromptFormatter(tokenizer)
    return [formatter.encode(messages) for messages in framed_questions(questions, framings)]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    k, end = 0, min(len(a), len(b))
    while k < end and a[k] == b[k]:
        k += 1
    return k


def _batches_by_prefix(
    sequences: Sequence[Sequence[int]], order: list[int], batch_size: int, min_shared: int
) -> list[tuple[list[int], int]]:
    """Consecutive runs of ``order`` (sequences sorted by their tokens) as (rows, shared prefix length; 0: run
    left-padded). A sequence joins the open batch while that costs at most a quarter more token positions than
    running the two apart (a little padding buys a bigger batch), so prompts with one framing and document stay
    together and a batch does not straddle two long prefixes."""

    def cost(shared: int, rows: int, longest: int) -> int:
        return shared + rows * (longest - shared) if shared >= min_shared else rows * longest

    batches: list[tuple[list[int], int]] = []
    rows: list[int] = []
    shared = longest = 0
    for i in order:
        seq = sequences[i]
        if rows:
            joined = min(shared, _common_prefix(sequences[rows[0]], seq), len(seq) - 1)
            wider = max(longest, len(seq))
            if len(rows) < batch_size and cost(joined, len(rows) + 1, wider) <= 1.25 * (
                cost(shared, len(rows), longest) + len(seq)
            ):
                rows.append(i)
                shared, longest = joined, wider
                continue
            batches.append((rows, shared if shared >= min_shared else 0))
        rows, shared, longest = [i], len(seq) - 1, len(seq)
    if rows:
        batches.append((rows, shared if shared >= min_shared else 0))
    return [(b, s if len(b) > 1 else 0) for b, s in batches]  # a prompt alone runs as it is


@torch.inference_mode()
def last_token_hidden(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    *,
    batch_size: int = 16,
    progress: bool = False,
    min_shared: int = 16,
) -> torch.Tensor:
    """Hidden states after every decoder layer at the last token: shape (layers, rows, hidden), float64.

    The prompts are batched in token order, so the prompts of one framing and document (the same system
    message, instructions and context, different questions) share a batch (`_batches_by_prefix`). A prefix of at least
    ``min_shared`` tokens that every prompt of a batch shares is run once and its KV cache repeated for the
    rows, which run their own tokens right-padded (a causal model's last real token never sees the padding).
    Other batches run left-padded as a whole. Both give each prompt's own hidden states up to float
    rounding (tests/test_gate_fit.py)."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: list(sequences[i]))
    batches = _batches_by_prefix(sequences, order, batch_size, min_shared)
    chunks, done = [], []
    for rows, shared in tqdm(batches, desc="gate hidden states", disable=not progress):
        batch = [sequences[i] for i in rows]
        done.extend(rows)
        if shared:
            chunks.append(_hidden_after_shared_prefix(model, batch, shared, pad_id, device))
            continue
        ids, mask, positions = left_pad(batch, pad_id, device)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=False,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        chunks.append(torch.stack([h[:, -1, :] for h in out.hidden_states[1:]]).to("cpu", torch.float64))
    return torch.cat(chunks, dim=1)[:, torch.argsort(torch.tensor(done, dtype=torch.long))]  # input order


def _hidden_after_shared_prefix(
    model: nn.Module, batch: list[Sequence[int]], shared: int, pad_id: int, device: torch.device
) -> torch.Tensor:
    """`last_token_hidden` of one batch whose rows share their first ``shared`` tokens."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)  # type: ignore[arg-type]
    prefix = torch.tensor([list(batch[0][:shared])], dtype=torch.long, device=device)
    model(
        input_ids=prefix,
        attention_mask=torch.ones_like(prefix),
        position_ids=torch.arange(shared, device=device)[None],
        **cache_kwarg(cache),
        use_cache=True,
        logits_to_keep=1,
    )
    cache.batch_repeat_interleave(len(batch))
    rests = [list(seq[shared:]) for seq in batch]
    ids, rest_mask = right_pad(rests, pad_id, device)
    mask = torch.cat([torch.ones((len(batch), shared), dtype=torch.long, device=device), rest_mask], dim=-1)
    positions = (shared + torch.arange(ids.shape[1], device=device))[None].expand(len(batch), -1)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        **cache_kwarg(cache),
        use_cache=True,
        output_hidden_states=True,
    )
    last = torch.tensor([len(rest) - 1 for rest in rests], device=device)
    rows = torch.arange(len(batch), device=device)
    return torch.stack([h[rows, last, :] for h in out.hidden_states[1:]]).to("cpu", torch.float64)


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    diff = positive[:, None] - negative[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def _logistic_1d(z: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, l2: float) -> tuple[float, float]:
    """Weighted, L2-penalised (slope only) logistic regression of y on z by Newton's method."""
    x = torch.stack([z, torch.ones_like(z)], dim=1)
    theta = torch.zeros(2, dtype=torch.float64)
    penalty = torch.diag(torch.tensor([l2, 0.0], dtype=torch.float64))
    for _ in range(100):
        p = torch.sigmoid(x @ theta)
        grad = x.T @ (weights * (p - y)) + penalty @ theta
        hess = (x.T * (weights * p * (1 - p))) @ x + penalty + 1e-9 * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        theta = theta - step
        if float(step.abs().max()) < 1e-10:
            break
    return float(theta[0]), float(theta[1])


GateMethod = Literal["probe", "mean_difference"]
GATE_METHODS: tuple[str, ...] = ("probe", "mean_difference")


def _balanced_weights(n_positive: int, n_negative: int) -> torch.Tensor:
    """Sample weights giving each class half of a total weight of 1."""
    return torch.cat(
        [torch.full((n_positive,), 0.5 / n_positive), torch.full((n_negative,), 0.5 / n_negative)]
    ).double()


def _probe(harmful: torch.Tensor, benign: torch.Tensor, l2: float) -> tuple[torch.Tensor, float]:
    """Logistic regression on standardised features (balanced classes, L2 on the weights), by Newton's
    method; returned as (direction, bias) acting on raw hidden states."""
    x = torch.cat([harmful, benign]).double()
    y = torch.cat([torch.ones(len(harmful)), torch.zeros(len(benign))]).double()
    sample = _balanced_weights(len(harmful), len(benign))
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    design = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    penalty = torch.full((design.shape[1],), 2.0 * l2, dtype=torch.float64)
    penalty[-1] = 0.0  # the intercept is not penalised
    theta = torch.zeros(design.shape[1], dtype=torch.float64)
    for _ in range(100):
        p = torch.sigmoid(design @ theta)
        grad = design.T @ (sample * (p - y)) + penalty * theta
        hess = (design.T * (sample * p * (1 - p))) @ design + torch.diag(penalty + 1e-9)
        step = torch.linalg.solve(hess, grad)
        theta = theta - step
        if float(step.abs().max()) < 1e-9:
            break
    weights, intercept = theta[:-1] / std, float(theta[-1])
    return weights, intercept - float(mean @ weights)


def fit_gate_from_hidden(
    harmful: torch.Tensor,
    benign: torch.Tensor,
    *,
    floor: float = 0.0,
    l2: float | None = None,
    layers: Sequence[int] | None = None,
    method: GateMethod = "probe",
) -> GateFit:
    """Fit a gate from hidden states of shape (layers, rows, hidden) of harmful and benign prompts.
    ``l2`` defaults to 0.003 for ``probe`` (chosen on the held-in split, docs/vectors.md) and 0.1 for
    ``mean_difference``."""
    if method not in GATE_METHODS:
        raise InvalidSettingError(f"gate method must be one of {', '.join(GATE_METHODS)}; got {method!r}")
    if l2 is None:
        l2 = DEFAULT_PROBE_L2 if method == "probe" else 0.1
    if not (math.isfinite(l2) and l2 >= 0):
        raise InvalidSettingError(f"l2 must be a finite number >= 0; got {l2!r}")
    if harmful.shape[0] != benign.shape[0] or harmful.shape[-1] != benign.shape[-1]:
        raise InvalidInputError("harmful and benign hidden states must have the same layers and hidden size")
    if harmful.shape[1] < 4 or benign.shape[1] < 4:
        raise InvalidInputError(
            f"need at least 4 harmful and 4 benign prompts; got {harmful.shape[1]} and {benign.shape[1]}"
        )
    n_layers = harmful.shape[0]
    candidates = list(layers) if layers is not None else list(range(max(1, n_layers - 1)))
    bad = [layer for layer in candidates if not 0 <= layer < n_layers]
    if bad or not candidates:
        raise InvalidSettingError(f"gate layer must be in 0..{n_layers - 1}; got {bad or 'none'}")
    harmful, benign = harmful.double(), benign.double()
    half_h, half_b = harmful.shape[1] // 2, benign.shape[1] // 2
    scores = []
    for layer in range(n_layers):
        if layer not in candidates:
            scores.append(float("nan"))
            continue
        h, b = harmful[layer], benign[layer]
        folds = (
            (slice(0, half_h), slice(half_h, None), slice(0, half_b), slice(half_b, None)),
            (slice(half_h, None), slice(0, half_h), slice(half_b, None), slice(0, half_b)),
        )
        total = 0.0
        for fit_h, test_h, fit_b, test_b in folds:
            if method == "probe":
                direction, _ = _probe(h[fit_h], b[fit_b], l2)
            else:
                direction = h[fit_h].mean(0) - b[fit_b].mean(0)
            total += auc(h[test_h] @ direction, b[test_b] @ direction)
        scores.append(total / 2)
    best = max(candidates, key=lambda layer: (scores[layer], -layer))
    h, b = harmful[best], benign[best]
    y = torch.cat([torch.ones(len(h)), torch.zeros(len(b))]).double()
    if method == "probe":
        direction, bias = _probe(h, b, l2)
        gate = HarmGate(direction=direction, layer=best, bias=bias, floor=floor)
        return _result(gate, h, b, y, scores)
    direction = h.mean(0) - b.mean(0)
    unit = direction / direction.norm().clamp_min(1e-12)
    ph, pb = h @ unit, b @ unit
    middle = float(ph.mean() + pb.mean()) / 2
    spread = float(torch.cat([ph - ph.mean(), pb - pb.mean()]).std().clamp_min(1e-12))
    z = (torch.cat([ph, pb]) - middle) / spread
    weights = _balanced_weights(len(ph), len(pb))
    slope, intercept = _logistic_1d(z, y, weights * len(y), l2)
    gate = HarmGate(
        direction=(slope / spread) * unit, layer=best, bias=intercept - slope * middle / spread, floor=floor
    )
    return _result(gate, h, b, y, scores)


def _result(gate: HarmGate, h: torch.Tensor, b: torch.Tensor, y: torch.Tensor, scores: list[float]) -> GateFit:
    predicted = gate.weight(torch.cat([h, b]).float()) > (gate.floor + (1 - gate.floor) * 0.5)
    accuracy = float((predicted.double() == y).double().mean())
    return GateFit(
        gate=gate, layer_auc=tuple(scores), train_accuracy=accuracy, n_harmful=int(h.shape[0]), n_benign=int(b.shape[0])
    )


def fit_gate(
    model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[str],
    benign: Sequence[str],
    *,
    framings: Sequence[Framing] | None = None,
    floor: float = 0.0,
    batch_size: int = 16,
    progress: bool = False,
    method: GateMethod = "probe",
    layers: Sequence[int] | None = None,
    l2: float | None = None,
) -> GateFit:
    """Fit a `HarmGate` on harmful vs benign questions, each put in every one of ``framings``
    (`data.gate_framings`; None: as bare one-turn chats only). The same framings on both sides keep the
    framing from carrying any signal. A framing with a prompt longer than the model's context window is left
    out (`GateFit.framings` names those used). ``layers`` and ``l2`` as in `fit_gate_from_hidden`."""
    if not harmful or not benign:
        raise InvalidInputError("fit_gate needs harmful and benign questions")
    if framings is not None and not framings:
        raise InvalidInputError("fit_gate needs at least one framing (or None for bare one-turn chats)")
    decoder_layers(model)  # fail early on unsupported models
    pad = pad_id_of(tokenizer)
    questions = list(harmful) + list(benign)
    used: tuple[Framing, ...] = ()
    if framings is None:
        sequences = chat_ids(tokenizer, questions)
    else:
        sequences, used = _fitting_framings(model, tokenizer, questions, framings)
    hidden = last_token_hidden(model, sequences, pad, batch_size=batch_size, progress=progress)
    split = len(harmful) * max(1, len(used))
    fit = fit_gate_from_hidden(hidden[:, :split], hidden[:, split:], floor=floor, method=method, layers=layers, l2=l2)
    return replace(fit, framings=tuple(f.name for f in used))


def fit_bundled_gate(
    model: nn.Module,
    tokenizer: Any,
    *,
    framings: Sequence[Framing] | None = None,
    layer: int | None = None,
    l2: float | None = None,
    progress: bool = False,
) -> tuple[GateFit, dict[str, Any]]:
    """The harm gate's fit on the bundled data (`data.gate_harmful_questions` against
    `data.gate_benign_questions`, each in every one of ``framings``; None: `data.gate_fit_framings`), and its
    description for the vector's metadata. ``layer`` (None: the best cross-validated one) and ``l2`` (None:
    `fit_gate_from_hidden`'s default) as in `fit_gate`. Both vector builders and ``safeinfer fit-gate`` use it."""
    fit = fit_gate(
        model,
        tokenizer,
        data.gate_harmful_questions(),
        data.gate_benign_questions(),
        framings=data.gate_fit_framings() if framings is None else framings,
        layers=None if layer is None else [layer],
        l2=l2,
        progress=progress,
    )
    metadata = {
        "source": "fitted",
        "method": "probe",
        "layer": fit.gate.layer,
        "layer_choice": "cross-validated" if layer is None else "given",
        "l2": DEFAULT_PROBE_L2 if l2 is None else l2,
        "cv_auc": round(fit.layer_auc[fit.gate.layer], 4),
        "train_accuracy": round(fit.train_accuracy, 4),
        "n_harmful": fit.n_harmful,
        "n_benign": fit.n_benign,
        "fit_data": "harmful: build splits; benign: gate splits (training.data.gate_*_questions)",
        "framings": list(fit.framings),
        "dataset_hash": data.gate_dataset_hash(),
    }
    return fit, metadata


def with_fitted_gate(
    vector: SafetyVector,
    model: nn.Module,
    tokenizer: Any,
    *,
    layer: int | None = None,
    l2: float | None = None,
    progress: bool = False,
) -> SafetyVector:
    """``vector`` with a harm gate fitted anew on the bundled data (`fit_bundled_gate`; ``safeinfer fit-gate``):
    the steering vector, layer, scale and other metadata are kept, the gate and its description replaced (a new
    ``vector_id``). The vector must fit ``model``."""
    vector.check(model)
    fit, description = fit_bundled_gate(model, tokenizer, layer=layer, l2=l2, progress=progress)
    metadata = {**vector.metadata, "gate": {**description, "previous_vector_id": vector.vector_id}}
    return SafetyVector(vector.vector, layer=vector.layer, scale=vector.scale, metadata=metadata, gate=fit.gate)


def _fitting_framings(
    model: nn.Module, tokenizer: Any, questions: list[str], framings: Sequence[Framing]
) -> tuple[list[list[int]], tuple[Framing, ...]]:
    """Token ids of every question in every framing whose prompts all fit the model's context window
    (question-major), and those framings."""
    window = context_window(model)
    per_framing = [framed_ids(tokenizer, questions, [framing]) for framing in framings]
    keep = [k for k, ids in enumerate(per_framing) if window is None or max(map(len, ids)) <= window]
    if not keep:
        raise InvalidInputError(
            f"no gate framing fits the model's context window of {window} tokens "
            f"(framings: {', '.join(f.name for f in framings)})"
        )
    sequences = [per_framing[k][q] for q in range(len(questions)) for k in keep]
    return sequences, tuple(framings[k] for k in keep)


def gate_from_file(path: str) -> tuple[HarmGate, dict[str, Any]]:
    """The harm gate of the vector file at ``path`` (``--gate-from``) and a description of it for the new
    vector's metadata; a vector without a gate is an error naming the file."""
    source = SafetyVector.load(path)
    if source.gate is None:
        raise VectorFileError(f"--gate-from {path}: that vector has no harm gate")
    return source.gate, {**source.metadata.get("gate", {}), "taken_from": source.vector_id}
