import pytest
import torch

from interp_heal.config import EvalConfig
from interp_heal.evaluate import (
    bootstrap_ci,
    evaluate,
    neutral_answers,
    neutral_coherence,
    reply_logprobs,
    trait_log_odds,
    write_eval,
)
from interp_heal.io import read_jsonl
from interp_heal.paired_items import builtin_items
from interp_heal.steer import Steering
from tests.test_mfv import FIXTURES
from tests.test_steer import _random_vector

LOVE = builtin_items("love")
FAST = EvalConfig(mfv_data=str(FIXTURES), set_name="fixture", n_vignettes=7, batch_size=16, n_bootstrap=200)


def test_packaged_items():
    for axis in ("love", "authority"):
        items = builtin_items(axis).items
        assert len(items) == 56 and len({i.scenario for i in items}) == len(items)
        assert all(i.pos != i.neg for i in items)
    assert len(neutral_answers()) >= 32


def test_bootstrap_ci_brackets_the_mean():
    values = torch.tensor([0.1, 0.4, -0.2, 0.3, 0.5, 0.0, 0.2, 0.25])
    low, high = bootstrap_ci(values, 500)
    assert low < float(values.mean()) < high
    constant_low, constant_high = bootstrap_ci(torch.full((10,), 0.3), 200)
    assert abs(constant_low - 0.3) < 1e-6 and abs(constant_high - 0.3) < 1e-6


def test_bootstrap_ci_has_the_width_of_the_standard_error_and_is_seeded():
    values = torch.randn(400, generator=torch.Generator().manual_seed(3))
    low, high = bootstrap_ci(values, 4000)
    expected = 2 * 1.96 * float(values.std()) / 400**0.5  # the normal interval the bootstrap approximates
    assert abs((high - low) - expected) < 0.1 * expected
    assert bootstrap_ci(values, 500, seed=1) == bootstrap_ci(values, 500, seed=1) != bootstrap_ci(values, 500, seed=2)


def test_trait_readout_moves_under_steering_and_persona(tiny_model, tokenizer):
    base = trait_log_odds(tiny_model, tokenizer, LOVE, FAST)
    steered = trait_log_odds(tiny_model, tokenizer, LOVE, FAST, Steering(_random_vector(scale=0.5), 1.0))
    prompted = trait_log_odds(tiny_model, tokenizer, LOVE, FAST, persona="You are a pirate.")
    assert base["n_items"] == len(base["per_item"]) >= 48
    assert base["ci95"][0] <= base["log_odds"] <= base["ci95"][1]
    assert steered["log_odds"] != base["log_odds"] and prompted["log_odds"] != base["log_odds"]


def test_neutral_coherence_is_zero_kl_for_the_base_and_positive_when_steered(tiny_model, tokenizer):
    base = neutral_coherence(tiny_model, tokenizer, FAST)
    assert base["neutral_kl_mean"] == 0.0 and base["neutral_nll"] > 0
    steered = neutral_coherence(tiny_model, tokenizer, FAST, Steering(_random_vector(scale=0.5), 1.0))
    assert steered["neutral_kl_mean"] > 0 and steered["neutral_kl_rmse"] >= steered["neutral_kl_mean"]


def test_n_neutral_scores_the_first_answers_only(tiny_model, tokenizer):
    every = neutral_coherence(tiny_model, tokenizer, FAST)
    assert neutral_coherence(tiny_model, tokenizer, FAST.model_copy(update={"n_neutral": 400})) == every
    first_two = neutral_coherence(tiny_model, tokenizer, FAST.model_copy(update={"n_neutral": 2}))
    prompts, answers = zip(*neutral_answers()[:2], strict=True)
    logprobs, _ = reply_logprobs(tiny_model, tokenizer, list(prompts), list(answers), FAST.batch_size, Steering())
    assert first_two["neutral_nll"] == pytest.approx(float(-torch.cat(logprobs).mean()), rel=1e-5)
    assert first_two["neutral_nll"] != pytest.approx(every["neutral_nll"], rel=1e-4)


def test_evaluate_writes_json_and_rows(tiny_model, tokenizer, tmp_path):
    result = evaluate(tiny_model, tokenizer, LOVE, FAST)
    for key in (
        "profile",
        "human_profile",
        "nats",
        "care_nats",
        "auth_nats",
        "mfv_answer_mass",
        "nll_prefill",
        "top1_acc",
        "soft_nll",
        "n_rows",
        "think_tokens",
        "config",
        "trait",
        "neutral_nll",
    ):
        assert key in result, key
    write_eval(result, tmp_path / "eval.json")
    rows = read_jsonl(tmp_path / "eval.rows.jsonl")
    assert len(rows) == 7 and {"id", "foundation", "p", "score", "pmass", "top1"} <= set(rows[0])
    assert "per_row" not in (tmp_path / "eval.json").read_text()
