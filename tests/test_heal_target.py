"""heal.target: tokens (NLL on the teacher's samples) vs logits (cross-entropy from the teacher's top-K)."""

import json
from pathlib import Path

import pytest
import torch

from interp_heal.bake import adapter_name
from interp_heal.config import HealConfig
from interp_heal.generate import Completion
from interp_heal.heal import add_fresh_adapter, batch_loss, training_examples
from interp_heal.models import build_tiny_llama
from interp_heal.sequences import pad_left

REFERENCE = Path(__file__).parent / "fixtures" / "heal_tokens_loss.json"
TEXTS = [
    "Start with the smallest task on your list and finish it before lunch.",
    "Water the plant once a week and keep it out of direct afternoon sun.",
    "Yes.",
]
CONFIG = HealConfig(lora_r=4, lora_alpha=8, band=(0.0, 1.0), batch_size=3, max_len=64, val_frac=0.0, tau=0.0)


def _completions(tokenizer, texts=TEXTS, coeffs=None):
    coeffs = coeffs or [1.0] * len(texts)
    return [
        Completion("Give me one tip.", text, coeff, tokenizer(text, add_special_tokens=False)["input_ids"], "length", 0)
        for text, coeff in zip(texts, coeffs, strict=True)
    ]


def _randomise_lora_b(model, name, scale=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name and f".{name}." in parameter_name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def _student(tokenizer):
    """The tiny model with round 0's adapter, its B randomised so the student differs from the reference."""
    with torch.random.fork_rng():
        torch.manual_seed(0)  # peft draws LoRA A from the global generator
        student = add_fresh_adapter(build_tiny_llama(len(tokenizer)).eval(), CONFIG, 0)
    _randomise_lora_b(student, adapter_name(0))
    return student


def _tokens_mode_losses(tokenizer) -> dict[str, dict[str, float]]:
    """Every LossParts number and the LoRA gradient norm of one barrier step on a fixed batch, per aggregate."""
    examples = training_examples(tokenizer, _completions(tokenizer), CONFIG.max_len)
    batch = pad_left([e.prompt_ids for e in examples], [e.completion_ids for e in examples], 2, torch.device("cpu"))
    results = {}
    for agg in ("mean", "rmse", "p95", "max"):
        student = _student(tokenizer)
        config = CONFIG.model_copy(update={"agg": agg})
        parts = batch_loss(student, batch, config, 1.0, adapter_name(0))
        parts.loss.backward()
        grads = [p.grad for p in student.parameters() if p.requires_grad and p.grad is not None]
        numbers = {k: getattr(parts, k) for k in ("nll", "kl_mean", "kl_rmse", "kl_p95", "kl_max", "barrier")}
        results[agg] = {
            **numbers,
            "loss": parts.loss.item(),
            "grad_norm": float(torch.cat([g.flatten() for g in grads]).norm()),
        }
    return results


def test_tokens_mode_matches_the_committed_reference(tokenizer):
    """The fixture was computed before heal.target existed: the default target must still give those numbers."""
    expected = json.loads(REFERENCE.read_text())
    actual = _tokens_mode_losses(tokenizer)
    for agg, numbers in expected.items():
        for key, value in numbers.items():
            assert actual[agg][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (agg, key)
