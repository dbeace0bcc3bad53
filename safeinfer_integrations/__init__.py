"""SafeInfer decoding-time safety for local Hugging Face chat models, with LangChain and LlamaIndex adapters.

Layers (each imports only from those listed before it): ``errors``; ``models`` (finding things inside a
transformers model, loading, batching); ``method`` (the safety vector and harm gate, steering, guidance, the
refusal rule); ``runtime`` (the engine, its decode loop, prompts, streams, settings); then ``training``
(building and calibrating vectors), ``evaluation``, ``cli`` and the adapters ``langchain`` and
``llama_index``. The core never imports LangChain or LlamaIndex.
"""

from importlib.metadata import PackageNotFoundError, version

from .errors import (
    InvalidInputError,
    InvalidSettingError,
    InvalidTypeError,
    SafeInferError,
    UnknownSettingError,
    VectorFileError,
    VectorMismatchError,
)
from .method.gate import HarmGate
from .method.vector import SafetyVector
from .runtime.config import SafeInferConfig, SamplingSettings
from .runtime.engine import SafeInferEngine
from .runtime.generation import Generation, SafetyTelemetry, Usage
from .runtime.streams import AsyncGenerationStream, GenerationStream

try:
    __version__ = version("safeinfer-integrations")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = [
    "AsyncGenerationStream",
    "Generation",
    "GenerationStream",
    "HarmGate",
    "InvalidInputError",
    "InvalidSettingError",
    "InvalidTypeError",
    "SafeInferConfig",
    "SafeInferEngine",
    "SafeInferError",
    "SafetyTelemetry",
    "SafetyVector",
    "SamplingSettings",
    "UnknownSettingError",
    "Usage",
    "VectorFileError",
    "VectorMismatchError",
    "__version__",
]
