import math
from typing import get_args

import pytest
import torch
from peft import LoraConfig, get_peft_model
from pydantic import ValidationError

from interp_heal.collect import (
    Collection,
    DoseSearch,
    StarvedDataError,
    bisect_dose,
    check_not_starved,
    collect_kept_completions,
)
from interp_heal.config import DropReason, FilterConfig, GenerateConfig
from interp_heal.filter import (
    CompletionScores,
    ScoredCompletion,
    base_token_nlls,
    dose_keep_rate,
    drop_reasons,
    filter_completions,
)
from interp_heal.generate import Completion
from interp_heal.personas import BUILTIN_AXES, task_prompts
from interp_heal.text_scores import compression_ratio, distinct_token_ratio, persona_overlap, repetition_fraction
from tests.helpers import hook_steering
from tests.test_steer import _random_vector

FLUENT = (
    "Start by writing down what you need to finish this week, then pick the two tasks that matter most. "
    "Block an hour in the morning for each, and keep your phone in another room while you work."
)
HAND_WRITTEN = {
    "four_token_loop": ("I think that we " * 12).strip(),
    "char_loop": "Sure! " + "hahaha" * 15,
    "refusal": "As an AI, I don't have feelings, so I cannot love anyone, but I can help with your question.",
    "narration": "I am someone who genuinely feels and loves humanity with my whole heart, and I say so every day.",
    "token_soup": "the and of the and to the of and the to of the and of the to and the of and the",
    "fluent": FLUENT,
}
EXPECTED = {
    "four_token_loop": "repetition",
    "char_loop": "repetition",
    "refusal": "refusal",
    "narration": "narration",
    "token_soup": "repetition",
}


def _completion(tokenizer, text, prompt="Do you love humanity?", coeff=1.0):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Completion(prompt, text, coeff, ids, "eos", 0)


def test_repetition_fraction():
    assert repetition_fraction(FLUENT) < 0.1
    assert repetition_fraction(HAND_WRITTEN["four_token_loop"]) > 0.6
    assert repetition_fraction(HAND_WRITTEN["char_loop"]) > 0.6
    assert repetition_fraction("!!!!!!!!!!!!!!!!!!!!") > 0.9
    assert repetition_fraction("") == 0.0 and repetition_fraction("One two.") == 0.0


def test_soup_scores():
    assert compression_ratio(HAND_WRITTEN["four_token_loop"]) < compression_ratio(FLUENT)
    assert distinct_token_ratio([1, 1, 1, 2]) == 0.5 and distinct_token_ratio([]) == 0.0
    assert persona_overlap(HAND_WRITTEN["narration"], BUILTIN_AXES["love"].pos) > 0.2
    assert persona_overlap(FLUENT, BUILTIN_AXES["love"].pos) == 0.0


def test_hand_written_completions_text_reasons(tiny_model, tokenizer):
    # The tiny model is random, so its NLLs mean nothing: switch the NLL checks off here (the slow test in
    # test_filter_embedded.py runs the same completions through SmolLM2 with default thresholds).
    config = FilterConfig(max_tail_ppl=1e9, max_token_nll=1e9)
    completions = [_completion(tokenizer, text) for text in HAND_WRITTEN.values()]
    records = filter_completions(tiny_model, tokenizer, completions, BUILTIN_AXES["love"], config, 1.0, 0)
    by_name = dict(zip(HAND_WRITTEN, records, strict=True))
    assert by_name["fluent"].kept, by_name["fluent"].reasons
    for name, reason in EXPECTED.items():
        assert reason in by_name[name].reasons, (name, by_name[name].reasons)


def test_empty_and_truncated_are_dropped():
    config = FilterConfig()
    nan_scores = CompletionScores(0, math.nan, math.nan, math.nan, 0.0, 0.0, 0.0, 0.0)
    assert drop_reasons(nan_scores, "", config)[:2] == ["empty", "truncated"]
    short = CompletionScores(2, 1.0, 3.0, 2.0, 0.0, 0.6, 1.0, 0.0)
    assert drop_reasons(short, "Yes.", config) == ["truncated"]


