"""The trait readout's items: scenarios, each with a reply that acts out the pos persona and one that acts out
the neg persona.

Built-in items ship for the `love` and `authority` axes; `persona.pairs: PATH` (JSONL, one object a line with
`scenario`, `pos`, `neg` and an optional `id`) replaces them or supplies them for any other axis. A file is read
and checked completely before any model loads, so a typo costs a second, not a run.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path

from interp_heal.config import PersonaConfig
from interp_heal.errors import DataError
from interp_heal.io import atomic_write_text

MIN_ITEMS = 12  # below this the bootstrap interval over items is too wide to decide anything
FIELDS = ("scenario", "pos", "neg")


@dataclass(frozen=True)
class PairedItem:
    id: str
    scenario: str
    pos: str
    neg: str


@dataclass(frozen=True)
class ReadoutItems:
    """The items a run's trait readout scores, and where they came from (recorded in every eval JSON)."""

    axis: str
    items: tuple[PairedItem, ...]
    source: str  # "builtin:<axis>" or the file's path
    sha256: str  # of the items' canonical JSON, so the same items from any file hash alike

    def provenance(self) -> dict[str, object]:
        return {"items_source": self.source, "items_sha256": self.sha256, "n_items": len(self.items)}


def items_sha256(items: tuple[PairedItem, ...]) -> str:
    canonical = json.dumps([[i.id, i.scenario, i.pos, i.neg] for i in items], ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _parse_line(line: str, where: str) -> dict[str, str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg}); each line must be one JSON object") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with {list(FIELDS)}, got {type(row).__name__}")
    for key in FIELDS:
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} (each item needs {list(FIELDS)}, optional 'id')")
        if not isinstance(row[key], str) or not row[key].strip():
            raise DataError(f"{where}: field {key!r} must be non-empty text")
    if "id" in row and (not isinstance(row["id"], str | int) or not str(row["id"]).strip()):
        raise DataError(f"{where}: field 'id' must be non-empty text or a number")
    return row


def parse_items(text: str, source: str, prefix: str = "item") -> tuple[PairedItem, ...]:
    """Items from JSONL text; every problem is a DataError naming `source` and the line."""
    items: list[PairedItem] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        row = _parse_line(line, where)
        item_id = str(row.get("id", f"{prefix}-{len(items) + 1:03d}")).strip()
        if item_id in seen:
            raise DataError(f"{where}: duplicate id {item_id!r} (first on line {seen[item_id]}); ids must be unique")
        seen[item_id] = number
        items.append(PairedItem(item_id, row["scenario"].strip(), row["pos"].strip(), row["neg"].strip()))
    if len(items) < MIN_ITEMS:
        raise DataError(
            f"{source}: {len(items)} paired items, need at least {MIN_ITEMS} for a readout with a usable interval"
        )
    return tuple(items)


def load_items_file(path: str | Path, axis: str) -> ReadoutItems:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"persona.pairs file not found: {path} (a JSONL file of scenario/pos/neg items)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; persona.pairs must be a JSONL file") from None
    items = parse_items(text, str(path), prefix=axis)
    return ReadoutItems(axis, items, str(path), items_sha256(items))


@cache
def builtin_items(axis: str) -> ReadoutItems:
    resource = files("interp_heal").joinpath("data", f"paired_{axis}.jsonl")
    if not resource.is_file():
        raise DataError(
            f"no built-in paired-response items for axis {axis!r} (built-in: {sorted(builtin_axes())}); "
            "give your own with persona.pairs=PATH, or draft them with `cli.py pairs`"
        )
    items = parse_items(resource.read_text(encoding="utf-8"), f"interp_heal/data/paired_{axis}.jsonl")
    return ReadoutItems(axis, items, f"builtin:{axis}", items_sha256(items))


def builtin_axes() -> list[str]:
    names = (entry.name for entry in files("interp_heal").joinpath("data").iterdir())
    return [name[len("paired_") : -len(".jsonl")] for name in names if re.fullmatch(r"paired_\w+\.jsonl", name)]


def readout_items(config: PersonaConfig) -> ReadoutItems:
    """The items a config's readout scores: its `pairs` file when set, else the axis' built-in items."""
    return load_items_file(config.pairs, config.axis) if config.pairs else builtin_items(config.axis)


def normalise_prompt(text: str) -> str:
    """Case, white space and punctuation removed: how two prompts are compared for leakage."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def overlapping_ids(items: ReadoutItems, prompts: list[str]) -> list[str]:
    """Ids of items whose scenario is also one of `prompts` (the student trains on those prompts' completions,
    so scoring it there measures recall, not a trait)."""
    seen = {normalise_prompt(prompt) for prompt in prompts}
    return [item.id for item in items.items if normalise_prompt(item.scenario) in seen]


def write_items(path: Path, items: list[PairedItem]) -> None:
    rows = ({"id": i.id, "scenario": i.scenario, "pos": i.pos, "neg": i.neg} for i in items)
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
