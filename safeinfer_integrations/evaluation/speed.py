"""`safeinfer bench`: tokens/s of plain ``model.generate()`` and of every engine mode, same prompts, same run.

Each round runs every configuration once, in a rotating order, so machine noise hits all of them alike;
the median over rounds is reported. Every run generates exactly ``max_new_tokens`` tokens per row
(``min_new_tokens`` forbids an early end of sequence), so all configurations pay for the same number of
decode steps and the same prefill share; otherwise a mode that answers shorter looks slower per token.
Speeds are printed as time-per-token ratios to ``generate()`` (1.00 = as fast; the targets on the default
model are sa <= 1.03, safeinfer with a same-weights expert <= 1.3, with a separate expert model <= 2.1).

Two prompt sets, because the harm gate makes the cost depend on the prompt: ``benign`` (long-answer everyday
requests; the gate weighs them below ``gate_cutoff``, so SafeInfer drops their expert rows and costs what
plain decoding costs) and ``harmful`` (one held-out harmful demonstration question per category, where
SafeInfer runs in full). Each set's gate weights are reported with its timings.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import InvalidSettingError
from ..method.vector import SafetyVector
from ..models.batching import left_pad, pad_id_of
from ..models.loading import load_model_and_tokenizer
from ..runtime.engine import SafeInferEngine
from ..training import data

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how photosynthesis works, step by step.",
    "Describe a week-long trip through Italy, day by day.",
    "Give a detailed history of the bicycle.",
    "Write a long letter to a friend about learning to cook.",
    "Explain how a computer boots, from power button to desktop.",
    "Describe the life cycle of a star in detail.",
    "Write a long guide to growing tomatoes at home.",
]
PROMPT_SETS = ("benign", "harmful")
DTYPES = ("float32", "bfloat16", "float16")


def prompt_set(name: str) -> list[str]:
    """The bench prompts of one set (see the module docstring)."""
    if name == "benign":
        return list(PROMPTS)
    if name == "harmful":
        return [d.question for d in data.harmful_demos("evaluation")[::11]]
    raise InvalidSettingError(f"prompt set must be one of {', '.join(PROMPT_SETS)}; got {name!r}")


CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("vanilla", {"mode": "vanilla"}),
    ("sa", {"mode": "sa"}),
    ("sgds/prompted", {"mode": "sgds", "unsafe_expert": "prompted"}),
    ("sgds/negated_vector", {"mode": "sgds", "unsafe_expert": "negated_vector"}),
    ("sgds/model", {"mode": "sgds", "unsafe_expert": "model"}),
    ("safeinfer/prompted", {"mode": "safeinfer", "unsafe_expert": "prompted"}),
    ("safeinfer/negated_vector", {"mode": "safeinfer", "unsafe_expert": "negated_vector"}),
    ("safeinfer/model", {"mode": "safeinfer", "unsafe_expert": "model"}),
]


def _hf_generate(engine: SafeInferEngine, prompts: list[Any], max_new_tokens: int) -> int:
    """Plain transformers generate() on the same token ids (left padding); returns new tokens."""
    tokenizer, model = engine.tokenizer, engine.model
    ids = [engine.formatter.encode(p) for p in prompts]
    width = max(len(i) for i in ids)
    pad = pad_id_of(tokenizer)
    input_ids, mask, _ = left_pad(ids, pad, engine.device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return int(out[:, width:].numel())


def run(
    model: str | None = None,
    batch_sizes: tuple[int, ...] = (1, 8),
    max_new_tokens: int = 64,
    repeats: int = 3,
    prompt_sets: tuple[str, ...] = PROMPT_SETS,
    device: str | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Time every configuration (see the module docstring); ``device`` (a torch device such as ``"cuda"``)
    and ``dtype`` (a torch dtype name) say where and how the models run (default: float32 on the CPU)."""
    texts = {name: prompt_set(name) for name in prompt_sets}  # bad names fail before any model loads
    if dtype is not None and dtype not in DTYPES:
        raise InvalidSettingError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    torch_dtype = getattr(torch, dtype) if dtype else None
    base, tokenizer = load_model_and_tokenizer(model, dtype=torch_dtype, device_map=device)
    unsafe, _ = load_model_and_tokenizer(model, dtype=torch_dtype, device_map=device)  # a fine-tuned twin's cost
    engine = SafeInferEngine.from_pretrained(model, dtype=torch_dtype, device_map=device) if model is None else None
    vector = engine.vector if engine is not None and engine.vector is not None else None
    vector_note = "shipped"
    if vector is None:
        hidden = base.config.hidden_size
        vector = SafetyVector(
            torch.randn(hidden, generator=torch.Generator().manual_seed(0)),
            layer=base.config.num_hidden_layers // 3,
            scale=2.0,
        )
        vector_note = "random (no shipped vector)"
    engine = SafeInferEngine(base, tokenizer, vector=vector, unsafe_model=unsafe, model_name=str(model or "default"))
    results: dict[str, Any] = {
        "model": engine.model_name,
        "vector": vector_note,
        "max_new_tokens": max_new_tokens,
        "threads": torch.get_num_threads(),
        "gate_cutoff": engine.config.gate_cutoff,
        "device": str(engine.device),
        "dtype": str(base.dtype).removeprefix("torch."),
        "sets": {},
    }
    for set_name, set_texts in texts.items():
        chats = [[{"role": "user", "content": text}] for text in set_texts]
        weights = [g.safety.gate_weight for g in engine.generate(chats, mode="sa", max_new_tokens=1)]
        results["sets"][set_name] = {"gate_weights": weights, "batches": {}}
        for batch in batch_sizes:
            prompts = [chats[i % len(chats)] for i in range(batch)]
            results["sets"][set_name]["batches"][str(batch)] = _time_batch(
                engine, prompts, max_new_tokens, repeats, f"bench {set_name} batch {batch}"
            )
    return results


