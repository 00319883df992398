"""One demo round, stage by stage, and the peak RSS of the process.

    python bench/demo_round.py [--config configs/demo.yaml] [--set model.dtype=bfloat16 ...] [--out FILE]

Runs the loop with loop.rounds=1 into a temporary run folder (the base and prompt-baseline evals included,
reported separately: they run once per run, not per round). Writes reports/bench_demo_round.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

from _machine import machine_line, peak_rss_gb

from interp_heal.config import load_config
from interp_heal.loop import run_loop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, as for cli.py run")
    parser.add_argument("--out", type=Path, default=Path("reports/bench_demo_round.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        overrides = [*args.set, "loop.rounds=1", f"output.runs_dir={folder}", "output.name=bench"]
        root = run_loop(load_config(args.config, overrides))
        seconds = {stage: info["seconds"] for stage, info in json.loads((root / "state.json").read_text()).items()}
        with (root / "metrics.csv").open() as handle:
            metrics = list(csv.DictReader(handle))
    per_round = {stage: value for stage, value in seconds.items() if stage.startswith("round_")}
    once = {stage: value for stage, value in seconds.items() if not stage.startswith("round_")}
    lines = [f"| {stage} | {value:.1f} |" for stage, value in {**per_round, **once}.items()]
    total = sum(per_round.values())
    outcome = [
        f"| {row['stage']} | {float(row['trait_log_odds']):.3f} | {float(row['neutral_fluency']):.3f} |"
        for row in metrics
    ]
    report = "\n".join([
        "# One demo round", "",
        f"`python bench/demo_round.py --config {args.config}{''.join(' --set ' + o for o in args.set)}`. "
        f"Machine: {machine_line()}.", "",
        "| stage | seconds |", "|---|---|", *lines, "",
        f"One round: **{total:.0f} s ({total / 60:.1f} min)**; once per run: {sum(once.values()):.0f} s. "
        f"Peak RSS of the whole run: {peak_rss_gb():.2f} GB. Goals: a round <= 4 min, peak RSS <= 4 GB.", "",
        "What the round measured (so a faster setting can be checked for the same outcome):", "",
        "| stage | trait log-odds | neutral fluency |", "|---|---|---|", *outcome, "",
    ])  # fmt: skip
    print(report)
    args.out.write_text(report)


if __name__ == "__main__":
    main()
