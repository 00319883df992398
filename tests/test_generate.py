import pytest
import torch
from transformers import TopPLogitsWarper

from interp_heal.config import GenerateConfig
from interp_heal.generate import NucleusSampler, generate_completions, split_completion, write_completions
from interp_heal.io import read_jsonl
from interp_heal.personas import task_prompts
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
