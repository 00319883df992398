"""Steered (nnsight) vs plain HF generate: tokens/s at batch 8 and 16, 64 new tokens, medians over repeats.

    python bench/steer_generate.py [--model smollm2-135m] [--repeats 3] [--threads 2]

Prints a table and writes reports/bench_steer_generate.md. Both paths generate exactly 64 tokens per row
(min_new_tokens) from the same prompts, greedy, so the work is identical; repeats alternate the two paths.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _machine import machine_line

from interp_heal.models import load_model
from interp_heal.personas import BUILTIN_AXES, context_prompts, render_prompts, task_prompts
from interp_heal.steer import extract_steering_vector, steered_generate, tokenize_prompts

NEW_TOKENS = 64


def time_generate(model, tokenizer, inputs, vector, coeff) -> float:
    started = time.perf_counter()
    steered_generate(
        model, tokenizer, inputs, vector, coeff, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--out", type=Path, default=Path("reports/bench_steer_generate.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, info = load_model(args.model)
    vector = extract_steering_vector(model, tokenizer, BUILTIN_AXES["love"], context_prompts(16), (0.45, 0.55))
    device = next(model.parameters()).device
    rows = []
    for batch in args.batches:
        prompts = render_prompts(tokenizer, task_prompts(batch))
        inputs = dict(tokenize_prompts(tokenizer, prompts, device))
        time_generate(model, tokenizer, inputs, vector, 1.0)  # warm-up
        plain, steered = [], []
        for repeat in range(args.repeats):
            # Alternate which path goes first so slow drift in machine speed does not favour one of them.
            first_plain = repeat % 2 == 0
            if first_plain:
                plain.append(time_generate(model, tokenizer, inputs, None, 0.0))
            steered.append(time_generate(model, tokenizer, inputs, vector, 1.0))
            if not first_plain:
                plain.append(time_generate(model, tokenizer, inputs, None, 0.0))
        tokens = batch * NEW_TOKENS
        plain_tps, steered_tps = tokens / statistics.median(plain), tokens / statistics.median(steered)
        best_ratio = min(plain) / min(steered)
        rows.append((batch, plain_tps, steered_tps, steered_tps / plain_tps, best_ratio))
    header = (
        "| batch | plain HF tok/s | steered nnsight tok/s | steered / plain (medians) | (fastest runs) |\n"
        "|---|---|---|---|---|\n"
    )
    table = header + "".join(f"| {b} | {p:.1f} | {s:.1f} | {r:.3f} | {f:.3f} |\n" for b, p, s, r, f in rows)
    machine = f"{machine_line()}; {info.name} {info.dtype} on {info.device}"
    report = (
        f"# Steered vs plain generation\n\n`python bench/steer_generate.py --repeats {args.repeats} "
        f"--threads {args.threads}`\n\nMachine: {machine}. {NEW_TOKENS} new tokens per row (greedy, "
        f"min_new_tokens = max_new_tokens), medians of {args.repeats} repeats, love vector at coeff 1 on layers "
        f"{list(vector.layers)}. Goal: steered / plain >= 0.95. The fastest-run ratio is the less noisy estimate on a "
        f"shared 2-core machine.\n\n{table}"
    )
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)


if __name__ == "__main__":
    main()
