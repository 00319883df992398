"""Load models by spec: an embedded model (`interp_heal.embedded`), an HF model id, or a local HF folder.

A model comes back in eval mode with its left-padding tokenizer in the run's chat format and a small info
record; `model_shape` reads the layer count and width from the config alone (for `cli.py plan`).
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from interp_heal.architecture import decoder_layers, text_config
from interp_heal.chat import ChatFormat, use_chat_format
from interp_heal.config import ModelConfig
from interp_heal.embedded import EMBEDDED_MODELS, ensure_embedded_cache
from interp_heal.errors import ConfigError, ModelSpecError
from interp_heal.io import read_json

# A random 4-layer llama with the SmolLM2 tokenizer, built in memory from a fixed seed: for unit tests
# and smoke runs (no download, no cache, under a second).
TINY_RANDOM = "tiny-random"
TINY_RANDOM_TOKENIZER = "smollm2-135m"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    n_layers: int
    d_model: int
    vocab_size: int
    dtype: str
    device: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"model.device {device!r}: not a torch device (use auto, cpu, cuda or cuda:N)") from None


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def resolve_source(spec: str) -> Path | str:
    """Map a spec to what `from_pretrained` accepts: the embedded cache folder, a local folder or a hub id."""
    if spec in EMBEDDED_MODELS:
        return ensure_embedded_cache(spec)
    local = Path(spec).expanduser()
    if local.is_dir():
        return local
    if local.suffix == ".gguf" or spec.startswith((".", "/", "~")):
        raise ModelSpecError(f"model path {spec!r} does not exist (a local model must be an HF folder)")
    return spec


@functools.cache
def hub_reachable(host: str = "huggingface.co", timeout_s: float = 2.0) -> bool:
    """One quick TCP probe, so an offline machine fails in seconds instead of minutes of hub retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _hub_kwargs(source: Path | str) -> dict[str, bool]:
    """Offline, only a hub id already in the local HF cache can load; fail fast on any other."""
    if isinstance(source, Path) or hub_reachable():
        return {}
    if not isinstance(try_to_load_from_cache(source, "config.json"), str):
        raise _unknown_spec_error(str(source), OSError("not in the local HF cache"))
    return {"local_files_only": True}


def _unknown_spec_error(spec: str, cause: Exception) -> ModelSpecError:
    embedded = ", ".join(EMBEDDED_MODELS)
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if Path(spec).expanduser().is_dir():
        return ModelSpecError(
            f"{spec}: not a loadable model folder ({reason}) (a local model is a Hugging Face folder: "
            "config.json, weights and tokenizer files)"
        )
    if not hub_reachable():
        reason = f"the hub is unreachable from here; {reason}"
    return ModelSpecError(
        f"cannot load model {spec!r}: not an embedded model ({embedded}), not a local folder, and not "
        f"loadable from the hub ({reason}). Pass an embedded name or the path of a local HF model folder."
    )


def load_tokenizer(spec: str = "smollm2-135m", chat_format: ChatFormat = "auto") -> PreTrainedTokenizerBase:
    source = resolve_source(TINY_RANDOM_TOKENIZER if spec == TINY_RANDOM else spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_hub_kwargs(source))
    except (OSError, ValueError) as err:
        raise _unknown_spec_error(spec, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Batched decoder-only work (extraction at the last token, generation) needs left padding.
    tokenizer.padding_side = "left"
    use_chat_format(tokenizer, chat_format)
    return tokenizer


def load_model(
    spec: str = "smollm2-135m",
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    chat_format: ChatFormat = "auto",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelInfo]:
    """Load a causal LM in eval mode with its (left-padding) tokenizer, in `chat_format`, and a small info record."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if spec == TINY_RANDOM:
        tokenizer = load_tokenizer(spec, chat_format)
        model = build_tiny_llama(len(tokenizer)).to(device=torch_device, dtype=torch_dtype).eval()
        return model, tokenizer, model_info(model, spec)
    source = resolve_source(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **_hub_kwargs(source))
    except (OSError, ValueError) as err:
        raise _unknown_spec_error(spec, err) from err
    tokenizer = load_tokenizer(spec, chat_format)
    model.to(torch_device).eval()
    return model, tokenizer, model_info(model, spec)


def load_configured_model(
    config: ModelConfig, device: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelInfo]:
    """`load_model` as a run's model section says (`device`, e.g. a worker's, replaces config.device)."""
    return load_model(config.spec, config.dtype, device or config.device, config.chat_format)


@dataclass(frozen=True)
class ModelShape:
    """What a plan needs from a model's config, without loading weights."""

    architecture: str
    n_layers: int
    d_model: int


def model_shape(spec: str, config_file: str | Path | None = None) -> ModelShape:
    """Layer count and width from the model's config only (a local config.json may stand in for the hub)."""
    if spec == TINY_RANDOM:
        config = build_tiny_llama(32).config
    elif config_file is not None:
        path = Path(config_file)
        read_json(path, "model config.json")  # a syntax error is named with its line
        try:
            config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            raise ModelSpecError(f"{path}: not a model config.json ({str(err).strip().splitlines()[0]})") from None
    else:
        source = resolve_source(spec)
        try:
            config = AutoConfig.from_pretrained(source, **_hub_kwargs(source))
        except (OSError, ValueError) as err:
            raise _unknown_spec_error(spec, err) from err
    text = config.get_text_config()
    architecture = (config.architectures or [type(config).__name__])[0]
    return ModelShape(architecture, int(text.num_hidden_layers), int(text.hidden_size))


def build_tiny_llama(vocab_size: int, seed: int = 0) -> PreTrainedModel:
    """A small random llama shaped like SmolLM2 (GQA, tied embeddings), deterministic given the seed."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    config.architectures = ["LlamaForCausalLM"]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def model_info(model: nn.Module, name: str) -> ModelInfo:
    config = text_config(model)
    first_param = next(model.parameters())
    return ModelInfo(
        name=name,
        n_layers=len(decoder_layers(model)),
        d_model=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        dtype=str(first_param.dtype).removeprefix("torch."),
        device=str(first_param.device),
    )
