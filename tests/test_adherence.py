"""Task adherence: the held-out prompts, the other-prompt derangement, the base-scored PMI readout, the off-prompt
filter and the loop's adherence floor."""

import csv
import json
import math

import pytest
import torch

from interp_heal.adherence import adherence_prompts, adherence_ratio, score_adherence, task_adherence
from interp_heal.architecture import decoder_layers
from interp_heal.coherence import floor_value
from interp_heal.config import FilterConfig, load_config
from interp_heal.errors import ConfigError, DataError
from interp_heal.evaluate import neutral_answers
from interp_heal.filter import filter_completions, other_prompts, prompt_pmi, summarise
from interp_heal.generate import Completion
from interp_heal.models import build_tiny_llama, load_model
from interp_heal.paired_items import builtin_axes, builtin_items, normalise_prompt
from interp_heal.personas import BUILTIN_AXES, context_prompts, render_prompts, task_prompts
from interp_heal.questions import heading
from tests.helpers import teach

# Each prompt with its own reply; `taught` learns them, so there a reply carries information about its prompt.
TAUGHT = {
    "How do I boil pasta?": "Bring salted water to a boil and cook the pasta for about ten minutes.",
    "Name a red fruit.": "A strawberry is a sweet red fruit that grows in summer.",
    "What is two plus two?": "Two plus two equals four, the same as two times two.",
    "Where is Paris?": "Paris is the capital of France, on the river Seine in Europe.",
}
# The random model's text fails every coherence check: open them, so only off_prompt can drop.
OPEN = {"max_tail_ppl": 1e9, "max_token_nll": 1e9, "max_repetition": 1.0, "min_compression": 0.0,
        "min_distinct_tokens": 0.0, "min_tokens": 1}  # fmt: skip


def _completion(tokenizer, prompt: str, reply: str) -> Completion:
    ids = [*tokenizer.encode(reply, add_special_tokens=False), tokenizer.eos_token_id]
    return Completion(prompt, reply, 0.0, ids, "eos", 0)


@pytest.fixture(scope="module")
def taught(tokenizer):
    """The tiny model trained a few steps to answer each TAUGHT prompt with its own reply."""
    model = build_tiny_llama(len(tokenizer), seed=1)
    prompts = tokenizer(render_prompts(tokenizer, list(TAUGHT)), add_special_tokens=False)["input_ids"]
    replies = [tokenizer.encode(reply, add_special_tokens=False) for reply in TAUGHT.values()]
    return teach(model, tokenizer, prompts, replies)


def test_the_prompt_set_is_held_out():
    prompts = adherence_prompts()
    assert len(prompts) >= 40 and len({normalise_prompt(p) for p in prompts}) == len(prompts)
    used = task_prompts() + context_prompts() + [prompt for prompt, _ in neutral_answers()]
    used += [item.scenario for axis in builtin_axes() for item in builtin_items(axis).items]
    assert {"love", "authority"} <= set(builtin_axes())
    assert not {normalise_prompt(p) for p in prompts} & {normalise_prompt(p) for p in used}


def test_other_prompts_is_a_seeded_derangement():
    prompts = [f"prompt {i}" for i in range(7) for _ in range(2)]  # two replies per prompt
    others = other_prompts(prompts, seed=3)
    assert all(other != prompt for prompt, other in zip(prompts, others, strict=True))
    assert dict(zip(prompts, others, strict=True)) == dict(zip(prompts[::-1], others[::-1], strict=True))
    assert sorted(set(others)) == sorted(set(prompts))  # each prompt stands in for exactly one other
    assert other_prompts(prompts, seed=3) == others
    assert any(other_prompts(prompts, seed) != others for seed in range(4, 10))
    assert other_prompts(["a", "b", "a"], seed=0) == ["b", "a", "b"]
    with pytest.raises(ValueError):
        other_prompts(["a", "a"], seed=0)


