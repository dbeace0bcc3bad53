"""Building a safety function vector for any supported causal LM (``safeinfer build-vector``).

Steps (docs/vectors.md explains each choice):

1. ``trials`` ICL prompts from the ``build`` split of the bundled harmful demonstrations: ``shots``
   (harmful question -> refusal) pairs then a query, ``Q: <question>\\nA: <answer>\\n\\n ... Q: <query>\\nA:``.
2. Mean output of every attention head at the last token (input of the attention output projection).
3. Average indirect effect of every head. Corruption: the same query with *no* demonstrations
   (``Q: <query>\\nA:``). Label shuffling, the corruption of Todd et al., is degenerate here: every answer is
   a refusal, so shuffled demonstrations still teach refusing. Target: the probability mass of the set of
   first tokens of the build split's answers (" I", " Sor"(ry), " That", ...), since answers vary.
4. FV = sum over the top ``heads`` heads of the output projection of each head's block.
5. A harm gate fitted on harmful (build splits) vs benign (gate splits) questions, everyday-phrased ones and
   benign requests included, each put in every framing of `data.gate_fit_framings` (`data.gate_harmful_questions`,
   `data.gate_benign_questions`, `gate_fit.fit_bundled_gate`).

Deterministic given the seed. For the default model, layer and scale default to the calibrated choice in
``vectors/fv/calibration.json`` (the shipped function vector, ``vectors/fv/SmolLM2-135M-Instruct.safetensors``,
kept as the paper's reference; the default vector is the optimised one, see `optimize`); for other models,
to a quarter of the depth (the paper's layer 8 of 32) and scale 1.0.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidSettingError, InvalidTypeError
from ..method.gate import HarmGate
from ..method.shipped import FUNCTION_VECTOR_CALIBRATION
from ..method.vector import SafetyVector
from ..models.architecture import model_shape
from ..models.batching import pad_id_of
from . import data
from .defaults import calibrated_choice, default_setting
from .gate_fit import GateFit, fit_bundled_gate
from .heads import capture_head_means, function_vector, indirect_effects, target_probability, top_heads

BUILDER_VERSION = "1.0"
CORRUPTION = "zero-shot: the query with no demonstrations"


@dataclass(frozen=True)
class BuildResult:
    """A built vector with what it was built from."""

    vector: SafetyVector
    means: torch.Tensor  # (layers, heads, head_dim)
    effects: torch.Tensor  # (layers, heads) average indirect effects
    gate_fit: GateFit | None
    clean_probability: float
    corrupted_probability: float
    seconds: float


def icl_prompt(demonstrations: list[tuple[str, str]], query: str) -> str:
    """``Q: <question>\\nA: <answer>\\n\\n`` per demonstration, then ``Q: <query>\\nA:``."""
    return "".join(f"Q: {q}\nA: {a}\n\n" for q, a in demonstrations) + f"Q: {query}\nA:"


def answer_first_tokens(tokenizer: Any, answers: list[str]) -> list[int]:
    """The distinct first tokens of the answers as they follow ``A:`` (with their leading space)."""
    tokens = set()
    for answer in answers:
        ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        if ids:
            tokens.add(int(ids[0]))
    return sorted(tokens)


def _check_positive(name: str, value: int, at_least: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < at_least:
        raise InvalidSettingError(f"{name} must be an int >= {at_least}; got {value!r}")


def build_vector(
    model: Any = None,
    tokenizer: Any = None,
    *,
    model_name: str | None = None,
    layer: int | None = None,
    scale: float | None = None,
    heads: int = 10,
    trials: int = 16,
    shots: int = 10,
    seed: int = 0,
    batch_size: int = 8,
    gate: bool | HarmGate = True,
    gate_metadata: dict[str, Any] | None = None,
    framings: Sequence[data.Framing] | None = None,
    progress: bool = True,
) -> BuildResult:
    """Build a safety function vector (and harm gate) for ``model``.

    ``model`` is a loaded causal LM (then ``tokenizer`` is required), a hub id or directory, or None for the
    default model. ``layer``/``scale`` are where and how strongly the engine adds the vector (None: see the
    module docstring). ``heads`` is k, ``trials`` the number of ICL prompts (and corrupted prompts),
    ``shots`` the demonstrations per prompt. ``gate``: True fits a harm gate (step 5), False ships none, a
    `HarmGate` is used as given (with ``gate_metadata`` recorded as its description), e.g. the identical fit
    already made for another vector of the same model and data. ``framings``: those the gate is fitted in
    (None: `data.gate_fit_framings`)."""
    from ..models.loading import DEFAULT_MODEL_NAME, is_default_model, load_model_and_tokenizer

    started = time.perf_counter()
    default = False
    if model is None or isinstance(model, (str, os.PathLike)):
        default = is_default_model(model)
        model_name = model_name or (DEFAULT_MODEL_NAME if default else str(model))
        model, tokenizer = load_model_and_tokenizer(model)
    elif tokenizer is None:
        raise InvalidTypeError("build_vector: pass the tokenizer with a loaded model")
    else:
        model_name = model_name or str(getattr(model.config, "name_or_path", "") or type(model).__name__)
        default = model_name == DEFAULT_MODEL_NAME
    shape = model_shape(model)
    _check_positive("heads", heads)
    _check_positive("trials", trials)
    _check_positive("shots", shots)
    _check_positive("batch_size", batch_size)
    if heads > shape.num_layers * shape.num_heads:
        raise InvalidSettingError(
            f"heads must be at most {shape.num_layers * shape.num_heads} "
            f"({shape.num_layers} layers x {shape.num_heads} heads); got {heads}"
        )
    pool = data.harmful_demos("build")
    if shots + 1 > len(pool):
        raise InvalidSettingError(
            f"shots must be at most {len(pool) - 1} (the build split has {len(pool)} pairs); got {shots}"
        )
    calibration, chosen = calibrated_choice(FUNCTION_VECTOR_CALIBRATION, default)
    layer, scale = default_setting(chosen, shape.num_layers, layer, scale)
    if not 0 <= layer < shape.num_layers:
        raise InvalidSettingError(f"layer must be in 0..{shape.num_layers - 1} for this model; got {layer}")

    rng = random.Random(seed)
    clean, corrupted, queries = [], [], []
    for _ in range(trials):
        picked = rng.sample(range(len(pool)), shots + 1)
        demos_, query = [pool[i] for i in picked[:shots]], pool[picked[shots]]
        prompt = icl_prompt([(d.question, d.answer) for d in demos_], query.question)
        clean.append(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        corrupted.append(tokenizer(icl_prompt([], query.question), add_special_tokens=True)["input_ids"])
        queries.append(query.question)
    targets = answer_first_tokens(tokenizer, [d.answer for d in pool])
    pad = pad_id_of(tokenizer)

    means = capture_head_means(model, clean, pad, batch_size=batch_size, progress=progress)
    clean_p = float(target_probability(model, clean, pad, targets, batch_size=batch_size).mean())
    effects = indirect_effects(model, corrupted, pad, means, targets, batch_size=max(batch_size, 16), progress=progress)
    corrupted_p = float(target_probability(model, corrupted, pad, targets, batch_size=batch_size).mean())
    best = top_heads(effects, heads)
    fv = function_vector(model, means, [(lay, hd) for lay, hd, _ in best])

    gate_fit, gate_info = (
        fit_bundled_gate(model, tokenizer, framings=framings, progress=progress) if gate is True else (None, {})
    )
    metadata: dict[str, Any] = {
        "model_name": model_name,
        **shape.as_metadata(),
        "model_type": shape.model_type,
        "layer": layer,
        "scale": scale,
        "heads": [[lay, hd, round(score, 6)] for lay, hd, score in best],
        "dataset_hash": data.dataset_hash(),
        "builder_version": BUILDER_VERSION,
        "build": {
            "trials": trials,
            "shots": shots,
            "seed": seed,
            "k": heads,
            "split": "build",
            "prompt_format": "Q: <question>\\nA: <answer>\\n\\n ... Q: <query>\\nA:",
            "corruption": CORRUPTION,
            "target": "probability mass of the first tokens of the build split's answers",
            "target_tokens": [tokenizer.decode([t]) for t in targets],
            "clean_probability": round(clean_p, 6),
            "corrupted_probability": round(corrupted_p, 6),
            "fv_norm": round(float(fv.norm()), 6),
        },
    }
    if gate_fit is not None:
        metadata["gate"] = gate_info
    given_gate = gate if isinstance(gate, HarmGate) else None
    if given_gate is not None:
        metadata["gate"] = {**(gate_metadata or {}), "source": "given"}
    if calibration is not None and "chosen" in calibration:
        metadata["calibration"] = {"rule": calibration.get("rule"), "chosen": calibration["chosen"]}
    vector = SafetyVector(
        vector=fv,
        layer=layer,
        scale=scale,
        metadata=metadata,
        gate=gate_fit.gate if gate_fit is not None else given_gate,
    )
    return BuildResult(
        vector=vector,
        means=means,
        effects=effects,
        gate_fit=gate_fit,
        clean_probability=clean_p,
        corrupted_probability=corrupted_p,
        seconds=time.perf_counter() - started,
    )
