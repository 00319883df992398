"""The compute ceiling of this machine for the embedded model, and how close the loop's generation stage gets.

    python bench/ceiling.py [--model smollm2-135m] [--repeats 3] [--dtype float32]

1. fp32 matmul throughput at the shapes of one decode step at batch 64 (each linear layer of the model with
   64 rows), and of a large square GEMM (the machine's peak);
2. FLOPs per generated token = 2 x (parameters used per token: every linear layer + the unembedding);
3. ceiling tok/s = decode-shape GFLOP/s / GFLOP per token;
4. the loop's generation stage as the demo preset runs it (32 prompts x 2 coefficients in one batch of 64,
   64 new tokens, sampled, per-row steering, the prompts' shared prefix run once per coefficient) and the
   layouts before it (every row running its whole prompt; one batch of 32 per coefficient): tok/s and the
   fraction of the ceiling. Writes reports/bench_ceiling.md;
5. the best fraction the stage could reach with no overhead at all: only generated tokens count, but every
   prompt position run (padded) costs a forward too, and every row runs to the longest row's end; and the
   same with the time the decode steps need just to read the KV cache at the machine's measured bandwidth.

`--dtype bfloat16` measures the same in bf16 (CPUs with AMX run bf16 matmuls several times faster).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _machine import machine_line
from torch import nn

from interp_heal.config import GenerateConfig, load_config
from interp_heal.generate import generate_completions, shared_prefix_length
from interp_heal.models import load_model
from interp_heal.personas import BUILTIN_AXES, context_prompts, render_prompts, task_prompts
from interp_heal.steer import extract_steering_vector


def gflops(rows: int, shapes: list[tuple[int, int]], repeats: int, dtype: torch.dtype) -> float:
    """GFLOP/s of y = x W^T for every (out, in) shape with `rows` input rows, summed like one forward."""
    weights = [torch.randn(out_features, in_features, dtype=dtype) for out_features, in_features in shapes]
    inputs = [torch.randn(rows, in_features, dtype=dtype) for _, in_features in shapes]
    flop = sum(2 * rows * out_features * in_features for out_features, in_features in shapes)
    timings = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        for x, w in zip(inputs, weights, strict=True):
            x @ w.T
        timings.append(time.perf_counter() - started)
    return flop / min(timings[1:]) / 1e9


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(out, in) of every linear layer one token passes through, the unembedding included."""
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]


def layout_batches(token_rows: list[list[int]], n_coeffs: int, config: GenerateConfig) -> list[tuple[int, int, int]]:
    """Per batch of the stage: (rows, shared prefix run once per coefficient, positions every row runs)."""
    rows = sorted((row for row in token_rows for _ in range(n_coeffs)), key=len)
    batches = [rows[start : start + config.batch_size] for start in range(0, len(rows), config.batch_size)]
    prefixes = [shared_prefix_length(batch) if config.share_prefix else 0 for batch in batches]
    return [
        (len(batch), prefix, max(len(row) - prefix for row in batch))
        for batch, prefix in zip(batches, prefixes, strict=True)
    ]


def stage_flops(batches: list[tuple[int, int, int]], n_coeffs: int, config: GenerateConfig, shapes, unembedding):
    """FLOPs the stage cannot avoid in its layout: prompt positions (every linear layer but the unembedding, which
    the prefill runs for the last position only) and max_new_tokens steps of every row (to the batch's last row's
    end). Returns (all FLOPs, FLOPs per generated token)."""
    per_token = sum(2 * o * i for o, i in shapes)
    body = per_token - 2 * unembedding[0] * unembedding[1]
    prompt_flops = sum((n_coeffs * prefix + rows * rest) * body for rows, prefix, rest in batches)
    decode_flops = sum(rows for rows, _, _ in batches) * config.max_new_tokens * per_token
    return prompt_flops + decode_flops, per_token


def kv_read_bytes(batches: list[tuple[int, int, int]], config: GenerateConfig, model: nn.Module, dtype) -> int:
    """Bytes of KV cache every decode step's attention reads: each row, each layer, keys and values of every
    position so far (prompt width + tokens generated)."""
    model_config = model.config
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    per_position = model_config.num_hidden_layers * 2 * model_config.num_key_value_heads * head_dim
    per_position *= torch.finfo(dtype).bits // 8
    steps = range(1, config.max_new_tokens + 1)
    return sum(rows * (prefix + rest + step) * per_position for rows, prefix, rest in batches for step in steps)


def read_bandwidth(repeats: int) -> float:
    """GB/s of reading a 512 MiB float32 tensor (a sum), the rate the KV cache and weights stream at."""
    block = torch.ones(2**27)
    timings = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        block.sum()
        timings.append(time.perf_counter() - started)
    return block.numel() * 4 / min(timings[1:]) / 1e9


