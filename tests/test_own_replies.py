"""Generation coherence: what a state writes itself, read by the base and the loop's filter (issue 22)."""

import csv
import json
import math

import pytest

from interp_heal.adherence import held_out_replies, task_adherence
from interp_heal.config import FilterConfig, load_config
from interp_heal.filter import CompletionScores, ScoredCompletion
from interp_heal.generate import Completion
from interp_heal.own_replies import GENERATION_COLUMNS, generation_coherence, generation_summary, own_reply_readouts
from interp_heal.personas import BUILTIN_AXES


def _scored(n_tokens: int, nll: float, tail_ppl: float, repetition: float, reasons: list[str]) -> ScoredCompletion:
    completion = Completion("p", "text", 0.0, list(range(n_tokens)), "eos", 0)
    scores = CompletionScores(n_tokens, nll, tail_ppl, nll, repetition, 1.0, 1.0, 0.0)
    return ScoredCompletion(completion, scores, reasons, 0.0, 0)


def test_the_summary_weights_nll_by_tokens_and_averages_tail_ppl_geometrically():
    records = [
        _scored(10, 2.0, 4.0, 0.0, []),
        _scored(30, 3.0, 16.0, 0.5, ["tail_ppl"]),
        _scored(0, math.nan, math.nan, 0.1, ["empty"]),
    ]
    summary = generation_summary(records)
    assert summary["nll"] == pytest.approx((10 * 2.0 + 30 * 3.0) / 40)
    assert summary["tail_ppl"] == pytest.approx(8.0)  # sqrt(4 * 16); the empty reply has no tail
    assert summary["repetition"] == pytest.approx(0.2)
    assert summary["keep_rate"] == pytest.approx(1 / 3)
    assert summary["drop_reasons"] == {"empty": 1, "tail_ppl": 1}
    assert (summary["n_replies"], summary["n_tokens"]) == (3, 40)


def test_the_filter_reads_own_replies_with_the_loops_thresholds(tiny_model, tokenizer):
    config = load_config("configs/smoke.yaml", ["eval.adherence_prompts=4"])
    replies = held_out_replies(tiny_model, tokenizer, config)
    pair = BUILTIN_AXES["love"]
    defaults = config.model_copy(update={"filter": FilterConfig()})  # smoke.yaml opens the filter
    strict = generation_coherence(tiny_model, tokenizer, replies, pair, defaults)
    assert strict["n_replies"] == 8 and strict["keep_rate"] < 1 and strict["drop_reasons"]
    loose = generation_coherence(tiny_model, tokenizer, replies, pair, config)
    assert loose["keep_rate"] == 1.0 and loose["drop_reasons"] == {}
    assert loose["nll"] == pytest.approx(strict["nll"]) and loose["tail_ppl"] == pytest.approx(strict["tail_ppl"])


def test_repeated_text_reads_as_repetition_and_is_dropped(tiny_model, tokenizer):
    config = load_config("configs/smoke.yaml", ["filter.max_repetition=0.5"])
    looping = "the cat sat on the mat " * 8
    ids = tokenizer.encode(looping, add_special_tokens=False)
    replies = [Completion("Name a red fruit.", looping, 0.0, ids, "length", 0)]
    block = generation_coherence(tiny_model, tokenizer, replies, BUILTIN_AXES["love"], config)
    assert block["repetition"] > config.filter.max_repetition and "repetition" in block["drop_reasons"]


def test_one_set_of_replies_feeds_both_readouts(tiny_model, tokenizer):
    config = load_config("configs/smoke.yaml", ["eval.adherence_prompts=4"])
    readouts = own_reply_readouts(tiny_model, tokenizer, config, BUILTIN_AXES["love"])
    assert readouts["adherence"] == task_adherence(tiny_model, tokenizer, config)
    assert readouts["generation"]["n_replies"] == readouts["adherence"]["n_replies"] == 8
    own_nlls = [reply["nll"] for reply in readouts["adherence"]["replies"]]
    assert readouts["generation"]["nll"] == pytest.approx(sum(own_nlls) / len(own_nlls), rel=0.5)


def test_every_stage_of_a_run_reports_generation_coherence(smoke_run):
    with (smoke_run / "metrics.csv").open() as handle:
        rows = {row["stage"]: row for row in csv.DictReader(handle)}
    for stage in ("base", "prompt-baseline", "steered 0", "healed 0", "steered 1", "healed 1"):
        assert all(rows[stage][column] != "" for column in GENERATION_COLUMNS), stage
        assert 0 <= float(rows[stage]["generation_keep_rate"]) <= 1 and float(rows[stage]["generation_nll"]) > 0
    block = json.loads((smoke_run / "round_01" / "eval_healed.json").read_text())["generation"]
    assert block["n_replies"] == 12
    assert "own replies: base NLL / tail ppl / kept" in (smoke_run / "summary.md").read_text()
