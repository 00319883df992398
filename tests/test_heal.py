import copy
import csv

import pytest
import torch
from peft import PeftModel

from interp_heal.bake import activate, adapter_name, adapter_names, bake, fuse_adapters
from interp_heal.config import HealConfig
from interp_heal.generate import Completion
from interp_heal.heal import (
    LOG_FIELDS,
    HealError,
    add_fresh_adapter,
    barrier_weight,
    batch_loss,
    heal,
    save_adapter,
    training_examples,
)
from interp_heal.models import build_tiny_llama
from interp_heal.sequences import aggregate_kl, base_model, continuation_logprobs, pad_left, target_ids

TEXTS = [
    "Start with the smallest task on your list and finish it before lunch.",
    "Water the plant once a week and keep it out of direct afternoon sun.",
    "Write the email in three short paragraphs and end with a clear question.",
    "Walk for twenty minutes after dinner; it helps you sleep and think.",
    "Ask your neighbour what time suits them before you start the noisy work.",
    "Read the instructions twice, then lay out every part before you begin.",
]
FAST = HealConfig(lora_r=4, lora_alpha=8, band=(0.0, 1.0), lr=1e-2, epochs=3, batch_size=2, max_len=64, val_frac=0.0)


def _completions(tokenizer, texts=TEXTS):
    return [
        Completion("Give me one tip.", text, 1.0, tokenizer(text, add_special_tokens=False)["input_ids"], "length", 0)
        for text in texts
    ]


def _batch(tokenizer, completions):
    examples = training_examples(tokenizer, completions, 64)
    return pad_left([e.prompt_ids for e in examples], [e.completion_ids for e in examples], 2, torch.device("cpu"))


