"""Faults and determinism on the tiny model, with real processes: a run killed with SIGKILL in the middle of
generation, of the heal and of an eval resumes without recomputing any finished stage and ends with exactly
the metrics of an uninterrupted run; two runs with the same seed and config are identical."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from safetensors.torch import load_file

from interp_heal.config import load_config
from interp_heal.io import read_jsonl
from interp_heal.loop import run_loop

# Long enough stages that a kill lands inside them: ~2 s of generation, ~6 s of heal, ~4 s per eval.
OVERRIDES = ["generate.n_prompts=8", "generate.max_new_tokens=48", "heal.epochs=15"]


def _config(root: Path, name: str):
    return load_config("configs/smoke.yaml", [f"output.runs_dir={root}", f"output.name={name}", *OVERRIDES])


def _start(root: Path, name: str) -> subprocess.Popen:
    sets = [arg for item in [f"output.runs_dir={root}", f"output.name={name}", *OVERRIDES] for arg in ("--set", item)]
    return subprocess.Popen(
        [sys.executable, "cli.py", "run", "-c", "configs/smoke.yaml", *sets],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _events(run: Path) -> list[dict]:
    path = run / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _kill_inside(root: Path, name: str, target: str, delay: float) -> None:
    """Start a run, SIGKILL it `delay` seconds after `target` starts, check it died inside that stage."""
    run = root / name
    starts_before = sum(e.get("stage") == target for e in _events(run))
    process = _start(root, name)
    deadline = time.monotonic() + 600
    while sum(e.get("stage") == target and e["event"] == "stage_start" for e in _events(run)) == starts_before:
        assert process.poll() is None, f"the run ended before reaching {target}"
        assert time.monotonic() < deadline, f"{target} never started"
        time.sleep(0.05)
    time.sleep(delay)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    state = json.loads((run / "state.json").read_text())
    assert target not in state, f"{target} finished before the kill; the test needs a longer stage"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run, the yardstick of both tests (each run here takes about a minute on CI)."""
    root = tmp_path_factory.mktemp("faults")
    return run_loop(_config(root, "reference"))


def test_sigkill_mid_stage_then_resume_matches_an_uninterrupted_run(tmp_path, reference):
    for target, delay in (("round_00/collect", 0.5), ("round_00/heal", 1.5), ("round_00/eval_healed", 1.0)):
        _kill_inside(tmp_path, "killed", target, delay)
    finished = _start(tmp_path, "killed")
    assert finished.wait(timeout=600) == 0
    run = tmp_path / "killed"
    starts = Counter(e["stage"] for e in _events(run) if e["event"] == "stage_start")
    killed = {"round_00/collect", "round_00/heal", "round_00/eval_healed"}
    assert all(starts[stage] == (2 if stage in killed else 1) for stage in starts), starts
    assert (run / "metrics.csv").read_text() == (reference / "metrics.csv").read_text()
    for round_dir in ("round_00", "round_01"):
        assert (run / round_dir / "completions.jsonl").read_text() == (
            reference / round_dir / "completions.jsonl"
        ).read_text()


def test_same_seed_and_config_give_identical_runs(tmp_path, reference):
    first, second = reference, run_loop(_config(tmp_path, "second"))
    for round_dir in ("round_00", "round_01"):
        vectors = [load_file(run / round_dir / "vector.safetensors")["directions"] for run in (first, second)]
        assert vectors[0].equal(vectors[1])
        kept = [[r["completion"] for r in read_jsonl(run / round_dir / "completions.jsonl") if r["kept"]]
                for run in (first, second)]  # fmt: skip
        assert kept[0] == kept[1] and kept[0]
    assert (first / "metrics.csv").read_text() == (second / "metrics.csv").read_text()