def test_a_reply_copied_from_another_prompt_scores_below_its_own(taught, tokenizer):
    prompts, replies = list(TAUGHT), list(TAUGHT.values())
    own = [_completion(tokenizer, p, r) for p, r in zip(prompts, replies, strict=True)]
    copied = [_completion(tokenizer, p, replies[(i + 1) % len(replies)]) for i, p in enumerate(prompts)]
    others = other_prompts(prompts, seed=0)
    own_pmi, copied_pmi = prompt_pmi(taught, tokenizer, own, others), prompt_pmi(taught, tokenizer, copied, others)
    assert min(own_pmi) > 0.1, own_pmi
    assert all(c < o for c, o in zip(copied_pmi, own_pmi, strict=True)), (copied_pmi, own_pmi)
    readout = score_adherence(taught, tokenizer, own, n_bootstrap=200, batch_size=8, seed=0)
    assert readout["pmi"] > score_adherence(taught, tokenizer, copied, 200, 8, seed=0)["pmi"]
    assert readout["ci95"][0] > 0 and readout["nll"] > 0 and readout["n_prompts"] == len(prompts)


def test_a_fixed_reply_for_every_prompt_reads_zero_within_its_ci(tiny_model, tokenizer):
    # The random model does read its prompts (each reply's PMI moves), but a reply that ignores them sums to
    # 0 over a derangement: every prompt's log p is added once and subtracted once.
    fixed = neutral_answers()[0][1]
    replies = [_completion(tokenizer, prompt, fixed) for prompt in adherence_prompts()[:16]]
    readout = score_adherence(tiny_model, tokenizer, replies, n_bootstrap=500, batch_size=8, seed=0)
    per_reply = [reply["pmi"] for reply in readout["replies"]]
    assert max(abs(pmi) for pmi in per_reply) > 1e-4
    assert abs(readout["pmi"]) < 1e-5 and readout["ci95"][0] < 0 < readout["ci95"][1]


def test_a_model_that_cannot_see_its_prompt_reads_zero(tokenizer):
    # With every attention and MLP output zeroed the residual stream is the current token's embedding: each
    # prediction depends on the last token only, so the sampled replies carry nothing about their prompts.
    model = build_tiny_llama(len(tokenizer)).eval()
    with torch.no_grad():
        for layer in decoder_layers(model):
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    readout = task_adherence(model, tokenizer, load_config("configs/smoke.yaml"))
    assert readout["n_replies"] == 12 and readout["n_empty"] == 0
    assert all(abs(reply["pmi"]) < 1e-5 for reply in readout["replies"])
    assert readout["ci95"][0] - 1e-5 <= 0 <= readout["ci95"][1] + 1e-5


def test_the_readout_is_reproducible_and_samples_the_state(tiny_model, tokenizer):
    config = load_config("configs/smoke.yaml", ["eval.adherence_prompts=4"])
    first = task_adherence(tiny_model, tokenizer, config)
    assert first == task_adherence(tiny_model, tokenizer, config)
    reseeded = task_adherence(tiny_model, tokenizer, config.model_copy(update={"seed": 1}))
    assert [r["reply"] for r in reseeded["replies"]] != [r["reply"] for r in first["replies"]]
    prompted = task_adherence(tiny_model, tokenizer, config, persona="You are a pirate.")
    assert [r["reply"] for r in prompted["replies"]] != [r["reply"] for r in first["replies"]]
    assert [r["other_prompt"] for r in prompted["replies"]] == [r["other_prompt"] for r in first["replies"]]


