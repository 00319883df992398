"""MFV evaluation throughput: vignette rows per second at 0 and 32 think tokens, plus the whole `evaluate`.

    python bench/eval_rows.py [--model smollm2-135m] [--rows 132]

A row is one vignette scored in both frames (forward and reversed option order). Uses the MFV data folder
($INTERP_HEAL_MFV_DATA) with the demo preset's protocol. Writes reports/bench_eval_rows.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _machine import machine_line, peak_rss_gb

from interp_heal.config import load_config
from interp_heal.evaluate import evaluate
from interp_heal.mfv import load_protocol, load_vignettes, resolve_data_dir, score_frames
from interp_heal.models import load_model
from interp_heal.paired_items import readout_items


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=132)
    parser.add_argument("--batch", type=int, default=None, help="eval batch size (default: the demo preset's)")
    parser.add_argument("--out", type=Path, default=Path("reports/bench_eval_rows.md"))
    args = parser.parse_args()
    demo = load_config("configs/demo.yaml", [f"eval.batch_size={args.batch}"] if args.batch else [])
    model, tokenizer, _ = load_model(args.model)
    data_dir = resolve_data_dir(demo.eval.mfv_data)
    protocol = load_protocol(data_dir, demo.eval.protocol)
    rows = load_vignettes(data_dir, demo.eval.set_name, demo.eval.condition)[: args.rows]
    lines = []
    for think in (0, 32):
        started = time.perf_counter()
        score_frames(model, tokenizer, protocol, rows, think, demo.eval.batch_size)
        seconds = time.perf_counter() - started
        lines.append(
            f"| MFV, {think} think tokens | {len(rows)} rows | {seconds:.1f} | {len(rows) / seconds:.2f} rows/s |"
        )
    started = time.perf_counter()
    evaluate(model, tokenizer, readout_items(demo.persona), demo.eval)
    seconds = time.perf_counter() - started
    whole = f"whole demo `evaluate` (trait + neutral + {demo.eval.n_vignettes} MFV rows)"
    lines.append(f"| {whole} | - | {seconds:.1f} | - |")
    report = "\n".join([
        "# Evaluation throughput", "",
        f"`python bench/eval_rows.py --rows {args.rows} --batch {demo.eval.batch_size}`. "
        f"Machine: {machine_line()}. Protocol {protocol.name}, "
        f"batch {demo.eval.batch_size}; peak RSS {peak_rss_gb():.2f} GB. Goal: {args.rows} rows at 32 think tokens "
        "<= 2 min.", "",
        "| what | size | seconds | rate |", "|---|---|---|---|", *lines, "",
    ])  # fmt: skip
    print(report)
    args.out.write_text(report)


if __name__ == "__main__":
    main()
