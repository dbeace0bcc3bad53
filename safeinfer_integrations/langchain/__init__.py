"""LangChain adapters: `ChatSafeInfer` (a chat model) and `SafeInferLLM` (a completion LLM), both with
SafeInfer applied to every generation. Importing this package needs ``langchain-core``."""

from .chat_models import ChatSafeInfer
from .llms import SafeInferLLM

__all__ = ["ChatSafeInfer", "SafeInferLLM"]
