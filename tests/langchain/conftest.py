"""Fixtures of the LangChain tests: the default model's tokenizer, scripted engines, tiny-model engines.

The scripted model "generates" a fixed text, token by token, through the real SafeInferEngine.

A 135M model cannot call tools reliably, so tool calling and structured output are also tested with a
model whose output is known: the engine, its decode loop, stop strings, streaming and the adapters all run
for real; only the logits are scripted (the script's next token gets all the probability mass). Every row
of a batch, and the unsafe expert's twin rows, follow the same script, so guided decoding changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import PretrainedConfig

from safeinfer_integrations.runtime.engine import SafeInferEngine


class ScriptedLM(torch.nn.Module):
    """Emits ``script`` (token ids), then EOS, whatever the prompt."""

    def __init__(self, script: list[int], vocab_size: int, eos_id: int, context: int = 8192) -> None:
        super().__init__()
        self.config = PretrainedConfig(
            vocab_size=vocab_size, max_position_embeddings=context, num_hidden_layers=1, name_or_path="scripted-lm"
        )
        self.script = list(script)
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # gives the module a device
        self.calls = 0  # forward passes (tests count them to see that a stopped stream stops computing)

    def forward(self, input_ids: torch.Tensor, cache: Any = None, **_: Any) -> Any:
        self.calls += 1
        step = getattr(cache, "_scripted_step", 0)
        if cache is not None:
            cache._scripted_step = step + 1
        token = self.script[step] if step < len(self.script) else self.eos_id
        logits = torch.full((input_ids.shape[0], 1, self.vocab_size), -1e4)
        logits[:, :, token] = 0.0
        return SimpleNamespace(logits=logits)


def scripted_engine(tokenizer: Any, text: str, **engine_kwargs: Any) -> SafeInferEngine:
    """An engine whose model always answers ``text`` (tokenized with ``tokenizer``)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    model = ScriptedLM(ids, vocab_size=len(tokenizer), eos_id=int(tokenizer.eos_token_id))
    return SafeInferEngine(model, tokenizer, model_name="scripted-lm", **engine_kwargs)


@pytest.fixture(scope="session")
def smol_tokenizer() -> Any:
    """SmolLM2's tokenizer and chat template (read from the converted default model; no weights)."""
    from transformers import AutoTokenizer

    from safeinfer_integrations.models.loading import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(None))


@pytest.fixture
def scripted(smol_tokenizer: Any) -> Callable[[str], SafeInferEngine]:
    """``scripted(text)``: an engine whose model answers ``text`` to anything."""
    return lambda text, **kwargs: scripted_engine(smol_tokenizer, text, **kwargs)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_factory: Any, tiny_tokenizer: Any) -> SafeInferEngine:
    """A 3-layer random float64 Llama with the ChatML template: real decoding, in milliseconds."""
    return SafeInferEngine(tiny_model_factory("llama"), tiny_tokenizer, model_name="tiny-llama")


# The standard integration suite's tests that need the model itself to write a correct tool call or a
# schema-valid JSON object (see test_lc_standard.py). SmolLM2-135M was not trained for tool use or JSON
# output: given the tool prompt it mostly answers in prose or writes malformed calls.
TOO_SMALL_REASON = (
    "the suite's max_tokens=12 cuts most tool calls and JSON objects short, and SmolLM2-135M rarely chooses a "
    "tool unasked; forced tool calls and structured output are tested on the default model with room to finish "
    "in tests/test_structured.py, and with scripted model outputs in test_lc_chat.py"
)
NEEDS_A_CAPABLE_MODEL = frozenset(
    {
        "test_tool_calling",
        "test_tool_calling_async",
        "test_bind_runnables_as_tools",
        "test_tool_choice",
        "test_tool_calling_with_no_arguments",
        "test_agent_loop",
        "test_unicode_tool_call_integration",
        "test_structured_output",
        "test_structured_output_async",
        "test_structured_output_pydantic_2_v1",
        "test_structured_output_optional_param",
        "test_json_mode",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark those tests xfail (non-strict: a lucky pass is reported as XPASS, not a failure)."""
    for item in items:
        cls = getattr(item, "cls", None)
        if (
            cls is not None
            and cls.__name__ == "TestChatSafeInferIntegration"
            and getattr(item, "originalname", None) in NEEDS_A_CAPABLE_MODEL
        ):
            item.add_marker(pytest.mark.xfail(reason=TOO_SMALL_REASON, strict=False))
