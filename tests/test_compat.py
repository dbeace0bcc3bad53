"""The KV-cache argument's name across transformers versions (safeinfer_integrations.models.compat)."""

from __future__ import annotations

import inspect

import pytest
import transformers

from safeinfer_integrations.models import compat


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("5.0.0", "past_key_values"),
        ("5.17.0", "past_key_values"),
        ("5.23.1", "past_key_values"),
        ("5.24.0", "cache"),
        ("5.24.0.dev0", "cache"),
        ("5.30.2", "cache"),
        ("6.0.0rc1", "cache"),
    ],
)
def test_cache_keyword_by_version(version: str, expected: str) -> None:
    assert compat.cache_keyword(version) == expected


def test_release_parts() -> None:
    assert compat._release("5.24.0.dev0") == (5, 24, 0)
    assert compat._release("6.0.0rc1") == (6, 0, 0)
    assert compat._release("5.17.0+local") == (5, 17, 0)


def test_the_installed_models_take_the_chosen_keyword() -> None:
    """The name the package passes is a named parameter of the installed models' forward (a name they did
    not know would vanish into **kwargs and every step would run without its cache)."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM

    for cls in (LlamaForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel):
        assert compat.CACHE_KEYWORD in inspect.signature(cls.forward).parameters, (
            cls.__name__,
            transformers.__version__,
        )
    assert compat.cache_kwarg("c") == {compat.CACHE_KEYWORD: "c"}
