"""Shared fixtures: a tiny random llama (4 layers, d=64) with the SmolLM2 tokenizer, built locally."""

from __future__ import annotations

import pytest
import torch

from interp_heal.config import load_config
from interp_heal.loop import run_loop
from interp_heal.models import build_tiny_llama, load_tokenizer

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("tiny-random")


@pytest.fixture
def tiny_model(tokenizer):
    """A fresh tiny model per test: peft and steering tests may wrap or modify it."""
    return build_tiny_llama(len(tokenizer)).eval()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """A finished two-round loop run of the tiny model (smoke preset), shared by the analysis and report tests."""
    root = tmp_path_factory.mktemp("analysis_runs")
    config = load_config("configs/smoke.yaml", [f"output.runs_dir={root}", "output.name=analysis", "heal.lr=0.02"])
    return run_loop(config)
