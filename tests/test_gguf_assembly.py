"""An embedded GGUF joined from chunk packages (gemma3-270m): bad packages fail in one line, writing nothing."""

import sys

import pytest

from interp_heal.embedded import EMBEDDED_MODELS, EmbeddedModel, assembled_gguf_path, embedded_cache_dir
from interp_heal.errors import ModelSpecError
from interp_heal.io import sha256_file

GOOD = b"a stand-in for the joined chunks"


def _package(tmp_path, monkeypatch, name: str, assemble_body: str) -> None:
    """A fake chunked-GGUF package on sys.path whose `assemble(output_path, overwrite)` runs `assemble_body`."""
    folder = tmp_path / "site" / name
    folder.mkdir(parents=True)
    code = f"from pathlib import Path\n\ndef assemble(output_path=None, overwrite=False):\n    {assemble_body}\n"
    (folder / "__init__.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, name, raising=False)


def _embedded(package: str, sha256: str) -> EmbeddedModel:
    return EmbeddedModel("fake", package, "fake-gguf==1.0", "fake.gguf", "org/fake", "LlamaForCausalLM", sha256)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_HEAL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_assembles_into_the_cache_once(tmp_path, monkeypatch, cache):
    _package(tmp_path, monkeypatch, "fake_ok", f"Path(output_path).write_bytes({GOOD!r}); return Path(output_path)")
    (tmp_path / "good").write_bytes(GOOD)
    embedded = _embedded("fake_ok", sha256_file(tmp_path / "good"))
    path = assembled_gguf_path(embedded)
    assert path == cache / "gguf" / "fake.gguf" and path.read_bytes() == GOOD
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]  # no temp file left
    assert assembled_gguf_path(embedded) == path


def test_sha256_mismatch_names_the_fix_and_writes_nothing(tmp_path, monkeypatch, cache):
    _package(tmp_path, monkeypatch, "fake_bad", "Path(output_path).write_bytes(b'corrupt'); return Path(output_path)")
    with pytest.raises(ModelSpecError, match=r"has sha256 .* expected 0{64}; reinstall .*--force-reinstall fake-gguf"):
        assembled_gguf_path(_embedded("fake_bad", "0" * 64))
    assert list((cache / "gguf").iterdir()) == []


def test_missing_chunk_package_names_the_fix(tmp_path, monkeypatch, cache):
    # what the real package's assemble raises when a chunk package is not installed
    _package(tmp_path, monkeypatch, "fake_chunks", "import fake_gguf_part3_not_installed")
    with pytest.raises(ModelSpecError, match=r"a chunk package is missing .*make install"):
        assembled_gguf_path(_embedded("fake_chunks", "0" * 64))
    assert list((cache / "gguf").iterdir()) == []


def test_missing_package_names_the_fix(cache):
    with pytest.raises(ModelSpecError, match=r"fake-gguf==1.0 is not installed; install it with `make install`"):
        assembled_gguf_path(_embedded("fake_gguf_not_installed", "0" * 64))


def test_cache_folder_is_named_without_assembling(cache):
    """`cli.py models` lists the model's cache folder: the known sha256 names it, nothing is joined."""
    folder = embedded_cache_dir(EMBEDDED_MODELS["gemma3-270m"])
    assert folder == cache / "gemma3-270m-a5fd3b62230aa5ec"
    assert not (cache / "gguf").exists()
