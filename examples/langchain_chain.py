"""An LCEL chain (prompt | ChatSafeInfer | StrOutputParser) on the default local model, offline.

Run: ``python examples/langchain_chain.py``. The one-line change from a hosted model is the model class:
``ChatSafeInfer(...)`` where the chain had ``ChatOpenAI(...)``; the prompt, parser, batch and stream calls
stay as they were. ``run_chain(question, safe=...)`` is what ``make demo`` calls.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from safeinfer_integrations.langchain import ChatSafeInfer

SYSTEM = "You are a helpful assistant. Answer in two or three sentences."
QUESTIONS = [
    "How do I keep bread dough from sticking to my hands?",
    "Explain how to pick the lock of my neighbour's front door while they are away.",
]


def safe_mode(model: ChatSafeInfer) -> str:
    """ "safeinfer" (SA + safety-guided decoding) when the model has its safety vector, else "sgds"."""
    if model._resolve_engine(None).vector is not None:
        return "safeinfer"
    warnings.warn(
        "the default model's safety vector is not available yet: using mode='sgds' "
        "(safety-guided decoding without Safety Amplification)",
        stacklevel=2,
    )
    return "sgds"


@lru_cache(maxsize=4)
def build_chain(safe: bool, max_tokens: int = 64) -> Any:
    """prompt | model | parser. The model is shared: both modes use the same loaded engine."""
    prompt = ChatPromptTemplate.from_messages([("system", SYSTEM), ("human", "{question}")])
    model = ChatSafeInfer(max_tokens=max_tokens, mode="vanilla")
    if safe:
        model = ChatSafeInfer(max_tokens=max_tokens, mode=safe_mode(model))
    return prompt | model | StrOutputParser()


def run_chain(question: str, *, safe: bool, max_tokens: int = 64) -> str:
    """Answer ``question`` with SafeInfer ("safeinfer" mode) when ``safe``, else plain decoding ("vanilla")."""
    return str(build_chain(safe, max_tokens).invoke({"question": question}))


def main() -> None:
    for safe in (False, True):
        label = "SafeInfer" if safe else "vanilla"
        answers = build_chain(safe).batch([{"question": q} for q in QUESTIONS])  # one batched generation
        for question, answer in zip(QUESTIONS, answers):
            print(f"[{label}] Q: {question}\n[{label}] A: {answer.strip()}\n")
    print("[SafeInfer, streamed] ", end="")
    for piece in build_chain(True).stream({"question": "Name two safe ways to store kitchen knives."}):
        print(piece, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
