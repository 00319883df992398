"""Shared by the benchmark scripts: the machine line every report starts with, and peak RSS."""

from __future__ import annotations

import platform
import resource
import subprocess
from pathlib import Path

import torch


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_line() -> str:
    cores = len(Path("/proc/cpuinfo").read_text().split("processor\t")) - 1
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return (
        f"{cpu_name()} ({cores} cores), {gpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"commit {commit or 'unknown'}"
    )


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