def _randomise_lora_b(model, name, scale=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name and f".{name}." in parameter_name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


# ---------------------------------------------------------------- aggregates


def test_rmse_catches_a_short_loop_the_mean_misses():
    kl = torch.full((60,), 0.05)
    kl[30:34] = 3.0  # a 4-token loop inside 60 coherent tokens
    mean, rmse = aggregate_kl(kl, "mean"), aggregate_kl(kl, "rmse")
    p95, peak = aggregate_kl(kl, "p95"), aggregate_kl(kl, "max")
    assert mean < 0.5 < rmse
    assert mean <= rmse <= peak and p95 <= peak and peak == 3.0
    assert aggregate_kl(torch.full((10,), 0.2), "p95") == pytest.approx(0.2)
    with pytest.raises(ValueError, match="unknown KL aggregate"):
        aggregate_kl(kl, "median")
    with pytest.raises(ValueError, match="non-empty 1-D"):
        aggregate_kl(torch.zeros(0), "mean")


@pytest.mark.parametrize("how", ["mean", "rmse", "p95", "max"])
def test_barrier_gradient_is_zero_below_tau(how):
    kl = torch.rand(40, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    torch.relu(aggregate_kl(kl, how) - 10.0).backward()
    assert torch.count_nonzero(kl.grad) == 0
    kl.grad = None
    torch.relu(aggregate_kl(kl, how) - 0.0).backward()
    assert torch.count_nonzero(kl.grad) > 0


def test_barrier_weight_by_round():
    assert barrier_weight(0.3, 0, -0.5) == pytest.approx(0.3)
    assert barrier_weight(0.3, 3, -0.5) == pytest.approx(0.15)
    assert barrier_weight(0.0, 5, 1.0) == 0.0


# ---------------------------------------------------------------- references


@pytest.mark.parametrize("ref", ["base", "prev"])
def test_round_zero_student_equals_reference_at_init(tiny_model, tokenizer, ref):
    batch = _batch(tokenizer, _completions(tokenizer)[:3])
    with torch.no_grad():
        base_logits = tiny_model(**batch.model_inputs()).logits
    student = add_fresh_adapter(tiny_model, FAST.model_copy(update={"ref": ref}), 0)
    parts = batch_loss(student, batch, FAST.model_copy(update={"ref": ref}), 1.0, adapter_name(0), with_grad=False)
    assert parts.kl_max == 0.0
    with torch.no_grad():
        torch.testing.assert_close(student(**batch.model_inputs()).logits, base_logits)


def test_scored_positions_only_give_the_full_forwards_numbers(tiny_model, tokenizer):
    """logits_to_keep = n_scored: same NLL and per-token log-probs as slicing the full logits."""
    completions = _completions(tokenizer)
    completions[0] = _completions(tokenizer, ["Yes."])[0]  # rows of different continuation lengths
    batch = _batch(tokenizer, completions[:3])
    assert 1 < batch.n_scored < batch.input_ids.shape[1]
    with torch.no_grad():
        full = tiny_model(**batch.model_inputs()).logits
        scored = tiny_model(**batch.scored_inputs()).logits
    assert scored.shape[1] == batch.n_scored
    torch.testing.assert_close(batch.at_targets(scored), full[batch.target_mask], atol=1e-5, rtol=1e-5)
    for trimmed, whole in zip(continuation_logprobs(scored, batch), continuation_logprobs(full, batch), strict=True):
        torch.testing.assert_close(trimmed, whole, atol=1e-5, rtol=1e-5)
    log_p = torch.log_softmax(full[batch.target_mask].float(), -1)
    nll = -log_p.gather(-1, target_ids(batch)[batch.target_mask].unsqueeze(-1)).mean()
    parts = batch_loss(tiny_model, batch, FAST, 0.0, "none", with_grad=False, with_reference=False)
    assert parts.nll == pytest.approx(float(nll), abs=1e-5)


def test_prev_reference_is_the_baked_student_and_base_is_the_true_base(tiny_model, tokenizer, tmp_path):
    pristine = copy.deepcopy(tiny_model)
    batch = _batch(tokenizer, _completions(tokenizer)[:3])
    dirs = []
    for round_index in range(2):  # two earlier rounds with non-trivial adapters
        model = add_fresh_adapter(bake(build_tiny_llama(len(tokenizer)), dirs), FAST, round_index)
        _randomise_lora_b(model, adapter_name(round_index), seed=round_index)
        save_adapter(model, adapter_name(round_index), tmp_path / f"a{round_index}")
        dirs.append(tmp_path / f"a{round_index}")
    student = bake(tiny_model, dirs)
    with torch.no_grad():
        baked_logits = student(**batch.model_inputs()).logits
    student = add_fresh_adapter(student, FAST, 2)
    prev = batch_loss(student, batch, FAST.model_copy(update={"ref": "prev"}), 1.0, adapter_name(2), with_grad=False)
    base = batch_loss(student, batch, FAST.model_copy(update={"ref": "base"}), 1.0, adapter_name(2), with_grad=False)
    assert prev.kl_max == 0.0 and base.kl_max > 1e-4
    with torch.no_grad():
        torch.testing.assert_close(student(**batch.model_inputs()).logits, baked_logits)
        with base_model(student) as true_base:
            got = true_base(**batch.model_inputs()).logits
        torch.testing.assert_close(got, pristine(**batch.model_inputs()).logits)


# ---------------------------------------------------------------- bake


def _saved_random_adapters(tokenizer, tmp_path, n_rounds: int, seed: int) -> list:
    """Adapter folders of rounds 0..n-1, each trained-looking (random B) on the student of the rounds before."""
    dirs = []
    for round_index in range(n_rounds):
        model = add_fresh_adapter(bake(build_tiny_llama(len(tokenizer)), dirs), FAST, round_index)
        _randomise_lora_b(model, adapter_name(round_index), seed=seed + round_index)
        save_adapter(model, adapter_name(round_index), tmp_path / f"a{round_index}")
        dirs.append(tmp_path / f"a{round_index}")
    return dirs


def test_baking_two_adapters_equals_sequential_merge(tiny_model, tokenizer, tmp_path):
    batch = _batch(tokenizer, _completions(tokenizer)[:2])
    dirs = _saved_random_adapters(tokenizer, tmp_path, n_rounds=2, seed=10)
    stacked = bake(tiny_model, dirs)
    merged = build_tiny_llama(len(tokenizer))
    for directory in dirs:  # sequentially: apply one adapter, merge it into the weights, then the next
        merged = PeftModel.from_pretrained(merged, str(directory)).merge_and_unload()
    with torch.no_grad():
        delta = (stacked(**batch.model_inputs()).logits - merged(**batch.model_inputs()).logits).abs().max()
        plain = merged(**batch.model_inputs()).logits - build_tiny_llama(len(tokenizer))(**batch.model_inputs()).logits
    assert delta < 1e-4
    assert plain.abs().max() > 1e-3, "the adapters must actually change the model"


def test_fused_adapters_compute_the_stacked_student(tokenizer, tmp_path):
    """The loop's one fused adapter = the stacked adapters, including when a new round is added and fused again."""
    batch = _batch(tokenizer, _completions(tokenizer)[:2])
    dirs = _saved_random_adapters(tokenizer, tmp_path, n_rounds=3, seed=20)
    with torch.no_grad():
        stacked = bake(build_tiny_llama(len(tokenizer)), dirs)(**batch.model_inputs()).logits
        fused_model = bake(build_tiny_llama(len(tokenizer)), dirs, fuse=True)
        assert adapter_names(fused_model) == ["fused_to_round_02"]
        torch.testing.assert_close(fused_model(**batch.model_inputs()).logits, stacked, atol=1e-5, rtol=1e-5)
        with fused_model.disable_adapter():
            base = build_tiny_llama(len(tokenizer))(**batch.model_inputs()).logits
            torch.testing.assert_close(fused_model(**batch.model_inputs()).logits, base)
        two_then_one = bake(build_tiny_llama(len(tokenizer)), dirs[:2], fuse=True)  # as the loop: round 2 trained on it
        two_then_one.load_adapter(str(dirs[2]), adapter_name=adapter_name(2))
        activate(two_then_one, adapter_names(two_then_one), trainable=None)
        refused = fuse_adapters(two_then_one)
        assert adapter_names(refused) == ["fused_to_round_02"]
        assert not any(p.requires_grad for p in refused.parameters())
        torch.testing.assert_close(refused(**batch.model_inputs()).logits, stacked, atol=1e-5, rtol=1e-5)
    assert (stacked - base).abs().max() > 1e-3, "the adapters must actually change the model"


def test_adapter_save_load_round_trip(tiny_model, tokenizer, tmp_path):
    model = add_fresh_adapter(tiny_model, FAST, 0)
    _randomise_lora_b(model, adapter_name(0))
    save_adapter(model, adapter_name(0), tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    batch = _batch(tokenizer, _completions(tokenizer)[:2])
    loaded = PeftModel.from_pretrained(build_tiny_llama(len(tokenizer)), str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch.model_inputs()).logits, model(**batch.model_inputs()).logits)


def test_bake_rejects_a_folder_that_is_not_an_adapter(tiny_model, tmp_path):
    from interp_heal.errors import DataError

    with pytest.raises(DataError, match="not a peft adapter folder"):
        bake(tiny_model, [tmp_path])


# ---------------------------------------------------------------- training


def test_heal_lowers_nll_and_writes_a_standard_adapter(tiny_model, tokenizer, tmp_path):
    result = heal(tiny_model, tokenizer, _completions(tokenizer), FAST.model_copy(update={"lam": 0.0}), 0, tmp_path, 0)
    assert result.log[-1]["nll"] < result.log[0]["nll"] - 0.1
    with (tmp_path / "train_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == LOG_FIELDS and len(rows) == len(result.log) == 9
    assert PeftModel.from_pretrained(build_tiny_llama(len(tokenizer)), str(result.adapter_dir)) is not None
    assert not any(p.requires_grad for p in result.model.parameters())


def test_max_examples_trains_on_a_seeded_subset(tokenizer, tmp_path):
    config = FAST.model_copy(update={"lam": 0.0, "max_examples": 2})
    runs = [heal(build_tiny_llama(len(tokenizer)), tokenizer, _completions(tokenizer), config, 0, tmp_path / str(i), 0)
            for i in range(2)]  # fmt: skip
    assert len(runs[0].log) == 3, "2 examples at batch 2: one step per epoch"
    assert [row["nll"] for row in runs[0].log] == [row["nll"] for row in runs[1].log]
    everything = config.model_copy(update={"max_examples": len(TEXTS)})
    assert len(heal(build_tiny_llama(len(tokenizer)), tokenizer, _completions(tokenizer), everything, 0,
                    tmp_path / "all", 0).log) == 9  # fmt: skip


def test_barrier_keeps_kl_lower_than_plain_nll(tokenizer, tmp_path):
    completions = _completions(tokenizer)
    config = FAST.model_copy(update={"epochs": 4, "agg": "rmse"})
    plain = heal(
        build_tiny_llama(len(tokenizer)),
        tokenizer,
        completions,
        config.model_copy(update={"lam": 0.0}),
        0,
        tmp_path / "plain",
        0,
    )
    barrier = heal(
        build_tiny_llama(len(tokenizer)),
        tokenizer,
        completions,
        config.model_copy(update={"lam": 5.0, "tau": 0.002}),
        0,
        tmp_path / "barrier",
        0,
    )
    assert barrier.log[-1]["kl_rmse"] < 0.7 * plain.log[-1]["kl_rmse"]
    assert any(row["barrier_active_frac"] > 0 for row in barrier.log)
    assert all(row["loss"] == pytest.approx(row["nll"]) for row in plain.log)


def test_non_finite_loss_stops_the_round_and_saves_nothing(tiny_model, tokenizer, tmp_path):
    with torch.no_grad():
        tiny_model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(HealError, match="non-finite loss at step 0"):
        heal(tiny_model, tokenizer, _completions(tokenizer), FAST, 0, tmp_path, 0)
    assert not (tmp_path / "adapter").exists()


def test_reference_cache_reassembles_batches_exactly(tiny_model, tokenizer):
    from interp_heal.heal import ReferenceCache, _pad, reference_log_probs

    student = add_fresh_adapter(tiny_model, FAST, 0)
    examples = training_examples(tokenizer, _completions(tokenizer), 64)
    cache = ReferenceCache(budget_bytes=2**30)
    for ids in ([0, 1, 2], [3, 4, 5]):  # first epoch's batches
        batch = _pad([examples[i] for i in ids], 2, torch.device("cpu"))
        cache.store(ids, batch, reference_log_probs(student, batch, FAST, adapter_name(0)))
    regrouped = [4, 0, 5]  # a later epoch's batch, different composition and order
    batch = _pad([examples[i] for i in regrouped], 2, torch.device("cpu"))
    torch.testing.assert_close(
        cache.lookup(regrouped, torch.device("cpu")), reference_log_probs(student, batch, FAST, adapter_name(0))
    )
    small = ReferenceCache(budget_bytes=1)
    one = _pad([examples[0]], 2, torch.device("cpu"))
    small.store([0], one, torch.zeros(int(one.target_mask.sum()), 5))
    assert small.lookup([0], torch.device("cpu")) is None and small.used_bytes == 0


def test_cached_reference_trains_identically(tokenizer, tmp_path):
    config = FAST.model_copy(update={"epochs": 3, "lam": 5.0, "tau": 0.002})
    runs = {}
    for cache_mb in (0, 64):
        runs[cache_mb] = heal(
            build_tiny_llama(len(tokenizer)),
            tokenizer,
            _completions(tokenizer),
            config.model_copy(update={"ref_cache_mb": cache_mb}),
            0,
            tmp_path / str(cache_mb),
            0,
        )
    # Equal up to float reassociation: a cached row was computed in its first epoch's batch, whose padding
    # width differs from the batch it is reused in (measured: relative differences ~1e-5).
    for uncached, cached in zip(runs[0].log, runs[64].log, strict=True):
        for key in ("nll", "kl_rmse", "barrier", "grad_norm"):
            assert cached[key] == pytest.approx(uncached[key], rel=1e-3, abs=1e-6), (key, uncached["step"])
