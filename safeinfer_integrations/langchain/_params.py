"""The fields ChatSafeInfer and SafeInferLLM share: how the model is loaded, and the generation and safety
settings (the package's one settings schema, `runtime.settings.SafeInferSettings`), resolved per call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ConfigDict, Field, model_validator

from ..errors import InvalidTypeError
from ..runtime.engine import SafeInferEngine
from ..runtime.engine_cache import get_engine
from ..runtime.settings import SETTING_FIELDS, SafeInferSettings, call_settings

# Keyword arguments LangChain itself passes down to the model methods; never generation settings.
_FRAMEWORK_KWARGS = frozenset({"ls_structured_output_format", "structured_output_format", "stream"})
_CHAT_KWARGS = frozenset({"model", "tools", "tool_choice", "response_format"})


class SafeInferParams(SafeInferSettings):
    """Fields shared by the chat model and the LLM (see the classes' docstrings)."""

    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=()
    )

    model_name: str | None = Field(default=None, alias="model")
    """Hub id or local directory of the model; None: the default model (SmolLM2-135M-Instruct)."""
    engine: SafeInferEngine | None = Field(default=None, exclude=True)
    """An existing engine to use instead of loading ``model_name``."""
    vector: str | None = None
    """Path of a safety vector (None: the default model's shipped vector, if any)."""
    unsafe_model: str | None = None
    """Hub id or directory of a separate unsafe expert model (``unsafe_expert="model"``)."""
    dtype: str | None = None
    """Torch dtype name to load the model in (None: float32 on CPU, the checkpoint's dtype elsewhere)."""
    device_map: str | None = None
    """Passed to transformers when loading (e.g. ``"auto"``, ``"cuda:0"``)."""
    streaming: bool = False
    """Whether ``invoke`` streams internally (so callbacks see each token)."""
    detect_refusals: bool = True
    """Mark refusals with LangChain's standard ``refusal`` content block (see the refusal section)."""

    @model_validator(mode="after")
    def _validate_settings(self) -> SafeInferParams:
        # Fail at construction, with the engine's own messages, on out-of-range values.
        self.check_settings()
        if self.engine is not None and not isinstance(self.engine, SafeInferEngine):
            raise InvalidTypeError(f"engine must be a SafeInferEngine; got {type(self.engine).__name__}")
        self._resolve_engine(None)  # load (or fetch the shared) engine now, so a bad model fails here
        return self

    # ------------------------------------------------------------------ engines and settings
    def _resolve_engine(self, model: str | None) -> SafeInferEngine:
        """The engine for this call: the given one, or the shared engine of ``model`` (or ``model_name``)."""
        if (
            model is not None
            and model != self.model_name
            and not (self.engine is not None and model == self.engine.model_name)
        ):
            return get_engine(model, dtype=self.dtype, device_map=self.device_map)
        if self.engine is not None:
            return self.engine
        return get_engine(
            self.model_name,
            vector=self.vector,
            unsafe_model=self.unsafe_model,
            dtype=self.dtype,
            device_map=self.device_map,
        )

    def _params_for_tracing(self) -> dict[str, Any]:
        """The set fields under their own names (what ``_identifying_params`` and traces show)."""
        values = {name: getattr(self, name) for name in SETTING_FIELDS if getattr(self, name) is not None}
        return {"model_name": self.resolved_model_name, **values}

    @property
    def resolved_model_name(self) -> str:
        """The loaded model's name (what ``response_metadata["model_name"]`` reports)."""
        return self._resolve_engine(None).model_name

    def _call_settings(
        self, stop: Sequence[str] | None, kwargs: Mapping[str, Any]
    ) -> tuple[SafeInferEngine, dict[str, Any]]:
        """(engine, engine settings) for one call: the fields, then the call's kwargs, then ``stop``.

        Unknown keyword arguments raise `UnknownSettingError` (a ``TypeError``) naming what is allowed."""
        overrides = {k: v for k, v in kwargs.items() if k not in _FRAMEWORK_KWARGS | _CHAT_KWARGS}
        settings = call_settings(self.engine_settings(), overrides, owner=type(self).__name__, also_allowed=("model",))
        if stop is not None:
            settings["stop"] = list(stop) if isinstance(stop, (list, tuple)) else stop  # the engine checks it
        if not settings.get("stop"):
            settings.pop("stop", None)
        model = kwargs.get("model")
        if model is not None and not isinstance(model, str):
            raise InvalidTypeError(f"model must be a model id or path (str); got {type(model).__name__}")
        return self._resolve_engine(model), settings
