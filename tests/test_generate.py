import pytest
import torch
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, TopPLogitsWarper

from interp_heal import generate as generate_module
from interp_heal.config import GenerateConfig
from interp_heal.generate import (
    generate_completions,
    prompt_batch,
    shared_prefix_length,
    split_completion,
    write_completions,
)
from interp_heal.io import read_jsonl
from interp_heal.personas import render_prompts, task_prompts
from interp_heal.sampling import NucleusSampler
from interp_heal.steer import steered_generate, tokenize_prompts
from tests.test_steer import _random_vector

SAMPLING = GenerateConfig(max_new_tokens=6, temperature=1.0, top_p=0.9, batch_size=2)


def test_split_completion():
    assert split_completion([5, 6, 2, 2], {2}) == ([5, 6, 2], "eos")
    assert split_completion([5, 6, 7], {2}) == ([5, 6, 7], "length")


def test_records_cover_every_prompt_and_coeff(tiny_model, tokenizer, tmp_path):
    prompts = task_prompts(3)
    records = generate_completions(tiny_model, tokenizer, prompts, _random_vector(), [0.0, 2.0], SAMPLING, seed=7)
    assert [(r.coeff, r.prompt) for r in records] == [(c, p) for c in (0.0, 2.0) for p in prompts]
    for record in records:
        assert 1 <= len(record.token_ids) <= 6 and record.finish_reason in {"eos", "length"}
        assert record.completion == tokenizer.decode(record.token_ids, skip_special_tokens=True)
    write_completions(tmp_path / "c.jsonl", records)
    assert [row["completion"] for row in read_jsonl(tmp_path / "c.jsonl")] == [r.completion for r in records]


def test_sampling_is_seeded(tiny_model, tokenizer):
    prompts = task_prompts(4)
    vector = _random_vector()
    first = generate_completions(tiny_model, tokenizer, prompts, vector, [1.0], SAMPLING, seed=11)
    again = generate_completions(tiny_model, tokenizer, prompts, vector, [1.0], SAMPLING, seed=11)
    other = generate_completions(tiny_model, tokenizer, prompts, vector, [1.0], SAMPLING, seed=12)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert [r.token_ids for r in first] != [r.token_ids for r in other]


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95])
def test_nucleus_sampler_candidates_are_hf_top_p_kept_set(top_p):
    torch.manual_seed(0)
    scores = torch.randn(6, 3000) * 4.0  # peaked rows: the nucleus sits inside the top-k search
    ids, weights = NucleusSampler(1.0, top_p, search=512).candidates(scores)
    reference = TopPLogitsWarper(top_p)(torch.zeros(6, 1, dtype=torch.long), scores.clone())
    for row in range(6):
        ours = set(ids[row][weights[row] > 0].tolist())
        assert ours == set(torch.nonzero(~torch.isinf(reference[row])).flatten().tolist())


@pytest.mark.parametrize(("scale", "search"), [(3.0, 8), (0.05, 8)])  # nucleus inside / past the search
def test_nucleus_sampler_draws_the_renormalised_nucleus(scale, search):
    torch.manual_seed(0)
    scores = torch.randn(1, 40) * scale
    sampler = NucleusSampler(temperature=0.7, top_p=0.8, search=search)
    target = TopPLogitsWarper(0.8)(torch.zeros(1, 1, dtype=torch.long), scores / 0.7).softmax(-1)[0]
    draws = torch.cat([sampler(torch.zeros(1, 1, dtype=torch.long), scores).argmax(-1) for _ in range(8000)])
    frequencies = torch.bincount(draws, minlength=40).float() / len(draws)
    assert (frequencies[target == 0] == 0).all()
    assert (frequencies - target).abs().max() < 0.02


def test_shared_prefix_length_leaves_a_token_to_predict_from():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[7, 2], [1, 2]]) == 0


def _tiny_gemma3(vocab_size: int, window: int) -> nn.Module:
    """Gemma 3's layout (windowed layers and a global one), random and tiny: no download."""
    layer_types = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=window, layer_types=layer_types,
    )  # fmt: skip
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