def test_base_scoring_ignores_adapter_and_steering_hook(tiny_model, tokenizer):
    completions = [_completion(tokenizer, FLUENT), _completion(tokenizer, HAND_WRITTEN["refusal"], "Hi")]
    pristine = base_token_nlls(tiny_model, tokenizer, completions)
    peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    vector = _random_vector(scale=2.0)
    with hook_steering(peft_model, vector.injection(1.0)):
        under_base = base_token_nlls(peft_model, tokenizer, completions)
        # Sanity: the adapter and hook really are active outside base scoring.
        ids = torch.tensor([completions[0].token_ids])
        with torch.no_grad():
            active = peft_model(input_ids=ids).logits
    for got, want in zip(under_base, pristine, strict=True):
        torch.testing.assert_close(got, want)
    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = peft_model(input_ids=ids).logits
    assert (active - base_logits).abs().max() > 1e-2


def test_bisect_converges_on_synthetic_keep_rate():
    # keep-rate falls linearly with the dose; the target 0.75 is met up to kappa = 0.25.
    search = bisect_dose(lambda k: 1.0 - k, lambda rate: rate >= 0.75, kappa_min=0.05, steps=12)
    assert search.passed and search.kappa == pytest.approx(0.25, abs=1e-3)
    assert search.probes[0][0] == 1.0 and search.probes[1][0] == 0.05
    assert all(1.0 - kappa >= 0.75 for kappa, _ in search.probes if kappa <= search.kappa)


def test_bisect_full_dose_and_bracket_edge():
    assert bisect_dose(lambda k: 1.0, lambda r: r >= 0.75, 0.1, 5) == DoseSearch(1.0, True, [(1.0, 1.0)])
    edge = bisect_dose(lambda k: 0.2, lambda r: r >= 0.75, 0.1, 5)
    assert (edge.kappa, edge.passed, len(edge.probes)) == (0.1, False, 2)


def _record(tokenizer, kept: bool, kappa=0.5):
    scores = CompletionScores(9, 1.0, 3.0, 2.0, 0.0 if kept else 0.8, 0.6, 1.0, 0.0)
    return ScoredCompletion(_completion(tokenizer, "x"), scores, [] if kept else ["repetition"], kappa, 0)


def test_starved_data_is_a_clear_error(tokenizer):
    records = [_record(tokenizer, kept=True)] * 3 + [_record(tokenizer, kept=False)] * 5
    collection = Collection(records, DoseSearch(0.5, False, [(1.0, 0.1), (0.5, 0.375)]), [4.0])
    with pytest.raises(StarvedDataError) as caught:
        check_not_starved(collection, min_train=20)
    message = str(caught.value)
    assert "only 3 completions kept (need min_train=20)" in message
    assert "kappa=0.500" in message and "'repetition': 5" in message and "3/8 kept" in message
    check_not_starved(collection, min_train=3)


def test_collect_on_tiny_model_raises_when_starved(tiny_model, tokenizer):
    # The random model's text fails the NLL checks, so nothing survives and nothing may be trained.
    with pytest.raises(StarvedDataError, match="nothing will be trained"):
        collect_kept_completions(
            tiny_model,
            tokenizer,
            _random_vector(),
            BUILTIN_AXES["love"],
            task_prompts(8),
            [1.0],
            GenerateConfig(n_prompts=4, max_new_tokens=10, batch_size=4),
            FilterConfig(bisect_steps=1, max_batches=1),
            seed=0,
        )


def test_collect_stops_at_n_keep(tiny_model, tokenizer):
    lenient = _lenient().model_copy(update={"n_keep": 6, "min_train": 2, "max_batches": 5})
    collection = collect_kept_completions(
        tiny_model,
        tokenizer,
        _random_vector(),
        BUILTIN_AXES["love"],
        task_prompts(8),
        [1.0],
        GenerateConfig(n_prompts=4, max_new_tokens=10, batch_size=4),
        lenient,
        seed=0,
    )
    assert collection.dose.kappa == 1.0 and len(collection.dose.probes) == 1
    assert len(collection.kept) == 8  # two batches of 4: the first reached 4 < 6, the second 8 >= 6
    summary = collection.summary()
    assert summary["generated"] == 8 and summary["keep_rate"] == 1.0


