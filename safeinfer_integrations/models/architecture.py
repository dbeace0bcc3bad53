"""Where things are inside a transformers causal LM: decoder layers, their MLPs and attention output
projections, and the sizes that a safety vector must match. One table of known layouts, no model names."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import InvalidInputError, InvalidSettingError

# Attribute paths from the CausalLM wrapper to its list of decoder layers, tried in order.
_LAYER_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi3, ...
    "model.language_model.layers",  # multimodal wrappers
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
)
# Names of the MLP inside a decoder layer, and of the attention module and its output projection.
_MLP_NAMES: tuple[str, ...] = ("mlp", "feed_forward", "ffn")
_ATTN_NAMES: tuple[str, ...] = ("self_attn", "attn", "attention", "self_attention")
_OUT_PROJ_NAMES: tuple[str, ...] = ("o_proj", "c_proj", "out_proj", "dense")


def _get_path(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers."""
    for path in _LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise InvalidInputError(
        f"cannot find the decoder layers of {type(model).__name__}; looked for {', '.join(_LAYER_PATHS)}"
    )


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


def steering_module(model: nn.Module, layer: int) -> nn.Module:
    """The module whose output the safety vector is added to: layer ``layer``'s MLP (adding to the MLP
    output equals adding to the layer's output hidden state), or the whole layer when it has no MLP."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise InvalidSettingError(
            f"layer {layer} is out of range: the model has {len(layers)} layers (0..{len(layers) - 1})"
        )
    block = layers[layer]
    return _child(block, _MLP_NAMES) or block


def attention_out_proj(model: nn.Module, layer: int) -> nn.Module:
    """The attention output projection of layer ``layer`` (``o_proj`` in Llama/Mistral/Qwen2, ``c_proj``
    in GPT-2). Its input is the concatenation of all heads' outputs, n_heads * head_dim wide."""
    block = decoder_layers(model)[layer]
    attn = _child(block, _ATTN_NAMES)
    proj = _child(attn, _OUT_PROJ_NAMES) if attn is not None else None
    if proj is None:
        raise InvalidInputError(
            f"cannot find the attention output projection of layer {layer} in {type(block).__name__}"
        )
    return proj


@dataclass(frozen=True)
class ModelShape:
    """The sizes a safety vector depends on."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    vocab_size: int

    def config_hash(self) -> str:
        """A short hash of the architecture (not of weights or of incidental config fields)."""
        text = json.dumps(self.__dict__, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def as_metadata(self) -> dict[str, Any]:
        """The fields and their hash, as a vector's metadata records them (``config_hash``, ``architecture``),
        so that a mismatch can be named field by field."""
        return {"config_hash": self.config_hash(), "architecture": dict(self.__dict__)}

    def differences(self, recorded: dict[str, Any]) -> list[str]:
        """``field: recorded value != this model's`` for every recorded field that differs."""
        return [
            f"{name} {recorded[name]!r} != model's {value!r}"
            for name, value in self.__dict__.items()
            if name in recorded and recorded[name] != value
        ]


def model_shape(model: nn.Module) -> ModelShape:
    config: Any = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text_config, "hidden_size", None) or text_config.n_embd)
    heads = int(getattr(text_config, "num_attention_heads", None) or text_config.n_head)
    head_dim = int(getattr(text_config, "head_dim", None) or hidden // heads)
    return ModelShape(
        model_type=str(getattr(text_config, "model_type", "unknown")),
        hidden_size=hidden,
        num_layers=len(decoder_layers(model)),
        num_heads=heads,
        head_dim=head_dim,
        vocab_size=int(text_config.vocab_size),
    )


def context_window(model: nn.Module) -> int | None:
    """The longest sequence the model's positions allow, or None when unbounded/unknown."""
    config: Any = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
