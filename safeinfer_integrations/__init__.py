"""SafeInfer decoding-time safety for local Hugging Face chat models, with LangChain and LlamaIndex adapters.

The core (this package's top level) never imports LangChain or LlamaIndex; the adapters live in
``safeinfer_integrations.langchain`` and ``safeinfer_integrations.llama_index``.
"""

from .config import SafeInferConfig, SamplingSettings
from .engine import AsyncGenerationStream, GenerationStream, SafeInferEngine
from .generation import Generation, SafetyTelemetry, Usage
from .vector import HarmGate, SafetyVector

__version__ = "0.1.0"

__all__ = [
    "AsyncGenerationStream",
    "Generation",
    "GenerationStream",
    "HarmGate",
    "SafeInferConfig",
    "SafeInferEngine",
    "SafetyTelemetry",
    "SafetyVector",
    "SamplingSettings",
    "Usage",
    "__version__",
]
