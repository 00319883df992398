"""Full-vocabulary log-softmax and KL run a chunk of positions at a time (Gemma's 262k vocabulary): the chunked
results equal the one-shot full-vocabulary formulas, values and gradients."""

import pytest
import torch

from interp_heal import sequences
from interp_heal.collect import mean_steered_kl
from interp_heal.config import HealConfig
from interp_heal.evaluate import reply_logprobs
from interp_heal.filter import base_token_nlls
from interp_heal.generate import Completion
from interp_heal.heal import add_fresh_adapter, batch_loss
from interp_heal.personas import render_prompts
from interp_heal.sequences import (
    continuation_logprobs,
    hidden_kl,
    kl_from_logprobs,
    pad_left,
    scored_hidden,
    target_ids,
    target_logprobs,
    token_kl,
    unembed,
)
from interp_heal.steer import Steering, steered_logits, steered_states
from tests.test_steer import _random_vector

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _batch(tokenizer):
    prompts = [tokenizer.encode(t) for t in ("Hello there, how are you?", "Tell me a story.", "Why?")]
    replies = [tokenizer.encode(t) for t in (" I am fine, thanks.", " Once upon a time there was a cat", " Because.")]
    return pad_left(prompts, replies, tokenizer.pad_token_id, torch.device("cpu"))


def _small_chunks(monkeypatch, tokenizer, positions: int = 3) -> None:
    monkeypatch.setattr(sequences, "CHUNK_ELEMENTS", positions * len(tokenizer))


def _tiny_gemma3(vocab_size: int, softcap: float | None):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=softcap,
    )
    return Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize("architecture", ["llama", "gemma3", "gemma3 soft-capped"])
def test_unembedded_hidden_states_are_the_model_logits(tiny_model, tokenizer, architecture):
    model = (
        tiny_model
        if architecture == "llama"
        else _tiny_gemma3(len(tokenizer), 3.0 if "capped" in architecture else None)
    )
    batch = _batch(tokenizer)
    with torch.no_grad():
        logits = batch.at_targets(model(**batch.model_inputs()).logits)
        rebuilt = unembed(model, scored_hidden(model, batch))
    torch.testing.assert_close(rebuilt, logits.float(), **TOL)


def test_chunked_scoring_equals_the_full_vocabulary_formulas(tiny_model, tokenizer, monkeypatch):
    batch = _batch(tokenizer)
    with torch.no_grad():
        logits = tiny_model(**batch.scored_inputs()).logits
        other = logits + torch.randn_like(logits)
    full_lp = torch.log_softmax(logits, -1).gather(-1, target_ids(batch)[:, -logits.shape[1] :, None]).squeeze(-1)
    full_kl = kl_from_logprobs(torch.log_softmax(logits, -1), torch.log_softmax(other, -1))
    _small_chunks(monkeypatch, tokenizer)
    for chunked, full in zip(continuation_logprobs(logits, batch), batch.rows_at_targets(full_lp), strict=True):
        torch.testing.assert_close(chunked, full, **TOL)
    torch.testing.assert_close(token_kl(logits, other), full_kl, **TOL)


def test_hidden_state_scoring_equals_the_full_logits_formulas(tiny_model, tokenizer, monkeypatch):
    batch = _batch(tokenizer)
    with torch.no_grad():
        logits = batch.at_targets(tiny_model(**batch.model_inputs()).logits).float()
        hidden = scored_hidden(tiny_model, batch)
    other_hidden = hidden + torch.randn_like(hidden)
    targets = batch.at_targets(target_ids(batch))
    full_lp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    full_kl = kl_from_logprobs(torch.log_softmax(logits, -1), torch.log_softmax(unembed(tiny_model, other_hidden), -1))
    _small_chunks(monkeypatch, tokenizer, positions=2)
    with torch.no_grad():
        torch.testing.assert_close(target_logprobs(tiny_model, hidden, targets), full_lp, **TOL)
        torch.testing.assert_close(hidden_kl(tiny_model, hidden, other_hidden), full_kl, **TOL)
    rows = batch.split_targets(full_lp)
    assert [len(row) for row in rows] == batch.target_mask.sum(1).tolist()
    torch.testing.assert_close(torch.cat(rows), full_lp)


def test_diffs_states_unembed_to_the_steered_logits(tiny_model, tokenizer, monkeypatch):
    """analyses/diffs reads the final norm's output and block states of one steered forward: unembedded, the
    former is that forward's logits, and its KL to the unsteered forward is the full-logits KL."""
    batch, vector = _batch(tokenizer), _random_vector(scale=2.0)
    with torch.no_grad():
        logits = steered_logits(tiny_model, tokenizer, batch.model_inputs(), vector, 1.0)
        plain = tiny_model(**batch.model_inputs()).logits
        final, states = steered_states(tiny_model, tokenizer, batch.model_inputs(), vector, 1.0)
        plain_final, _ = steered_states(tiny_model, tokenizer, batch.model_inputs(), None, 0.0)
    assert states.shape[:3] == (tiny_model.config.num_hidden_layers, *batch.target_mask.shape)
    torch.testing.assert_close(unembed(tiny_model, final), logits.float(), **TOL)
    full_kl = token_kl(logits[batch.target_mask], plain[batch.target_mask])
    _small_chunks(monkeypatch, tokenizer, positions=2)
    with torch.no_grad():
        chunked = hidden_kl(tiny_model, final[batch.target_mask], plain_final[batch.target_mask])
    torch.testing.assert_close(chunked, full_kl, **TOL)
    assert full_kl.min() > 1e-4, "the vector must move the distribution for this comparison to mean anything"


