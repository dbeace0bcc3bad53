"""MiniLMEmbeddings: LangChain's standard embedding suites, plus a retrieval sanity check, offline."""

from __future__ import annotations

from typing import Any

from langchain_core.vectorstores import InMemoryVectorStore
from langchain_tests.integration_tests import EmbeddingsIntegrationTests
from langchain_tests.unit_tests import EmbeddingsUnitTests

from safeinfer_integrations.langchain.embeddings import MiniLMEmbeddings


class TestMiniLMEmbeddingsUnit(EmbeddingsUnitTests):
    @property
    def embeddings_class(self) -> type[MiniLMEmbeddings]:
        return MiniLMEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {}


class TestMiniLMEmbeddingsIntegration(EmbeddingsIntegrationTests):
    @property
    def embeddings_class(self) -> type[MiniLMEmbeddings]:
        return MiniLMEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {}


def test_retrieval_finds_the_matching_text() -> None:
    texts = [
        "Book annual leave in the HR portal two weeks ahead.",
        "Store acids below eye level in a ventilated cabinet.",
        "Reset your password with the self-service tool.",
    ]
    embeddings = MiniLMEmbeddings()
    vectors = embeddings.embed_documents(texts)
    assert len(vectors) == 3 and all(len(v) == 384 for v in vectors)
    assert abs(sum(x * x for x in vectors[0]) - 1.0) < 1e-4  # normalized
    store = InMemoryVectorStore.from_texts(texts, embedding=embeddings)
    for query, expected in (("How do I request holidays?", 0), ("Where do chemicals go?", 1), ("I forgot my login", 2)):
        assert store.similarity_search(query, k=1)[0].page_content == texts[expected]
