"""Shared fixtures: tiny random-weight models of several families over a tiny in-memory tokenizer (fast,
offline, no download), and the real default model (converted once by `safeinfer download`)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "How do I bake bread at home? Mix flour, water, salt and yeast, then knead and bake.",
    "I can't help with that request because it could hurt people. Here is a safer idea instead.",
    "The capital of France is Paris. Two plus two is four. The sky is blue and water is wet.",
    'def add(a, b): return a + b  # Python code, JSON {"name": "tool", "arguments": {}}',
    "Question: what is the weather? Answer: sunny with a light breeze, around 20 degrees.",
    "Sorry, I won't explain how to break the law. Please ask me something else!",
]
TINY_ARCHS = ("llama", "qwen2", "mistral", "gpt2")
# Where the tiny models run: "cpu" unless SAFEINFER_TEST_DEVICE names another torch device ("cuda"), so the
# same tests check the engine on a GPU (benchmarks/device_check.sh). The default model stays on the CPU.
TEST_DEVICE = os.environ.get("SAFEINFER_TEST_DEVICE", "cpu")


def make_tiny_tokenizer() -> Any:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _CORPUS * 4, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def make_tiny_model(arch: str, vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Any:
    """A 3-layer random-weight causal LM of the given family, in float64 so that batched, cached and naive
    computations agree to far below the gaps between token scores."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        config = LlamaConfig(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            initializer_range=0.3,
            **common,
        )
    elif arch == "qwen2":
        config = Qwen2Config(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            initializer_range=0.3,
            use_sliding_window=False,
            **common,
        )
    elif arch == "mistral":  # one key/value head for four query heads (multi-query), no sliding window
        config = MistralConfig(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=256,
            initializer_range=0.3,
            sliding_window=None,
            **common,
        )
    elif arch == "gpt2":
        config = GPT2Config(n_embd=48, n_layer=3, n_head=4, n_positions=256, initializer_range=0.3, **common)
    else:
        raise ValueError(arch)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model.to(TEST_DEVICE).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_factory(tiny_tokenizer: Any) -> Callable[..., Any]:
    cache: dict[tuple[str, int], Any] = {}

    def factory(arch: str = "llama", seed: int = 0) -> Any:
        key = (arch, seed)
        if key not in cache:
            cache[key] = make_tiny_model(arch, len(tiny_tokenizer), seed)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def default_model_and_tokenizer() -> tuple[Any, Any]:
    """The real default model (SmolLM2-135M-Instruct, fp32), loaded once per test session."""
    from safeinfer_integrations.models.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(None)


@pytest.fixture(scope="session")
def default_engine() -> Any:
    """The shared default engine (default model + shipped vector when present), as the adapters get it."""
    from safeinfer_integrations.runtime.engine_cache import get_engine

    return get_engine()


_DEFAULT_MODEL_FIXTURES = frozenset({"default_engine", "default_model_and_tokenizer"})
_ALL_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads(request: pytest.FixtureRequest) -> Any:
    """Tiny models run single-threaded (OpenMP's thread hand-off costs far more than their matmuls, worst
    on a loaded machine); tests of the real default model (using its fixtures, or marked
    ``default_model``) get all threads."""
    wants_all = bool(_DEFAULT_MODEL_FIXTURES & set(request.fixturenames)) or (
        request.node.get_closest_marker("default_model") is not None
    )
    torch.set_num_threads(_ALL_THREADS if wants_all else 1)
    yield
    torch.set_num_threads(_ALL_THREADS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With SAFEINFER_TEST_NO_DEFAULT_MODEL=1 (a machine without the default model and no way to fetch it, such
    as the GPU check's), the tests of the real default model are skipped rather than failing on the download."""
    if os.environ.get("SAFEINFER_TEST_NO_DEFAULT_MODEL") != "1":
        return
    skip = pytest.mark.skip(reason="SAFEINFER_TEST_NO_DEFAULT_MODEL=1: no default model on this machine")
    for item in items:
        if _DEFAULT_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("default_model"):
            item.add_marker(skip)
