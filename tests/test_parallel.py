"""Data-parallel heal: two real processes (torchrun, gloo on CPU) equal one process accumulating two micro-batches."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from interp_heal.io import write_json, write_jsonl
from interp_heal.parallel import DataParallel, data_parallel, share_of_step
from tests.test_heal import _completions

# Barrier on from the second step (tau=0), two epochs so the reference cache is used, 5 training examples so the
# last step of each epoch has one micro-batch for two processes (the idle process joins with a zero weight).
HEAL = ["heal.batch_size=1", "heal.epochs=2", "heal.tau=0", "heal.lam=1.0", "heal.lr=0.01", "heal.val_frac=0.15"]


def test_share_of_step_covers_each_micro_batch_once():
    shares = [share_of_step(5, 2, rank) for rank in range(2)]
    assert shares == [[0, 2, 4], [1, 3]]
    assert share_of_step(1, 2, 1) == []


def test_one_process_without_a_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    parallel = data_parallel()
    assert parallel == DataParallel() and (parallel.world, parallel.rank, parallel.is_main) == (1, 0, True)
    assert parallel.device is None
    values = torch.tensor([1.0, 2.0])
    assert parallel.sum(values) is values


def _collect_folder(tmp_path: Path, tokenizer) -> Path:
    collect_dir = tmp_path / "collect"
    rows = [{**c.as_dict(), "kept": True, "kappa": 0.5, "reasons": []} for c in _completions(tokenizer)]
    write_jsonl(collect_dir / "completions.jsonl", rows)
    write_json(collect_dir / "summary.json", {"kappa": 0.5})
    return collect_dir


def _heal(launcher: list[str], collect_dir: Path, out: Path, extra: list[str]) -> None:
    command = [*launcher, "cli.py", "heal", "-c", "configs/smoke.yaml", "--from", str(collect_dir), "-o", str(out)]
    for override in [*HEAL, *extra]:
        command += ["--set", override]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _log(out: Path) -> list[dict[str, float]]:
    with (out / "train_log.csv").open() as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_grad_accum(tmp_path, tokenizer):
    collect_dir = _collect_folder(tmp_path, tokenizer)
    _heal([sys.executable], collect_dir, tmp_path / "one", ["heal.grad_accum=2"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _heal(torchrun, collect_dir, tmp_path / "two", ["heal.grad_accum=1"])
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert len(one) == len(two) == 6, "ceil(5 micro-batches / 2 per step) x 2 epochs"
    assert any(row["barrier_active_frac"] > 0 for row in one), "the barrier must take part in the comparison"
    for row_one, row_two in zip(one, two, strict=True):
        for key in ("nll", "kl_rmse", "barrier", "loss", "grad_norm", "barrier_active_frac"):
            assert row_two[key] == pytest.approx(row_one[key], rel=1e-4, abs=1e-6), (row_one["step"], key)
    weights_one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    weights_two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    assert any(float(w.abs().max()) > 0 for key, w in weights_one.items() if "lora_B" in key), "training moved B"
    for key, weight in weights_one.items():
        torch.testing.assert_close(weights_two[key], weight, rtol=1e-4, atol=1e-6)
