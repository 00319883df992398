import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from interp_heal.architecture import band_to_layers, decoder_layer_path, decoder_layers
from interp_heal.embedded import CACHE_MARKER, cache_is_valid
from interp_heal.errors import ConfigError, ModelSpecError
from interp_heal.models import load_model, model_info


def test_tiny_model_info(tiny_model, tokenizer):
    info = model_info(tiny_model, "tiny-random")
    assert (info.n_layers, info.d_model, info.vocab_size) == (4, 64, len(tokenizer))
    assert (info.dtype, info.device) == ("float32", "cpu")


def test_tiny_random_is_deterministic():
    first, tokenizer, _ = load_model("tiny-random")
    second, _, _ = load_model("tiny-random")
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None


def _tiny_qwen2():
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )


def _tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=5, n_head=4))


def _tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(
        Gemma3TextConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        )
    )


@pytest.mark.parametrize(
    ("build", "path", "n_layers"),
    [(_tiny_qwen2, "model.layers", 3), (_tiny_gpt2, "transformer.h", 5), (_tiny_gemma3, "model.layers", 2)],
    ids=["qwen2", "gpt2", "gemma3"],
)
def test_decoder_layers_across_architectures(build, path, n_layers):
    model = build()
    assert decoder_layer_path(model) == path
    assert len(decoder_layers(model)) == n_layers


def test_decoder_layers_through_peft(tiny_model):
    layers_before = list(decoder_layers(tiny_model))
    wrapped = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert decoder_layer_path(wrapped) == "base_model.model.model.layers"
    assert list(decoder_layers(wrapped)) == layers_before
    assert model_info(wrapped, "x").n_layers == 4


def test_decoder_layers_unknown_architecture():
    with pytest.raises(ModelSpecError, match="cannot find the decoder layers of Linear"):
        decoder_layer_path(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("band", "n_layers", "expected"),
    [
        ((0.45, 0.55), 30, [13, 14, 15, 16]),
        ((0.2, 0.8), 30, list(range(6, 24))),
        ((0.45, 0.55), 34, [15, 16, 17, 18]),
        ((0.5, 0.5), 4, [2]),
        ((0.0, 1.0), 4, [0, 1, 2, 3]),
        ((1.0, 1.0), 4, [3]),
    ],
)
def test_band_to_layers_is_exact(band, n_layers, expected):
    assert band_to_layers(band, n_layers) == expected


def test_band_out_of_range():
    with pytest.raises(ConfigError, match="fractions of depth"):
        band_to_layers((0.5, 1.5), 30)


def test_unknown_spec_fails_fast_and_names_embedded_models(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from interp_heal import models

    models.hub_reachable.cache_clear()
    with pytest.raises(ModelSpecError) as caught:
        load_model("no-such-org/no-such-model")
    message = str(caught.value)
    assert "smollm2-135m" in message and "local HF model folder" in message
    models.hub_reachable.cache_clear()


def test_missing_local_path_is_clear(tmp_path):
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_model(str(tmp_path / "missing-model"))


def test_local_folder_loads(tiny_model, tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded_tokenizer, info = load_model(str(tmp_path))
    assert info.n_layers == 4 and loaded_tokenizer.padding_side == "left"
    ids = torch.tensor([[1, 5, 9]])
    torch.testing.assert_close(model(ids).logits, tiny_model(ids).logits)


def _fake_cache(folder):
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    (folder / CACHE_MARKER).write_text(json.dumps({"file_sizes": {"model.safetensors": 100}}))


def test_cache_validation_detects_partial_and_truncated(tmp_path):
    folder = tmp_path / "cache"
    _fake_cache(folder)
    assert cache_is_valid(folder)
    (folder / "model.safetensors").write_bytes(b"x" * 50)
    assert not cache_is_valid(folder)
    (folder / CACHE_MARKER).unlink()
    assert not cache_is_valid(folder)
    (folder / CACHE_MARKER).write_text("{not json")
    assert not cache_is_valid(folder)
