"""An optimised safety vector (beyond the paper): a steering vector trained by gradient descent so that,
added like SafeInfer's function vector, it makes the model begin refusals on harmful questions while
keeping its own answers on benign ones.

Why: on SmolLM2-135M-Instruct the function vector built from heads' indirect effects (building.py) mostly
teaches "start with *I*" and reaches 11% refusal on the held-in split; this vector reached 64% (see
docs/vectors.md). Only the vector (hidden size) is trained; the model's weights are frozen.

Objective, with the vector added at layer ``layer``'s MLP output at every position >= prompt_len - 1 (the
engine's rule) and scale 1:

    loss = NLL(first ``answer_tokens`` tokens of the demo refusal | harmful build question)
         + benign_weight * NLL(first ``answer_tokens`` tokens of the model's own greedy answer | benign question)

on minibatches drawn with ``random.Random(seed)`` from the harmful ``build`` split and the benign ``gate``
split (the held-in ``calibration`` splits are never used). Adam, ``steps`` steps.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import InvalidSettingError
from ..method.gate import HarmGate
from ..method.shipped import OPTIMIZED_CALIBRATION
from ..method.vector import SafetyVector
from ..models.architecture import model_shape, steering_module
from ..models.batching import left_pad, pad_id_of
from . import data
from .defaults import calibrated_choice, default_setting
from .gate_fit import fit_bundled_gate

OPTIMIZER_VERSION = "1"


def _batch(items: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, ...]:
    """Left-padded prompt+answer ids, mask, positions, labels (answer tokens only), steering mask."""
    ids, mask, positions = left_pad([prompt + answer for prompt, answer in items], pad)
    width = ids.shape[1]
    labels = torch.full_like(ids, -100)
    steer = torch.zeros(len(items), width)
    for row, (prompt, answer) in enumerate(items):
        start = width - len(prompt) - len(answer)
        labels[row, start + len(prompt) :] = torch.tensor(answer)
        steer[row, start + len(prompt) - 1 :] = 1.0
    return ids, mask, positions, labels, steer


def optimize_vector(
    engine: Any,
    *,
    layer: int = 8,
    scale: float = 1.25,
    steps: int = 30,
    lr: float = 0.2,
    harmful_batch: int = 12,
    benign_batch: int = 6,
    answer_tokens: int = 10,
    benign_weight: float = 0.5,
    seed: int = 0,
    gate: HarmGate | None = None,
    gate_metadata: dict[str, Any] | None = None,
    fit_harm_gate: bool = True,
    framings: Sequence[data.Framing] | None = None,
    progress: bool = True,
) -> SafetyVector:
    """Train a safety vector for ``engine.model`` (a `SafeInferEngine`). The returned vector carries
    ``gate`` when given (its metadata describes it by ``gate_metadata``), else (with ``fit_harm_gate``) a probe
    gate fitted on `data.gate_harmful_questions` against `data.gate_benign_questions` (the build and gate
    splits, everyday-phrased questions and benign requests included), each put in every one of ``framings``
    (None: `data.gate_fit_framings`; `gate_fit.fit_bundled_gate`), else no gate."""
    model, tokenizer = engine.model, engine.tokenizer
    shape = model_shape(model)
    if not 0 <= layer < shape.num_layers:
        raise InvalidSettingError(f"layer must be in 0..{shape.num_layers - 1}; got {layer}")
    for name, value in (
        ("steps", steps),
        ("harmful_batch", harmful_batch),
        ("benign_batch", benign_batch),
        ("answer_tokens", answer_tokens),
    ):
        if value < 1:
            raise InvalidSettingError(f"{name} must be >= 1; got {value}")
    started = time.perf_counter()
    chat = lambda q: [{"role": "user", "content": q}]  # noqa: E731
    harmful = data.harmful_demos("build")
    benign = [b.question for b in data.benign_prompts("gate")]
    own = engine.generate([chat(q) for q in benign], mode="vanilla", max_new_tokens=answer_tokens)
    harmful_items = [
        (
            engine.formatter.encode(chat(d.question)),
            list(tokenizer(d.answer, add_special_tokens=False)["input_ids"])[:answer_tokens],
        )
        for d in harmful
    ]
    benign_items = [(engine.formatter.encode(chat(q)), list(g.token_ids)[:answer_tokens]) for q, g in zip(benign, own)]
    pad = pad_id_of(tokenizer)
    device = next(model.parameters()).device
    vector = torch.zeros(shape.hidden_size, device=device, requires_grad=True)
    steer_now: dict[str, torch.Tensor] = {}

    def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output + steer_now["mask"][:, :, None].to(output.dtype) * vector.to(output.dtype)[None, None, :]

    def nll(items: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        ids, mask, positions, labels, steer = (t.to(device) for t in _batch(items, pad))
        steer_now["mask"] = steer
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )

    flags = [p.requires_grad for p in model.parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    optimizer = torch.optim.Adam([vector], lr=lr)
    rng = random.Random(seed)
    handle = steering_module(model, layer).register_forward_hook(hook)
    history = []
    try:
        for _step in tqdm(range(steps), desc="optimise vector", unit="step", disable=not progress):
            loss_harmful = nll(rng.sample(harmful_items, min(harmful_batch, len(harmful_items))))
            loss_benign = nll(rng.sample(benign_items, min(benign_batch, len(benign_items))))
            loss = loss_harmful + benign_weight * loss_benign
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append([round(loss_harmful.item(), 4), round(loss_benign.item(), 4)])
    finally:
        handle.remove()
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
    gate_info: dict[str, Any] = {**(gate_metadata or {}), "source": "given"} if gate is not None else {"source": "none"}
    if gate is None and fit_harm_gate:
        fit, gate_info = fit_bundled_gate(model, tokenizer, framings=framings, progress=progress)
        gate = fit.gate
    metadata = {
        "method": "optimized",
        "model_name": engine.model_name,
        **shape.as_metadata(),
        "dataset_hash": data.dataset_hash(),
        "builder_version": OPTIMIZER_VERSION,
        "optimize": {
            "steps": steps,
            "lr": lr,
            "harmful_batch": harmful_batch,
            "benign_batch": benign_batch,
            "answer_tokens": answer_tokens,
            "benign_weight": benign_weight,
            "seed": seed,
            "loss_history": history,
            "seconds": round(time.perf_counter() - started, 1),
        },
        "gate": gate_info,
    }
    return SafetyVector(vector=vector.detach(), layer=layer, scale=scale, metadata=metadata, gate=gate)


def build_optimized(
    model: str | os.PathLike[str] | None = None,
    *,
    layer: int | None = None,
    scale: float | None = None,
    seed: int = 0,
    gate: bool | HarmGate = True,
    gate_metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> SafetyVector:
    """The shipped default vector's recipe (``safeinfer build-vector --method optimized``): `optimize_vector`
    with its defaults, at the calibrated layer and scale, with the calibrated gate sharpness applied to a
    fitted gate. For the default model (``model`` None or its name) these come from
    ``vectors/calibration.json``, so the result is the shipped vector (the gate up to float rounding; exactly,
    with the shipped file's gate given); for other models the layer defaults to a quarter of the depth and the
    scale to 1.0. ``gate``: True fits one, False makes none, a `HarmGate` is used as given (described by
    ``gate_metadata``)."""
    from ..models.loading import is_default_model
    from ..runtime.engine import SafeInferEngine
    from .sharpness import PLAIN, sharpness_of, with_sharpness

    calibration, chosen = calibrated_choice(OPTIMIZED_CALIBRATION, is_default_model(model))
    engine = SafeInferEngine.from_pretrained(model)  # its own vector (the default model's) is not used
    layer, scale = default_setting(chosen, model_shape(engine.model).num_layers, layer, scale)
    vector = optimize_vector(
        engine,
        layer=layer,
        scale=scale,
        seed=seed,
        gate=gate if isinstance(gate, HarmGate) else None,
        gate_metadata=gate_metadata,
        fit_harm_gate=gate is True,
        progress=progress,
    )
    metadata = dict(vector.metadata)
    sharp = sharpness_of(chosen.get("gate_sharpness"))
    if gate is True and vector.gate is not None and sharp != PLAIN:
        vector = with_sharpness(vector, sharp)
        metadata["gate"] = {**metadata["gate"], "sharpened": {"factor": sharp[0], "shift": sharp[1]}}
    if chosen:
        metadata["calibration"] = {"rule": calibration.get("rule"), "chosen": chosen}  # type: ignore[union-attr]
    return SafetyVector(vector.vector, layer=vector.layer, scale=vector.scale, metadata=metadata, gate=vector.gate)