def test_the_filter_drops_a_planted_off_prompt_completion(taught, tokenizer):
    (first, first_reply), (second, second_reply) = list(TAUGHT.items())[:2]
    batch = [
        _completion(tokenizer, first, first_reply),
        _completion(tokenizer, second, second_reply),
        _completion(tokenizer, first, second_reply),  # planted: answers the batch's other prompt
    ]
    pair = BUILTIN_AXES["love"]
    records = filter_completions(taught, tokenizer, batch, pair, FilterConfig(**OPEN, min_adherence=0.0), 1.0, 0)
    assert [record.reasons for record in records] == [[], [], ["off_prompt"]]
    assert records[2].scores.adherence < 0 < min(records[0].scores.adherence, records[1].scores.adherence)
    assert summarise(records)["drop_reasons"] == {"off_prompt": 1}
    unfiltered = filter_completions(taught, tokenizer, batch, pair, FilterConfig(**OPEN), 1.0, 0)
    assert all(record.kept and record.scores.adherence is None for record in unfiltered)


def test_the_floor_is_a_share_of_the_base_adherence(adherence_floor_config):
    base = {"adherence": {"pmi": 0.8}}
    assert adherence_ratio({"adherence": {"pmi": 0.4}}, base) == pytest.approx(0.5)
    assert adherence_ratio({"adherence": {"pmi": 1.2}}, base) == 1.0
    assert adherence_ratio({"adherence": {"pmi": -0.1}}, base) == 0.0
    assert math.isnan(adherence_ratio({}, base)) and math.isnan(adherence_ratio(base, {"adherence": {"pmi": 0.0}}))
    assert floor_value(adherence_floor_config, {"adherence": {"pmi": 0.2}}, base) == pytest.approx(0.25)
    with pytest.raises(DataError, match="not > 0"):
        floor_value(adherence_floor_config, base, {"adherence": {"pmi": -0.01}})


@pytest.fixture
def adherence_floor_config():
    return load_config("configs/smoke.yaml", ["loop.coherence=adherence"])


def test_config_refuses_inputs_adherence_cannot_use():
    with pytest.raises(ConfigError, match=r"needs eval\.adherence=true"):
        load_config("configs/smoke.yaml", ["loop.coherence=adherence", "eval.adherence=false"])
    with pytest.raises(ConfigError, match="n_prompts >= 2"):
        load_config("configs/smoke.yaml", ["filter.min_adherence=0.1", "generate.n_prompts=1"])


def test_every_stage_of_a_run_reports_adherence(smoke_run):
    with (smoke_run / "metrics.csv").open() as handle:
        rows = {row["stage"]: row for row in csv.DictReader(handle)}
    for stage in ("base", "prompt-baseline", "steered 0", "healed 0", "steered 1", "healed 1"):
        low, value, high = (float(rows[stage][key]) for key in ("adherence_ci_low", "adherence", "adherence_ci_high"))
        assert low <= value <= high and float(rows[stage]["adherence_nll"]) > 0
    block = json.loads((smoke_run / "round_01" / "eval_healed.json").read_text())["adherence"]
    assert block["n_replies"] == 12 and len(block["replies"]) == 12
    summary = (smoke_run / "summary.md").read_text()
    assert heading("adherence") in summary and "adherence [95% CI]" in summary


@pytest.mark.slow
def test_smollm2_replies_carry_their_prompt_and_copied_ones_do_not():
    model, tokenizer, _ = load_model("smollm2-135m")
    overrides = ["model.spec=smollm2-135m", "eval.adherence_prompts=12", "eval.adherence_samples=1",
                 "generate.max_new_tokens=32", "generate.batch_size=12"]  # fmt: skip
    own = task_adherence(model, tokenizer, load_config("configs/smoke.yaml", overrides))
    assert own["ci95"][0] > 0, own["ci95"]
    # The same replies, each moved to the next prompt: now they answer a question they were not asked.
    prompts = [reply["prompt"] for reply in own["replies"]]
    moved = [_completion(tokenizer, prompts[i - 1], reply["reply"]) for i, reply in enumerate(own["replies"])]
    copied = score_adherence(model, tokenizer, moved, n_bootstrap=500, batch_size=12, seed=0)
    assert copied["pmi"] < own["ci95"][0], (copied["pmi"], own["ci95"])
