"""Peak memory and time of one heal step with the KL barrier, at the demo preset's heal batch shape.

    python bench/heal_memory.py [--model smollm2-135m] [--repeats 3] [--out reports/bench_heal_memory_<model>.md]

One step = the reference forward (base, no grad) + the student's forward, NLL and KL(student || ref) over the
full vocabulary, backward and the AdamW update of a fresh LoRA. The step's peak is the kernel's high-water
mark of this process' RSS (VmHWM), reset just before the step, minus the RSS just before it: what the step
adds on top of the loaded model. Gemma 3's vocabulary (262144) makes one position's fp32 logits 1 MB, so the
full-vocabulary tensors of a batch dominate unless they are formed a chunk of positions at a time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from interp_heal.config import load_config
from interp_heal.heal import add_fresh_adapter, batch_loss
from interp_heal.models import load_model
from interp_heal.sequences import pad_left

PROMPT_TOKENS = 32


def _status_mb(field: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


def step_peak(model, batch, config, optimizer) -> tuple[float, float]:
    """(seconds, MB the step's peak RSS adds to the RSS before it) of one barrier step."""
    before = _status_mb("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    parts = batch_loss(model, batch, config, config.lam, "round_00")
    parts.loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - started
    return seconds, _status_mb("VmHWM:") - before


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    heal = load_config(Path("configs/demo.yaml")).heal.model_copy(update={"tau": 0.0})  # barrier always active
    model, _, info = load_model(args.model)
    student = add_fresh_adapter(model, heal, 0)
    student.train()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(100, 40000, (heal.max_len,), generator=generator).tolist() for _ in range(heal.batch_size)]
    batch = pad_left([r[:PROMPT_TOKENS] for r in rows], [r[PROMPT_TOKENS:] for r in rows], 0, torch.device("cpu"))
    step_peak(student, batch, heal, optimizer)  # warm-up: allocator pools and lazy inits are not the step's
    measured = [step_peak(student, batch, heal, optimizer) for _ in range(args.repeats)]
    seconds = statistics.median(m[0] for m in measured)
    peak = max(m[1] for m in measured)
    line = (
        f"| {info.name} | {info.vocab_size} | {heal.batch_size} x {heal.max_len} "
        f"({int(batch.target_mask.sum())} scored) | {seconds:.2f} | {peak:.0f} | {_status_mb('VmRSS:'):.0f} |"
    )
    report = (
        f"# Heal step memory: {info.name}\n\n`python bench/heal_memory.py --model {args.model} --repeats "
        f"{args.repeats}`\n\n| model | vocabulary | batch x tokens | step median s | step peak RSS added, MB | "
        f"RSS after, MB |\n|---|---|---|---|---|---|\n{line}\n"
    )
    print(report)
    out = args.out or Path("reports") / f"bench_heal_memory_{args.model}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)


if __name__ == "__main__":
    main()
