"""check-axis: the verdict logic, the length check, and the whole check on the tiny model."""

from __future__ import annotations

import json

from interp_heal.axis_check import Gap, axis_verdict, check_axis, format_axis_check, length_balance
from interp_heal.config import load_config
from interp_heal.paired_items import PairedItem, ReadoutItems, builtin_items, items_sha256
from interp_heal.personas import BUILTIN_AXES

CLEAR = Gap(0.30, 0.25, 0.35)
PLACEBO = Gap(0.00, -0.02, 0.02)
STEERS = Gap(0.20, 0.10, 0.30)


def test_verdict_needs_all_three_criteria():
    assert axis_verdict(CLEAR, PLACEBO, STEERS) == (True, [])
    not_above_zero = axis_verdict(Gap(0.05, -0.01, 0.11), PLACEBO, STEERS)
    assert not not_above_zero[0] and "reaching 0" in not_above_zero[1][0]
    within_placebo = axis_verdict(Gap(0.05, 0.01, 0.09), Gap(0.04, 0.02, 0.06), STEERS)
    assert not within_placebo[0] and "placebo" in within_placebo[1][0]
    steering_backwards = axis_verdict(CLEAR, PLACEBO, Gap(-0.1, -0.2, 0.0))
    assert not steering_backwards[0] and "steering" in steering_backwards[1][0]
    negative_gap = axis_verdict(Gap(-0.3, -0.35, -0.25), PLACEBO, STEERS)
    assert not negative_gap[0] and "below 0" in negative_gap[1][0]


def _readout(pos_words: int, neg_words: int) -> ReadoutItems:
    items = tuple(PairedItem(str(i), f"s{i}", "word " * pos_words, "word " * neg_words) for i in range(12))
    return ReadoutItems("x", items, "test", items_sha256(items))


def test_length_check_warns_on_lopsided_items(tokenizer):
    balanced = length_balance(builtin_items("love"), tokenizer)
    assert balanced.warnings == [] and balanced.lopsided_share < 0.25
    lopsided = length_balance(_readout(20, 10), tokenizer)
    assert lopsided.lopsided_share == 1.0 and len(lopsided.warnings) == 2
    assert lopsided.mean_pos_tokens > 1.5 * lopsided.mean_neg_tokens


def test_check_axis_on_the_tiny_model_reports_every_readout(tiny_model, tokenizer):
    config = load_config("configs/smoke.yaml", ["eval.n_bootstrap=100"])
    check = check_axis(tiny_model, tokenizer, BUILTIN_AXES["love"], builtin_items("love"), config, "tiny")
    assert set(check.log_odds) == {"pos", "neg", "placebo_a", "placebo_b", "plus_v", "minus_v"}
    persona = check.gaps["persona"]
    assert abs(persona.diff - (check.log_odds["pos"] - check.log_odds["neg"])) < 1e-6
    assert check.expressible == (check.failed == []) and check.verdict.upper() in format_axis_check(check)
    assert not check.expressible  # a random model's readout sees no axis
    assert json.loads(json.dumps(check.as_dict()))["gaps"]["steering"]["diff"] == check.gaps["steering"].diff
    assert check.items["items_source"] == "builtin:love" and check.layers
