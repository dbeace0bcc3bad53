"""LlamaIndex adapters: ``SafeInferLLM`` (an LLM with SafeInfer decoding-time safety) and
``minilm_embedding`` (a local, offline embedding model for examples and tests).

Needs ``llama-index-core`` (``pip install "safeinfer-integrations[llamaindex]"``)."""

from .base import SafeInferLLM
from .embeddings import minilm_embedding

__all__ = ["SafeInferLLM", "minilm_embedding"]
