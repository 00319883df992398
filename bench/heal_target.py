"""Heal step time and peak memory of heal.target = logits (teacher top-K cross-entropy) vs tokens (sampled NLL).

    python bench/heal_target.py [--model smollm2-135m] [--k 20] [--repeats 3] [--out FILE]

The same barrier step as bench/heal_memory.py (reference forward, student forward, loss over the full
vocabulary, backward, AdamW of a fresh LoRA) at the demo heal shape, once per target, alternating so both
see the same machine noise. The logits step also gathers the teacher's K log-probs at each position; its
teacher is computed once beforehand, as the loop's teacher_topk stage does (that cost is reported per token).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from heal_memory import PROMPT_TOKENS, _status_mb

from interp_heal.config import load_config
from interp_heal.heal import TeacherRows, add_fresh_adapter, batch_loss
from interp_heal.models import load_model
from interp_heal.sequences import PaddedBatch, pad_left
from interp_heal.teacher import TeacherInputs, compute_teacher_topk


def step(model, batch: PaddedBatch, config, optimizer, teacher: TeacherRows | None) -> tuple[float, float]:
    """(seconds, MB the step's peak RSS adds to the RSS before it) of one barrier step."""
    before = _status_mb("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    batch_loss(model, batch, config, config.lam, "round_00", teacher=teacher).loss.backward()
    optimizer.step()
    return time.perf_counter() - started, _status_mb("VmHWM:") - before


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    heal = load_config(Path("configs/demo.yaml")).heal.model_copy(update={"tau": 0.0, "teacher_topk": args.k})
    model, tokenizer, info = load_model(args.model)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(100, 40000, (heal.max_len,), generator=generator).tolist() for _ in range(heal.batch_size)]
    prompts, completions = [r[:PROMPT_TOKENS] for r in rows], [r[PROMPT_TOKENS:] for r in rows]
    batch = pad_left(prompts, completions, 0, torch.device("cpu"))
    started = time.perf_counter()  # the teacher is the model before this round's adapter, as in the loop
    ids, log_probs = compute_teacher_topk(
        model, tokenizer, TeacherInputs(prompts, completions, [0.0] * len(rows)), args.k
    )
    teacher_ms = 1000 * (time.perf_counter() - started) / len(ids)
    teacher = TeacherRows(ids, log_probs)
    student = add_fresh_adapter(model, heal, 0)
    student.train()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    targets = {"tokens": None, "logits": teacher}
    for rows_of in targets.values():  # warm-up: allocator pools and lazy inits are not the step's
        step(student, batch, heal, optimizer, rows_of)
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
    for _ in range(args.repeats):
        for name, rows_of in targets.items():
            measured[name].append(step(student, batch, heal, optimizer, rows_of))
    lines = []
    for name, results in measured.items():
        seconds, peak = statistics.median(m[0] for m in results), max(m[1] for m in results)
        lines.append(f"| {info.name} | {name} | {seconds:.2f} | {min(m[0] for m in results):.2f} | {peak:.0f} |")
    stored_kb = ids.numel() * 4 * 2 / 1024  # int32 ids + float32 log-probs
    full_mb = len(ids) * info.vocab_size * 4 / 2**20
    report = (
        f"# Heal step, target logits vs tokens: {info.name}\n\n`python bench/heal_target.py --model {args.model} "
        f"--k {args.k} --repeats {args.repeats}`\n\nBatch {heal.batch_size} x {heal.max_len} ({len(ids)} scored), "
        f"barrier on (tau 0), K = {args.k}, vocabulary {info.vocab_size}.\n\n| model | target | step median s | "
        f"min s | step peak RSS added, MB |\n|---|---|---|---|---|\n" + "\n".join(lines) + "\n\n"
        f"Teacher top-K (once per round, no grad): {teacher_ms:.1f} ms per completion token; stored {stored_kb:.0f} KB "
        f"for these {len(ids)} tokens, where full fp32 distributions would be {full_mb:.0f} MB.\n"
    )
    print(report)
    out = args.out or Path("reports") / f"bench_heal_target_{args.model}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)


if __name__ == "__main__":
    main()