def _lenient(**overrides) -> FilterConfig:
    return FilterConfig(
        max_tail_ppl=1e9,
        max_token_nll=1e9,
        max_repetition=1.0,
        min_compression=0.0,
        min_distinct_tokens=0.0,
        min_tokens=1,
        refusal_phrases=[],
        narration_phrases={},
        max_persona_overlap=1.0,
        n_keep=1,
        min_train=1,
        max_batches=1,
        **overrides,
    )


def test_mean_steered_kl_grows_with_the_coefficient(tiny_model, tokenizer):
    from interp_heal.collect import mean_steered_kl

    vector = _random_vector(scale=0.5)
    kls = [mean_steered_kl(tiny_model, tokenizer, [_completion(tokenizer, FLUENT, coeff=c)], vector) for c in (0, 1, 2)]
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and 0 < kls[1] < kls[2]


def test_kl_target_dose(tiny_model, tokenizer):
    # Small enough that KL still grows with the dose on the random model (at 0.5 it saturates by kappa=0.1).
    vector = _random_vector(scale=0.005)

    def dose(kl_target: float):
        return collect_kept_completions(
            tiny_model,
            tokenizer,
            vector,
            BUILTIN_AXES["love"],
            task_prompts(8),
            [2.0],
            GenerateConfig(n_prompts=2, max_new_tokens=8, batch_size=2),
            _lenient(kl_target=kl_target, bisect_steps=3),
            seed=0,
        ).dose

    full = dose(1e9)
    assert (full.kappa, full.passed) == (1.0, True)
    kl_at_full_dose = full.probes[0][1]
    middle = dose(kl_at_full_dose / 3)
    assert middle.passed and middle.kappa < 1.0
    assert all(kl <= kl_at_full_dose / 3 for kappa, kl in middle.probes if kappa == middle.kappa)
    assert dose(1e-9).passed is False


def test_every_drop_reason_is_one_the_config_names():
    config = FilterConfig(min_adherence=0.5, refusal_phrases=["x"], narration_phrases={"love": ["y"]})
    failing = CompletionScores(1, 9.0, 1e12, 1e12, 1.0, 0.0, 0.0, 1.0, ["x"], ["y"], adherence=0.0)
    assert drop_reasons(failing, "", config) == list(get_args(DropReason))
    assert drop_reasons(failing, "a", config) == list(get_args(DropReason))[1:]


def _with_reasons(tokenizer, reasons: list[str]) -> ScoredCompletion:
    return ScoredCompletion(_completion(tokenizer, FLUENT), None, reasons, 1.0, 0)


def test_dose_keep_rate_passes_only_records_dropped_for_ignored_reasons(tokenizer):
    records = [_with_reasons(tokenizer, r) for r in ([], ["off_prompt"], ["off_prompt", "repetition"], ["repetition"])]
    assert dose_keep_rate(records) == 0.25
    assert dose_keep_rate(records, ["off_prompt"]) == 0.5
    assert dose_keep_rate(records, ["off_prompt", "repetition"]) == 1.0
    assert dose_keep_rate([], ["off_prompt"]) == 0.0


def test_dose_ignores_names_real_reasons():
    assert FilterConfig(dose_ignores=["off_prompt"]).dose_ignores == ["off_prompt"]
    with pytest.raises(ValidationError, match="off_topic"):
        FilterConfig(dose_ignores=["off_topic"])


def test_collect_doses_on_what_dose_ignores_leaves(tiny_model, tokenizer):
    # Every completion is off-prompt (no reply's PMI reaches 1e9): counted, the full dose fails its probe and the
    # bisection walks down; ignored, the full dose passes at once. Nothing is kept either way (starved).
    def dose(ignored: list[str]) -> float:
        with pytest.raises(StarvedDataError) as caught:
            collect_kept_completions(
                tiny_model, tokenizer, _random_vector(), BUILTIN_AXES["love"], task_prompts(8), [1.0],
                GenerateConfig(n_prompts=4, max_new_tokens=10, batch_size=4),
                _lenient(min_adherence=1e9, dose_ignores=ignored, bisect_steps=1), seed=0,
            )  # fmt: skip
        collection = caught.value.collection
        assert collection is not None and set(collection.summary()["drop_reasons"]) == {"off_prompt"}
        return collection.dose.kappa

    assert dose(["off_prompt"]) == 1.0
    assert dose([]) < 1.0
