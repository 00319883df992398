"""Shared by the benchmark scripts: the machine line every report starts with, and peak RSS."""

from __future__ import annotations

import resource
from pathlib import Path

import torch

from interp_heal.provenance import code_label, code_version, cpu_name

# Matmul units that change what a "2-core CPU" can do by several-fold (the machines this project lands on
# range from 66 to over 400 GFLOP/s of fp32 GEMM, and AMX runs bf16 several times faster than fp32).
_ISA_FLAGS = {"avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}


def _cpuinfo() -> str:
    return Path("/proc/cpuinfo").read_text()


def matmul_units() -> str:
    flags = next((line.split(":", 1)[1].split() for line in _cpuinfo().splitlines() if line.startswith("flags")), [])
    return ", ".join(label for flag, label in _ISA_FLAGS.items() if flag in flags) or "no AVX-512"


def machine_line() -> str:
    cores = len(_cpuinfo().split("processor\t")) - 1
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu_name()} ({cores} cores; {matmul_units()}), {gpu}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, commit {code_label(code_version())}"
    )


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
