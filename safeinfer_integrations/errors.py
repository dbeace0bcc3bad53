"""The package's error types: every bad input raises one of these, so a caller can catch it by kind.

Each subclasses the built-in it replaces (``ValueError`` or ``TypeError``), so ``except ValueError`` code
written before these types existed keeps working. Messages name the bad value and what is allowed.
"""

from __future__ import annotations

__all__ = [
    "IntegrityError",
    "InvalidInputError",
    "InvalidSettingError",
    "InvalidTypeError",
    "NumericalError",
    "SafeInferError",
    "UnknownSettingError",
    "VectorFileError",
    "VectorMismatchError",
]


class SafeInferError(Exception):
    """Base of every error this package raises on purpose."""


class InvalidSettingError(SafeInferError, ValueError):
    """A setting is out of range or not one of the allowed values (mode, alpha, max_new_tokens, layer, ...)."""


class UnknownSettingError(InvalidSettingError, TypeError):
    """A keyword argument names no setting (also a ``TypeError``, as for an unknown keyword of a function)."""


class InvalidInputError(SafeInferError, ValueError):
    """A prompt, message list, tool schema or data file cannot be used as given."""


class InvalidTypeError(SafeInferError, TypeError):
    """An argument has the wrong type (a model that is not a causal LM, content that is not text, ...)."""


class VectorMismatchError(SafeInferError, ValueError):
    """A safety vector does not fit the model it is used with (hidden size, layer, architecture)."""


class VectorFileError(SafeInferError, ValueError):
    """A file is not a readable safety vector."""


class NumericalError(SafeInferError, FloatingPointError):
    """Generation produced numbers that cannot be decoded into text: non-finite logits or hidden states, or
    steering so large that the steered state is the vector alone (the message names the vector and scale)."""


class IntegrityError(SafeInferError, ValueError):
    """A downloaded or cached file is not the one the package pins (the message names both hashes)."""