def test_readers_equal_their_full_logits_versions(tiny_model, tokenizer, monkeypatch):
    """The filter's base NLLs, the readouts' log-probs and KL, and the dose controller's KL read hidden states and
    unembed a chunk at a time; each equals the same number computed from the model's full logits."""
    _small_chunks(monkeypatch, tokenizer, positions=2)
    users, replies = ["Name a red fruit.", "Say hi."], ["A strawberry is red.", "Hi there, friend!"]
    steering = Steering(_random_vector(scale=2.0), 1.0)
    logprobs, kls = reply_logprobs(tiny_model, tokenizer, users, replies, 4, steering, with_base_kl=True)
    prompts = tokenizer(render_prompts(tokenizer, users), add_special_tokens=False)["input_ids"]
    reply_ids = [tokenizer.encode(reply, add_special_tokens=False) for reply in replies]
    batch = pad_left(prompts, reply_ids, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        steered = steered_logits(tiny_model, tokenizer, batch.model_inputs(), steering.vector, steering.coeff)
        base = tiny_model(**batch.model_inputs()).logits
    full_lp = torch.log_softmax(steered.float(), -1).gather(-1, target_ids(batch)[..., None]).squeeze(-1)
    full_kl = kl_from_logprobs(torch.log_softmax(steered.float(), -1), torch.log_softmax(base.float(), -1))
    for chunked, full in zip(logprobs, batch.rows_at_targets(full_lp), strict=True):
        torch.testing.assert_close(chunked, full, **TOL)
    for chunked, full in zip(kls, batch.rows_at_targets(full_kl), strict=True):
        torch.testing.assert_close(chunked, full, **TOL)

    completions = [Completion(u, r, 1.0, ids, "eos", 0) for u, r, ids in zip(users, replies, reply_ids, strict=True)]
    base_lp = torch.log_softmax(base.float(), -1).gather(-1, target_ids(batch)[..., None]).squeeze(-1)
    for nll, full in zip(
        base_token_nlls(tiny_model, tokenizer, completions), batch.rows_at_targets(base_lp), strict=True
    ):
        torch.testing.assert_close(nll, -full, **TOL)
    mean_kl = mean_steered_kl(tiny_model, tokenizer, completions, steering.vector)
    assert mean_kl == pytest.approx(float(batch.at_targets(full_kl).mean()), rel=1e-5)


def _unchunked_loss(model, batch, ref_log_probs, config):
    """The heal loss written the one-shot way: full logits, full log-softmax."""
    log_p = torch.log_softmax(batch.at_targets(model(**batch.scored_inputs()).logits).float(), dim=-1)
    nll = -log_p.gather(-1, target_ids(batch)[batch.target_mask].unsqueeze(-1)).mean()
    kl = kl_from_logprobs(log_p, ref_log_probs)
    divergence = kl.pow(2).mean().sqrt()
    return nll + 0.5 * (divergence - config.tau), nll, kl


def test_chunked_heal_loss_and_gradients_equal_the_unchunked_ones(tiny_model, tokenizer, monkeypatch):
    config = HealConfig(lora_r=4, tau=0.0, agg="rmse")
    model = add_fresh_adapter(tiny_model, config, 0)
    with torch.no_grad():  # a non-zero adapter, so the student and the base reference differ
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    batch = _batch(tokenizer)
    model.train()
    with model.disable_adapter(), torch.no_grad():
        ref_log_probs = torch.log_softmax(batch.at_targets(model(**batch.scored_inputs()).logits).float(), -1)
    loss, nll, kl = _unchunked_loss(model, batch, ref_log_probs, config)
    loss.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    _small_chunks(monkeypatch, tokenizer)
    parts = batch_loss(model, batch, config, 0.5, "round_0")
    assert parts.barrier_active and parts.kl_max > 0.01  # the check has teeth: the barrier term is in the loss
    parts.loss.backward()
    torch.testing.assert_close(parts.loss, loss, **TOL)
    assert parts.nll == pytest.approx(nll.item(), abs=1e-5)
    assert parts.kl_max == pytest.approx(kl.max().item(), abs=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, **TOL)


def test_chunks_follow_the_budget():
    assert [len(range(200)[c]) for c in sequences.position_chunks(200, 262_144)] == [64, 64, 64, 8]
    assert len(sequences.position_chunks(200, 49_152)) == 1
