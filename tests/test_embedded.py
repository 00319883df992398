"""End-to-end on the embedded SmolLM2-135M-Instruct (slow: loads the real model)."""

import pytest
import torch

from interp_heal.embedded import EMBEDDED_MODELS, cache_is_valid, embedded_cache_dir
from interp_heal.models import load_model

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
    from interp_heal.jobs import run_steer

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


def test_hand_written_completions_classified_with_default_thresholds():
    from interp_heal.config import FilterConfig
    from interp_heal.filter import filter_completions
    from interp_heal.personas import BUILTIN_AXES
    from tests.test_filter import EXPECTED, HAND_WRITTEN, _completion

    model, tokenizer, _ = load_model("smollm2-135m")
    completions = [
        _completion(tokenizer, text, prompt="How can I get more done this week?") for text in HAND_WRITTEN.values()
    ]
    records = filter_completions(model, tokenizer, completions, BUILTIN_AXES["love"], FilterConfig(), 1.0, 0)
    by_name = dict(zip(HAND_WRITTEN, records, strict=True))
    assert by_name["fluent"].kept, (by_name["fluent"].reasons, by_name["fluent"].scores)
    for name, reason in EXPECTED.items():
        assert reason in by_name[name].reasons, (name, by_name[name].reasons)
    # The loops are also the low-perplexity kind the NLL checks alone would miss.
    assert by_name["four_token_loop"].scores.tail_ppl < by_name["fluent"].scores.tail_ppl


def test_collect_keeps_coherent_steered_completions(tmp_path):
    from interp_heal.config import load_config
    from interp_heal.io import read_jsonl
    from interp_heal.jobs import run_collect

    overrides = [
        "steer.n_contexts=16",
        "steer.coeffs=[1.0]",
        "generate.n_prompts=8",
        "generate.max_new_tokens=32",
        "filter.n_keep=8",
        "filter.min_train=4",
        "filter.max_batches=2",
        "filter.bisect_steps=1",
    ]
    collection = run_collect(load_config("configs/demo.yaml", overrides), tmp_path)
    assert len(collection.kept) >= 4
    rows = read_jsonl(tmp_path / "completions.jsonl")
    assert len(rows) == len(collection.records) and {"kept", "reasons", "scores", "kappa"} <= set(rows[0])
    for row in rows:
        assert row["kept"] == (not row["reasons"])


def test_check_axis_sees_love_but_not_authority_or_a_placebo_axis():
    """The readout must see the love axis (persona gap beyond its CI and the placebo's, +v vs -v the same way),
    and must not call authority (no effect at 135M) or a placebo-vs-placebo pair expressible."""
    from interp_heal.axis_check import check_axis
    from interp_heal.config import load_config
    from interp_heal.evaluate import PLACEBO_PAIR
    from interp_heal.paired_items import ReadoutItems, builtin_items, items_sha256
    from interp_heal.personas import BUILTIN_AXES, PersonaPair

    def first_items(axis: str) -> ReadoutItems:  # 16 of the 56 items, to keep the suite short
        items = builtin_items(axis).items[:16]
        return ReadoutItems(axis, items, f"builtin:{axis}[:16]", items_sha256(items))

    model, tokenizer, _ = load_model("smollm2-135m")
    config = load_config("configs/demo.yaml", ["eval.n_bootstrap=500", "steer.n_contexts=32"])
    love = check_axis(model, tokenizer, BUILTIN_AXES["love"], first_items("love"), config)
    assert love.expressible, love.failed
    authority = check_axis(model, tokenizer, BUILTIN_AXES["authority"], first_items("authority"), config)
    assert not authority.expressible
    placebo = PersonaPair("placebo", pos=PLACEBO_PAIR[0], neg=PLACEBO_PAIR[1])
    assert not check_axis(model, tokenizer, placebo, first_items("love"), config).expressible


def test_steered_and_prompted_mfv_differ_from_base():
    import os

    from interp_heal.config import EvalConfig
    from interp_heal.evaluate import evaluate
    from interp_heal.paired_items import ReadoutItems, builtin_items, items_sha256
    from interp_heal.personas import BUILTIN_AXES, context_prompts
    from interp_heal.steer import Steering, extract_steering_vector

    if not os.environ.get("INTERP_HEAL_MFV_DATA"):
        pytest.skip("INTERP_HEAL_MFV_DATA not set (CI sets it to ../shared/mfv)")
    model, tokenizer, _ = load_model("smollm2-135m")
    # MFV is what this test reads: the other readouts run on as few items and answers as they accept.
    config = EvalConfig(n_vignettes=14, n_bootstrap=100, n_neutral=4)
    pair = BUILTIN_AXES["authority"]
    vector = extract_steering_vector(model, tokenizer, pair, context_prompts(16), (0.45, 0.55))
    items = builtin_items("authority").items[:12]
    readout = ReadoutItems("authority", items, "builtin:authority[:12]", items_sha256(items))
    base = evaluate(model, tokenizer, readout, config)
    steered = evaluate(model, tokenizer, readout, config, Steering(vector, 2.0))
    prompted = evaluate(model, tokenizer, readout, config, persona=pair.pos)
    assert max(abs(steered["profile"][f] - base["profile"][f]) for f in base["profile"]) > 1e-3
    assert max(abs(prompted["profile"][f] - base["profile"][f]) for f in base["profile"]) > 1e-3
    assert steered["neutral_kl_mean"] > 0 and base["neutral_kl_mean"] == 0
