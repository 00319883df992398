"""The KL direction (issue 26): docs/pipeline.md states KL(student || ref) for the barrier and KL(model || base)
for the evaluation; on distributions where the two directions differ, the code computes the stated one, and both
callers pass the arguments in that order."""

import sys
from pathlib import Path

import pytest
import torch

from interp_heal.bake import adapter_name
from interp_heal.evaluate import reply_logprobs
from interp_heal.heal import add_fresh_adapter, batch_loss, reference_log_probs
from interp_heal.sequences import hidden_kl, kl_from_logprobs, token_kl
from interp_heal.steer import Steering
from tests.test_heal import FAST, _batch, _completions, _randomise_lora_b
from tests.test_steer import _random_vector

P, Q = torch.tensor([0.9, 0.05, 0.05]), torch.tensor([0.4, 0.3, 0.3])


def test_token_kl_is_the_expectation_under_its_first_argument():
    by_hand = float((P * (P / Q).log()).sum())
    reverse = float((Q * (Q / P).log()).sum())
    assert abs(by_hand - reverse) > 0.1, "the pair must tell the directions apart"
    assert float(token_kl(P.log()[None, None], Q.log()[None, None])) == pytest.approx(by_hand, rel=1e-5)
    assert float(kl_from_logprobs(P.log(), Q.log())) == pytest.approx(by_hand, rel=1e-5)


def test_the_docs_state_the_directions():
    pipeline = Path("docs/pipeline.md").read_text()
    assert "KL(student_t ‖ ref_t)" in pipeline and "KL(model ‖ base)" in pipeline


def test_the_evaluation_reads_kl_of_the_model_from_the_base(tiny_model, tokenizer, monkeypatch):
    calls = []

    def spy(model, hidden_p, hidden_q):
        calls.append((hidden_p.clone(), hidden_q.clone()))
        return hidden_kl(model, hidden_p, hidden_q)

    # sys.modules: the package's public API exports the function `evaluate`, which shadows the module name.
    monkeypatch.setattr(sys.modules["interp_heal.evaluate"], "hidden_kl", spy)
    users, replies = ["Name a red fruit."], ["A strawberry is red."]
    reply_logprobs(tiny_model, tokenizer, users, replies, 4, Steering(), with_base_kl=True)
    steering = Steering(_random_vector(scale=2.0), 1.0)
    _, kls = reply_logprobs(tiny_model, tokenizer, users, replies, 4, steering, with_base_kl=True)
    (plain, _), (steered, base) = calls
    assert torch.allclose(base, plain, atol=1e-5), "the second argument is the base (the unsteered model's state)"
    assert not torch.allclose(steered, base, atol=1e-3), "the first is the steered model"
    # Which argument is which is pinned above; that the KL's first argument is the expectation's, by
    # test_token_kl_is_the_expectation_under_its_first_argument (hidden_kl uses the same kl_from_logprobs; the
    # random model's near-uniform outputs make both directions agree to 1e-4 here, so they cannot tell them apart).
    with torch.inference_mode():
        expected = hidden_kl(tiny_model, steered, base)
    assert torch.allclose(torch.cat(kls), expected, rtol=1e-4)


def test_the_barrier_reads_kl_of_the_student_from_the_reference(tiny_model, tokenizer, monkeypatch):
    calls = []

    def spy(log_p, log_q):
        calls.append((log_p.detach().clone(), log_q.detach().clone(), log_p.requires_grad))
        return kl_from_logprobs(log_p, log_q)

    monkeypatch.setattr(sys.modules["interp_heal.heal"], "kl_from_logprobs", spy)
    batch = _batch(tokenizer, _completions(tokenizer)[:2])
    student = add_fresh_adapter(tiny_model, FAST, 0)
    _randomise_lora_b(student, adapter_name(0), scale=0.5)
    reference = reference_log_probs(student, batch, FAST, adapter_name(0))
    batch_loss(student, batch, FAST, 1.0, adapter_name(0), ref_log_probs=reference)
    first, second, trained = calls[0]
    assert trained, "the first argument is the student being trained (it carries the LoRA gradient)"
    assert torch.allclose(second, reference[: len(second)]), "the second is the reference (the base, adapters off)"
    assert not torch.allclose(first, second, atol=1e-3)
