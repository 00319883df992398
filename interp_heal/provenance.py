"""What produced a result: the code version, the library versions and the machine.

The loop records this at every process start of a run (`run_start` in events.jsonl), so a report can say which
commit computed which stages instead of asserting it. Results differ across CPUs in the last float digits
(~1e-5 relative), so the machine is part of the record.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from functools import cache
from pathlib import Path

import torch

LIBRARIES = ("torch", "transformers", "peft", "nnsight")
_CHECKOUT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(_CHECKOUT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version() -> dict[str, object]:
    """The checkout's commit and whether tracked files differ from it; both None outside a git checkout of this
    project (an installed package), rather than the commit of whatever repository happens to contain it."""
    toplevel = _git("rev-parse", "--show-toplevel")
    if toplevel is None or Path(toplevel).resolve() != _CHECKOUT:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": _git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown"


def machine() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{cpu_name()} ({platform.machine()})"


@cache
def _loaded_code_version() -> dict[str, object]:
    # Read once per process: a long sweep keeps running the code it imported while commits move HEAD on.
    return code_version()


def provenance() -> dict[str, object]:
    """The code this process loaded (the checkout's state at the first call), library versions, machine."""
    versions = {name: importlib.metadata.version(name) for name in LIBRARIES}
    return {**_loaded_code_version(), "versions": versions, "machine": machine()}


def code_label(record: dict[str, object] | None) -> str:
    """Short form for reports: 'abc1234', 'abc1234+dirty', 'no git', or 'unrecorded' (runs before provenance)."""
    if record is None:
        return "unrecorded"
    commit = record.get("commit")
    if not commit:
        return "no git"
    return f"{str(commit)[:7]}{'+dirty' if record.get('dirty') else ''}"