def timed_layouts(model, tokenizer, vector, configs: dict[str, GenerateConfig], prompts, coeffs, repeats: int):
    """Seconds of every repeat and generated tokens per layout. The layouts take turns (ABCABC...), so a drift in
    the machine's speed (+-10% over minutes here) hits all of them alike."""
    timings: dict[str, list[float]] = {name: [] for name in configs}
    tokens: dict[str, int] = {}
    for repeat in range(repeats):
        for name, config in configs.items():
            started = time.perf_counter()
            records = generate_completions(model, tokenizer, prompts, vector, coeffs, config, seed=repeat)
            timings[name].append(time.perf_counter() - started)
            tokens[name] = sum(len(r.token_ids) for r in records)
    return timings, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=None, help="default reports/bench_ceiling[_bf16].md")
    args = parser.parse_args()
    out = args.out or Path("reports/bench_ceiling.md" if args.dtype == "float32" else "reports/bench_ceiling_bf16.md")
    dtype = getattr(torch, args.dtype)
    model, tokenizer, info = load_model(args.model, dtype=dtype)
    shapes = linear_shapes(model)
    gflop_per_token = sum(2 * o * i for o, i in shapes) / 1e9
    decode_gflops = gflops(64, shapes, args.repeats, dtype)
    peak_gflops = gflops(2048, [(2048, 2048)] * 4, args.repeats, dtype)
    ceiling = decode_gflops / gflop_per_token
    bandwidth = read_bandwidth(args.repeats)
    demo = load_config("configs/demo.yaml")
    vector = extract_steering_vector(model, tokenizer, BUILTIN_AXES["love"], context_prompts(16), demo.steer.band)
    prompts = task_prompts()[: demo.generate.n_prompts]
    templated = render_prompts(tokenizer, prompts)
    token_rows = tokenizer(templated, add_special_tokens=False)["input_ids"]
    unembedding = tuple(model.get_output_embeddings().weight.shape)
    coeffs = demo.steer.coeffs
    rows = []
    layouts = {
        "one batch of 64, shared prefix once per coefficient (demo)": (64, True),
        "one batch of 64, every row runs its whole prompt (the layout before)": (64, False),
        "two batches of 32, every row runs its whole prompt (the layout before that)": (32, False),
    }
    configs = {
        label: demo.generate.model_copy(update={"batch_size": batch_size, "share_prefix": share_prefix})
        for label, (batch_size, share_prefix) in layouts.items()
    }
    for share_prefix in (True, False):  # the prompt prefill alone: the batch of 64 with max_new_tokens = 1
        update = {"batch_size": 64, "share_prefix": share_prefix, "max_new_tokens": 1}
        configs[f"prefill {share_prefix}"] = demo.generate.model_copy(update=update)
    timings, tokens = timed_layouts(model, tokenizer, vector, configs, prompts, coeffs, args.repeats)
    for label in layouts:
        seconds = statistics.median(timings[label])
        tok_s = tokens[label] / seconds
        batches = layout_batches(token_rows, len(coeffs), configs[label])
        flops, per_token = stage_flops(batches, len(coeffs), configs[label], shapes, unembedding)
        ideal_seconds, gemm_seconds = tokens[label] * per_token / (decode_gflops * 1e9), flops / (decode_gflops * 1e9)
        kv_seconds = kv_read_bytes(batches, configs[label], model, dtype) / (bandwidth * 1e9)
        bound, kv_bound = ideal_seconds / gemm_seconds, ideal_seconds / (gemm_seconds + kv_seconds)
        rows.append(
            f"| {label} | {seconds:.1f} | {tok_s:.0f} | {tok_s / ceiling:.0%} | {bound:.0%} | {kv_seconds:.1f} | "
            f"{kv_bound:.0%} |"
        )
    shared, whole = (timings[label] for label in list(layouts)[:2])
    paired = [a / b for a, b in zip(shared, whole, strict=True)]
    prefill_seconds = {share: statistics.median(timings[f"prefill {share}"]) for share in (True, False)}
    report = "\n".join([
        f"# Compute ceiling and the generation stage ({args.dtype})", "",
        f"`python bench/ceiling.py --repeats {args.repeats} --dtype {args.dtype}`. Machine: {machine_line()}.", "",
        f"- {info.name}: {len(shapes)} linear layers, {gflop_per_token:.3f} GFLOP per generated token "
        "(2 x the weights each token multiplies, unembedding included; attention over <200 positions adds <2%).",
        f"- {args.dtype} matmul at decode shapes (64 rows through every layer): {decode_gflops:.0f} GFLOP/s; "
        f"large square GEMM (2048^3): {peak_gflops:.0f} GFLOP/s.",
        f"- ceiling at batch 64: {ceiling:.0f} generated tok/s.", "",
        f"Generation stage as the loop runs it ({len(prompts)} prompts x {len(coeffs)} coefficients, "
        f"{demo.generate.max_new_tokens} new tokens, T={demo.generate.temperature}, top-p {demo.generate.top_p}, "
        f"steered; tokens counted up to each row's EOS; median of {args.repeats}):", "",
        f"- memory read bandwidth (sum of a 512 MiB tensor): {bandwidth:.1f} GB/s.", "",
        "| layout | seconds | tok/s | of ceiling | best possible (GEMMs only) | KV cache reads, s | best possible "
        "(GEMMs + KV reads) |", "|---|---|---|---|---|---|---|", *rows, "",
        f"The prompt prefill alone (the batch of 64 with max_new_tokens = 1) takes {prefill_seconds[True]:.1f} s "
        f"with the shared prefix, {prefill_seconds[False]:.1f} s without. The whole stage with the shared prefix "
        f"over the stage without it, repeat by repeat: {', '.join(f'{r:.3f}' for r in paired)} "
        f"(median {statistics.median(paired):.3f}). "
        "'Best possible (GEMMs only)' counts the FLOPs the stage cannot avoid in that layout (padded prompt "
        "positions, and every row for max_new_tokens steps) and divides the generated tokens' share by them. "
        "'KV cache reads' is the time the decode steps' attention needs just to read the cache once at the measured "
        "bandwidth (every row attends to its whole padded prompt and the tokens so far); the last column adds it to "
        "the GEMM time, a tighter bound that still leaves out norms, RoPE, sampling and Python.", "",
    ])  # fmt: skip
    print(report)
    out.write_text(report)


if __name__ == "__main__":
    main()
