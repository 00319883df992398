"""Heal step time with the KL barrier (reference forward + KL) vs NLL only, same batch, medians over repeats.

    python bench/heal_step.py [--model smollm2-135m] [--repeats 7] [--batch 4] [--tokens 128] [--epochs N]

Prints a table and writes reports/bench_heal_step.md. One "step" is forward, loss, backward and the AdamW
update of a fresh LoRA (r=8, all linear projections in blocks 0.2-0.8). The NLL-only step skips the reference
forward entirely; the barrier step runs it (KL(student || ref) per token over the full vocabulary). Note the
loop's lam = 0 runs still pay for the reference forward, to log their KL drift.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from interp_heal.config import HealConfig, load_config
from interp_heal.heal import add_fresh_adapter, batch_loss, reference_log_probs
from interp_heal.models import load_model
from interp_heal.sequences import pad_left


def step_seconds(model, batch, config: HealConfig, lam: float, optimizer, cached=None) -> float:
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    parts = batch_loss(model, batch, config, lam, "round_00", with_reference=lam > 0, ref_log_probs=cached)
    parts.loss.backward()
    optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("reports/bench_heal_step.md"))
    # The reference is computed once and cached for later epochs, so the average ratio depends on the epoch count:
    # by default the one the demo round trains with.
    parser.add_argument("--epochs", type=int, default=load_config(Path("configs/demo.yaml")).heal.epochs)
    args = parser.parse_args()
    model, tokenizer, info = load_model(args.model)
    # tau = 0 keeps the barrier active, so the timed step includes its backward too.
    config = HealConfig(tau=0.0, lam=0.3)
    student = add_fresh_adapter(model, config, 0)
    student.train()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (32,), generator=generator).tolist() for _ in range(args.batch)]
    completions = [torch.randint(100, 40000, (args.tokens - 32,), generator=generator).tolist() for _ in prompts]
    batch = pad_left(prompts, completions, tokenizer.pad_token_id, torch.device("cpu"))
    timings: dict[str, list[float]] = {"nll": [], "barrier": [], "cached": []}
    step_seconds(student, batch, config, 0.3, optimizer)  # warm-up
    cached = reference_log_probs(student, batch, config, "round_00")
    for _ in range(args.repeats):
        timings["nll"].append(step_seconds(student, batch, config, 0.0, optimizer))
        timings["barrier"].append(step_seconds(student, batch, config, 0.3, optimizer))
        timings["cached"].append(step_seconds(student, batch, config, 0.3, optimizer, cached))
    nll, barrier = statistics.median(timings["nll"]), statistics.median(timings["barrier"])
    cached_step = statistics.median(timings["cached"])
    amortised = (barrier + (args.epochs - 1) * cached_step) / args.epochs
    report = (
        f"# Heal step: KL barrier vs NLL only\n\n`python bench/heal_step.py --repeats {args.repeats} --batch "
        f"{args.batch} --tokens {args.tokens} --epochs {args.epochs}`\n\n{info.name} {info.dtype} on {info.device}, "
        f"{torch.get_num_threads()} torch threads, batch {args.batch} x {args.tokens} tokens ({args.tokens - 32} "
        f"completion tokens per row), LoRA r=8 on q,k,v,o,gate,up,down of blocks 0.2-0.8. Goal: ratio <= 1.5.\n\n"
        "| step | median s | min s |\n|---|---|---|\n"
        f"| NLL only (lam = 0) | {nll:.2f} | {min(timings['nll']):.2f} |\n"
        f"| NLL + barrier (reference forward + full-vocab KL) | {barrier:.2f} | {min(timings['barrier']):.2f} |\n"
        f"| NLL + barrier, reference log-probs cached (every epoch after the first) | {cached_step:.2f} | "
        f"{min(timings['cached']):.2f} |\n\n"
        f"Ratio to the NLL step: barrier, first epoch {barrier / nll:.3f}; cached {cached_step / nll:.3f}; "
        f"averaged over {args.epochs} epochs {amortised / nll:.3f}.\n"
    )
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)


if __name__ == "__main__":
    main()
