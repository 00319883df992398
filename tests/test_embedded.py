"""End-to-end on the embedded SmolLM2-135M-Instruct (slow: loads the real model)."""

import pytest
import torch

from interp_heal.models import EMBEDDED_MODELS, cache_is_valid, embedded_cache_dir, load_model

pytestmark = pytest.mark.slow


def test_embedded_model_loads_from_cache_and_answers():
    model, tokenizer, info = load_model("smollm2-135m")
    assert cache_is_valid(embedded_cache_dir(EMBEDDED_MODELS["smollm2-135m"]))
    assert (info.n_layers, info.d_model, info.vocab_size) == (30, 576, 49152)
    # The cache is a plain HF model: not flagged quantised, so save_pretrained and Trainer accept it.
    assert getattr(model, "hf_quantizer", None) is None
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_love_vector_changes_greedy_generation(tmp_path):
    from interp_heal.config import load_config
    from interp_heal.steer_job import run_steer

    config = load_config("configs/demo.yaml", ["steer.n_contexts=16", "generate.max_new_tokens=24"])
    result = run_steer(config, tmp_path, n_samples=2)
    assert result.vector.layers == (13, 14, 15, 16)
    by_coeff = {}
    for record in result.samples:
        by_coeff.setdefault(record.coeff, []).append(record.completion)
    assert set(by_coeff) == {0.0, 1.0, 2.0}
    assert by_coeff[2.0] != by_coeff[0.0]
    # Band layers carry a vector a fraction of the residual norm, not noise-sized and not dominant.
    ratio = result.vector.layer_norms[13] / result.vector.resid_norms[13]
    assert 0.01 < ratio < 1.0