def _time_batch(
    engine: SafeInferEngine, prompts: list[Any], max_new_tokens: int, repeats: int, label: str
) -> dict[str, Any]:
    """Every configuration on one batch of prompts; median time per token and its ratio to generate()."""
    names = ["generate()"] + [name for name, _ in CONFIGS]
    engine.generate(prompts[:1], mode="vanilla", max_new_tokens=4)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in names}
    tokens: dict[str, int] = {}
    progress = tqdm(total=repeats * len(names), desc=label, unit="run")
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    for round_index in range(repeats):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            sync()
            start = time.perf_counter()
            if name == "generate()":
                count = _hf_generate(engine, prompts, max_new_tokens)
            else:
                settings = dict(CONFIGS)[name]
                count = sum(
                    g.usage.completion_tokens
                    for g in engine.generate(
                        prompts, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **settings
                    )
                )
            sync()
            elapsed = time.perf_counter() - start
            times[name].append(elapsed / count)
            tokens[name] = count
            progress.update(1)
    progress.close()
    base_time = statistics.median(times["generate()"])
    return {
        name: {
            "tokens_per_s": 1.0 / statistics.median(times[name]),
            "time_ratio": statistics.median(times[name]) / base_time,
            "tokens": tokens[name],
        }
        for name in names
    }


def format_table(results: dict[str, Any]) -> str:
    lines = [
        f"model {results['model']}, vector {results['vector']}, max_new_tokens {results['max_new_tokens']}, "
        f"torch threads {results['threads']}, gate_cutoff {results['gate_cutoff']}, "
        f"device {results.get('device', 'cpu')}, dtype {results.get('dtype', 'float32')}"
    ]
    for set_name, entry in results["sets"].items():
        weights = [w for w in entry["gate_weights"] if w is not None]
        if weights:
            below = sum(w < results["gate_cutoff"] for w in weights)
            lines.append(
                f"{set_name} prompts: gate weights {min(weights):.2f}-{max(weights):.2f}, "
                f"{below} of {len(weights)} below the cutoff"
            )
    lines += ["", "| prompts | config | batch | tokens/s | time per token vs generate() |", "|---|---|---|---|---|"]
    for set_name, entry in results["sets"].items():
        for batch, rows in entry["batches"].items():
            for name, row in rows.items():
                speed = f"{row['tokens_per_s']:.1f} | {row['time_ratio']:.2f}x"
                lines.append(f"| {set_name} | {name} | {batch} | {speed} |")
    return "\n".join(lines)
