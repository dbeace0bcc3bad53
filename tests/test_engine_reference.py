"""Greedy output of every mode and unsafe-expert kind equals the naive no-cache reference loop, token for
token, on tiny random Llama, Qwen2 and GPT-2 models; batch rows equal single runs; the modes really differ."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import TINY_ARCHS
from reference import reference_greedy

from safeinfer_integrations import SafeInferConfig, SafeInferEngine, SafetyVector

PROMPTS: list[Any] = [
    [{"role": "user", "content": "How do I bake bread at home?"}],
    "The capital of France is",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two? Answer now."}],
]
CASES = [
    ("vanilla", None, 0.0),
    ("sa", None, 0.0),
    ("sgds", "prompted", 0.0),
    ("sgds", "prompted", 0.1),
    ("sgds", "negated_vector", 0.0),
    ("sgds", "model", 0.0),
    ("safeinfer", "prompted", 0.1),
    ("safeinfer", "negated_vector", 0.1),
    ("safeinfer", "model", 0.0),
]
MAX_NEW = 10


def _vector(model: Any, seed: int = 7) -> SafetyVector:
    hidden = model.config.get_text_config().hidden_size
    generator = torch.Generator().manual_seed(seed)
    return SafetyVector(vector=torch.randn(hidden, generator=generator), layer=1, scale=4.0)


_UNSAFE: dict[str, Any] = {}


def _unsafe_twin(model: Any, arch: str) -> Any:
    """A separate expert close to the main model (its weights plus noise), as a fine-tuned unsafe model
    would be: a random unrelated model rarely prefers the main model's top token, so guidance would
    change nothing and the comparison with the reference would be vacuous."""
    if arch not in _UNSAFE:
        twin = copy.deepcopy(model)
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for parameter in twin.parameters():
                parameter.add_(0.03 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        _UNSAFE[arch] = twin
    return _UNSAFE[arch]


def _engine(arch: str, tiny_model_factory: Any, tiny_tokenizer: Any) -> SafeInferEngine:
    model = tiny_model_factory(arch, 0)
    return SafeInferEngine(model, tiny_tokenizer, vector=_vector(model), unsafe_model=_unsafe_twin(model, arch),
                           config=SafeInferConfig(alpha=0.9))


def _reference(engine: SafeInferEngine, prompt: Any, mode: str, expert: str | None, tau: float) -> list[int]:
    vector = engine.vector
    assert vector is not None
    config = engine.config
    unsafe_ids = None
    if expert == "prompted":
        unsafe_ids = engine.formatter.encode(prompt, unsafe_prompt=config.unsafe_system_prompt)
    return reference_greedy(
        engine.model, engine.formatter.encode(prompt), mode=mode, max_new_tokens=MAX_NEW,
        eos={engine.tokenizer.eos_token_id}, vector=vector.vector.double(), layer=vector.layer,
        scale=vector.scale, expert=expert, unsafe_prompt_ids=unsafe_ids, unsafe_model=engine.unsafe_model,
        alpha=config.alpha, tau=tau,
    )


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize(("mode", "expert", "tau"), CASES)
def test_greedy_equals_naive_reference(arch: str, mode: str, expert: str | None, tau: float,
                                       tiny_model_factory: Any, tiny_tokenizer: Any) -> None:
    engine = _engine(arch, tiny_model_factory, tiny_tokenizer)
    settings: dict[str, Any] = {"mode": mode, "plausibility": tau, "max_new_tokens": MAX_NEW}
    if expert:
        settings["unsafe_expert"] = expert
    batch = engine.generate(PROMPTS, **settings)
    for prompt, generation in zip(PROMPTS, batch):
        expected = _reference(engine, prompt, mode, expert, tau)
        assert list(generation.token_ids) == expected
        single = engine.generate(prompt, **settings)[0]
        assert single.token_ids == generation.token_ids  # a batch row equals its single run
        assert single.text == generation.text


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_modes_change_the_output(arch: str, tiny_model_factory: Any, tiny_tokenizer: Any) -> None:
    """Guards the reference test against vacuity: steering and guidance do change tokens here."""
    engine = _engine(arch, tiny_model_factory, tiny_tokenizer)
    outputs = {
        (mode, expert): [g.token_ids for g in engine.generate(PROMPTS, mode=mode, unsafe_expert=expert,
                                                               plausibility=0.0, max_new_tokens=MAX_NEW)]
        for mode, expert, _ in CASES
    }
    vanilla = outputs[("vanilla", None)]
    assert outputs[("sa", None)] != vanilla
    assert outputs[("sgds", "negated_vector")] != vanilla
    assert any(outputs[("sgds", expert)] != vanilla for expert in ("model", "prompted"))


def test_guided_changes_counts_differences_from_the_steered_model(tiny_model_factory: Any,
                                                                 tiny_tokenizer: Any) -> None:
    engine = _engine("llama", tiny_model_factory, tiny_tokenizer)
    plain = engine.generate(PROMPTS, mode="vanilla", max_new_tokens=MAX_NEW)  # sgds steers no safe row
    guided = engine.generate(PROMPTS, mode="sgds", unsafe_expert="negated_vector", plausibility=0.0,
                             max_new_tokens=MAX_NEW)
    for alone, both in zip(plain, guided):
        assert alone.safety.guided_changes == 0
        if both.token_ids != alone.token_ids:
            # the first differing step must have been counted as a guidance change
            assert both.safety.guided_changes >= 1
        else:
            assert both.safety.guided_changes == 0
    assert sum(g.safety.guided_changes for g in guided) > 0
