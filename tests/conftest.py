"""Shared fixtures: a tiny random llama (4 layers, d=64) with the SmolLM2 tokenizer, built locally."""

from __future__ import annotations

import pytest
import torch

from interp_heal.models import build_tiny_llama, load_tokenizer

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("tiny-random")


@pytest.fixture
def tiny_model(tokenizer):
    """A fresh tiny model per test: peft and steering tests may wrap or modify it."""
    return build_tiny_llama(len(tokenizer)).eval()