GREEDY = GenerateConfig(max_new_tokens=4, temperature=0.0, batch_size=6)


@pytest.mark.parametrize(
    ("architecture", "generated_only", "shares"),
    [("llama", False, True), ("llama", True, True), ("gemma3, window 512", False, True),
     ("gemma3, window 16", False, False)],
)  # fmt: skip
def test_shared_prefix_batch_generates_what_the_plain_left_padded_batch_does(
    tiny_model, tokenizer, architecture, generated_only, shares
):
    """The prefix-cached layout is an optimisation only: every step's logits match HF generate on the plain
    left-padded batch, with per-row coefficients (the cached prefix is steered per row too). A sliding window
    shorter than the sequence would see the padding inside it, so there the plain layout is kept."""
    model = tiny_model if architecture == "llama" else _tiny_gemma3(len(tokenizer), int(architecture.split()[-1]))
    templated = render_prompts(tokenizer, task_prompts(3) * 2)
    vector, row_coeffs = _random_vector(scale=2.0), [0.0] * 3 + [1.5] * 3
    rows = tokenizer(templated, add_special_tokens=False)["input_ids"]
    assert shared_prefix_length(rows) > 10
    steps = {"max_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}

    def step_logits(inputs, **kwargs):
        output = steered_generate(model, tokenizer, inputs, vector, row_coeffs, generated_only, **kwargs, **steps)
        return torch.stack(output.logits)

    batch = prompt_batch(model, tokenizer, rows, vector, row_coeffs, GREEDY, generated_only)
    assert (batch.prefix_cache is not None) == shares
    assert not batch.attention_mask.all()  # rows of different lengths: padding sits between prefix and rest
    shared = step_logits(batch.inputs(), **batch.generate_kwargs())
    plain = step_logits(dict(tokenize_prompts(tokenizer, templated, torch.device("cpu"))))
    torch.testing.assert_close(shared, plain, atol=1e-4, rtol=1e-4)
    assert (plain[:, :3] - plain[:, 3:]).abs().max() > 0.1  # the steering moves the logits: the check has teeth


def test_share_prefix_off_is_the_plain_left_padded_batch(tiny_model, tokenizer):
    templated = render_prompts(tokenizer, task_prompts(3))
    rows = tokenizer(templated, add_special_tokens=False)["input_ids"]
    unshared_config = GREEDY.model_copy(update={"share_prefix": False})
    unshared = prompt_batch(tiny_model, tokenizer, rows, _random_vector(), [1.0] * 3, unshared_config)
    assert unshared.prefix_cache is None and unshared.generate_kwargs() == {}
    assert torch.equal(unshared.input_ids, tokenize_prompts(tokenizer, templated, torch.device("cpu"))["input_ids"])


def test_the_window_guard_is_needed(tokenizer, monkeypatch):
    """Why prompt_batch keeps the plain layout under a short sliding window: forced to share the prefix there,
    the window counts the padding slots inside the sequence and the logits move."""
    model = _tiny_gemma3(len(tokenizer), window=16)
    templated = render_prompts(tokenizer, task_prompts(3))
    rows = tokenizer(templated, add_special_tokens=False)["input_ids"]
    steps = {"max_new_tokens": 2, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    plain_inputs = dict(tokenize_prompts(tokenizer, templated, torch.device("cpu")))
    plain = torch.stack(steered_generate(model, tokenizer, plain_inputs, None, 0.0, **steps).logits)
    monkeypatch.setattr(generate_module, "sliding_window", lambda model: None)
    forced = prompt_batch(model, tokenizer, rows, None, [0.0] * 3, GREEDY)
    assert forced.prefix_cache is not None
    output = steered_generate(model, tokenizer, forced.inputs(), None, 0.0, **forced.generate_kwargs(), **steps)
    shared = torch.stack(output.logits)
    assert (shared - plain).abs().max() > 1e-3
