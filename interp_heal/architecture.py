"""Where things live inside a causal LM, across architectures: decoder blocks, final norm, text config.

Every module that hooks or wraps layers (steer, heal, sequences, the analyses) finds them here, so a new
architecture family is one entry in `_LAYER_PATHS` (and perhaps `_FINAL_NORM_NAMES`).
"""

from __future__ import annotations

import math

from peft import PeftModel
from torch import nn

from interp_heal.errors import ConfigError, ModelSpecError

# Where the decoder blocks live, relative to the *ForCausalLM module, by architecture family.
_LAYER_PATHS = (
    "model.layers",  # llama, mistral, qwen2/3, gemma, gemma2, gemma3 text-only
    "model.language_model.layers",  # gemma3 multimodal (Gemma3ForConditionalGeneration)
    "transformer.h",  # gpt2, gpt-j, falcon-style
    "gpt_neox.layers",  # pythia
)


def is_peft_model(model: nn.Module) -> bool:
    return isinstance(model, PeftModel)


def unwrap_peft(model: nn.Module) -> tuple[nn.Module, str]:
    """Return the *ForCausalLM inside a peft wrapper (or the model itself) and its attribute path."""
    if isinstance(model, PeftModel):
        return model.get_base_model(), "base_model.model"
    return model, ""


def _get_path(root: object, path: str) -> object | None:
    node = root
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def decoder_layer_path(model: nn.Module) -> str:
    """Dotted path from `model` (peft-wrapped or not) to its decoder-block ModuleList."""
    inner, prefix = unwrap_peft(model)
    for path in _LAYER_PATHS:
        if isinstance(_get_path(inner, path), nn.ModuleList):
            return f"{prefix}.{path}" if prefix else path
    raise ModelSpecError(f"cannot find the decoder layers of {type(inner).__name__}; known paths: {_LAYER_PATHS}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = _get_path(model, decoder_layer_path(model))
    assert isinstance(layers, nn.ModuleList)
    return layers


_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder block: a sibling of the layer list (llama `model.norm`, gpt2
    `transformer.ln_f`, pythia `gpt_neox.final_layer_norm`)."""
    parent_path = decoder_layer_path(model).rpartition(".")[0]
    parent = _get_path(model, parent_path) if parent_path else model
    for name in _FINAL_NORM_NAMES:
        norm = getattr(parent, name, None)
        if isinstance(norm, nn.Module):
            return norm
    raise ModelSpecError(f"cannot find the final norm of {type(model).__name__} (tried {_FINAL_NORM_NAMES})")


def band_to_layers(band: tuple[float, float], n_layers: int) -> list[int]:
    """Exact layer indices of a depth band: every layer l whose span [l/n, (l+1)/n) meets [lo, hi).

    start = floor(lo * n), stop = ceil(hi * n) (exclusive), at least one layer. SmolLM2 (n=30):
    (0.45, 0.55) -> [13, 14, 15, 16]; (0.2, 0.8) -> 6..23. gemma-3-4b (n=34): (0.45, 0.55) -> 15..18.
    """
    lo, hi = band
    if not (0.0 <= lo <= hi <= 1.0):
        raise ConfigError(f"band {band} must satisfy 0 <= lo <= hi <= 1 (fractions of depth)")
    start = min(math.floor(lo * n_layers), n_layers - 1)
    stop = max(math.ceil(hi * n_layers), start + 1)
    return list(range(start, min(stop, n_layers)))


def text_config(model: nn.Module):
    """The config holding hidden_size / vocab_size (multimodal models nest it under text_config)."""
    config = unwrap_peft(model)[0].config
    return getattr(config, "text_config", None) or config
