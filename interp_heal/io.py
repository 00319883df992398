"""Atomic file writes and JSONL helpers: a killed process never leaves half a file behind."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from interp_heal.errors import DataError


@contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` in one rename, on failure it is removed
    and `path` is left as it was. A failed write (full disk, no permission) is a DataError naming `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise DataError(f"{path}: cannot write: {err.strerror or err} ({os_error_hint(err)})") from err
    finally:
        with suppress(OSError):  # nothing to remove, or no folder to remove it from: the error above says why
            tmp.unlink()


def os_error_hint(err: OSError) -> str:
    """What to do about a failed file operation."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space and rerun: finished stages are kept"
    if err.errno == errno.ENOENT:
        return "check the path"
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a file is in the way of a folder on that path; choose another path"
    return "choose a path you can write to, or fix its permissions"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_target(path) as tmp, tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def read_text(path: Path, what: str = "file") -> str:
    """The UTF-8 text of `path`; a missing, unreadable or binary file is a DataError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found (check the path)") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a {what} (give the file's path)") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text, so not a {what} (give the right file)") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the {what} ({err.strerror or err})") from None


def read_json(path: Path, what: str = "JSON file", hint: str = "fix or restore the file") -> Any:
    """Parse a JSON file; a syntax error is a DataError naming the file and line."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: not valid JSON: {err.msg} at column {err.colno} ({hint})") from None


def jsonl_records(path: Path, what: str = "JSONL file") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a bad line is a DataError naming the file and line."""
    for number, line in enumerate(read_text(path, what).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path} line {number}: not valid JSON: {err.msg} (each line must be one JSON object)"
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path} line {number}: got a JSON {type(record).__name__} (each line must be one JSON object)"
            )
        yield number, record


def read_jsonl(path: Path, what: str = "JSONL file") -> list[dict[str, Any]]:
    return [record for _, record in jsonl_records(path, what)]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_writable(folder: Path, min_free_mb: float) -> None:
    """Fail before any work starts if `folder` cannot be created and written, or its disk is nearly full."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise DataError(
            f"{folder}: output folder is not writable: {err.strerror or err} ({os_error_hint(err)})"
        ) from None
    free_mb = shutil.disk_usage(folder).free / 2**20
    if free_mb < min_free_mb:
        raise DataError(
            f"only {free_mb:.0f} MB free on the disk of {folder}; a run needs at least {min_free_mb:.0f} MB "
            "(output.min_free_mb). Free some space or set output.runs_dir elsewhere"
        )
