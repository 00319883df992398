"""Run every benchmark (each in its own process, so peak RSS is per job) and write reports/bench.md.

    python bench/all.py [--skip demo_round]     # or: make bench

Stop other heavy jobs first: on a 2-core machine a second torch process slows every number here several-fold.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from _machine import machine_line

# Report name (reports/bench_<name>.md) -> the script and its arguments. The bf16 rows show what a CPU with
# bf16 matmul units (AMX) gains; on one without them they are slower than fp32.
BENCHMARKS = {
    "ceiling": ["ceiling", "--repeats", "5"],
    "ceiling_bf16": ["ceiling", "--dtype", "bfloat16", "--repeats", "5"],
    "steer_generate": ["steer_generate"],
    "heal_step": ["heal_step"],
    "heal_memory_smollm2-135m": ["heal_memory", "--model", "smollm2-135m"],
    "heal_memory_gemma3-270m": ["heal_memory", "--model", "gemma3-270m"],
    "heal_target_smollm2-135m": ["heal_target", "--model", "smollm2-135m"],
    "heal_target_gemma3-270m": ["heal_target", "--model", "gemma3-270m"],
    "eval_rows": ["eval_rows"],
    "demo_round": ["demo_round"],
    "demo_round_bf16": ["demo_round", "--set", "model.dtype=bfloat16", "--out", "reports/bench_demo_round_bf16.md"],
}
GOALS = """| goal (2-core CPU, SmolLM2) | where measured |
|---|---|
| steered / plain generation >= 0.95 | bench_steer_generate |
| barrier / NLL heal step <= 1.5 | bench_heal_step |
| a demo round <= 4 min | bench_demo_round |
| 132-row eval at 32 think tokens <= 2 min | bench_eval_rows |
| peak RSS <= 4 GB | bench_demo_round |
| generation stage >= 50% of the measured ceiling | bench_ceiling |
| (no goal) the same in bf16 | bench_ceiling_bf16, bench_demo_round_bf16 |
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip", nargs="*", default=[], choices=BENCHMARKS)
    args = parser.parse_args()
    here = Path(__file__).parent
    sections = []
    for name in BENCHMARKS:
        report = Path("reports") / f"bench_{name}.md"
        if name not in args.skip:
            started = time.perf_counter()
            script, *script_args = BENCHMARKS[name]
            subprocess.run([sys.executable, str(here / f"{script}.py"), *script_args], check=True)
            print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
        if report.is_file():
            sections.append(report.read_text().replace("\n# ", "\n## ").replace("# ", "## ", 1))
    header = (
        f"# Benchmarks\n\n`python bench/all.py` ({time.strftime('%Y-%m-%d')}). Machine: {machine_line()}.\n"
        "Each section below is also a file `reports/bench_<name>.md`, written by `bench/<name>.py`.\n\n"
        f"{GOALS}\n"
    )
    Path("reports/bench.md").write_text(header + "\n".join(sections))


if __name__ == "__main__":
    main()
