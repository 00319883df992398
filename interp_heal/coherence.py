"""The three coherence quantities, one name and one function each, and the one the loop's floor reads.

- `neutral_fluency`: exp(base NLL - NLL) on fixed neutral answers, capped at 1 (`evaluate.neutral_fluency`);
  works at 135M.
- `mfv_answer_mass`: the probability mass MFV's answer tokens get (the benchmark's own coherence check).
- `adherence_share`: task adherence as a share of the base's (`adherence.adherence_ratio`).

`loop.coherence` names which one `loop.coh_floor` applies to (`FLOOR_COLUMN`). Before these names, eval JSONs
stored the MFV mass as `coherence` and metrics.csv had `coherence` (the MFV mass) and `loop_coherence` (the floor's
quantity); `mfv_answer_mass` reads the old key and `renamed_columns` maps an old CSV row, so earlier run folders
and sweep tables still load. Frontier files (`cli.py frontier`) likewise called neutral fluency `coherence` and
its gain `coherence_gain`; `read_frontier` renames them.
"""

from __future__ import annotations

import math
from pathlib import Path

from interp_heal.adherence import adherence_ratio
from interp_heal.config import Config
from interp_heal.errors import DataError
from interp_heal.evaluate import neutral_fluency
from interp_heal.io import read_json

COHERENCE_COLUMNS = ("neutral_fluency", "mfv_answer_mass", "adherence_share")
FLOOR_COLUMN = {"neutral": "neutral_fluency", "mfv": "mfv_answer_mass", "adherence": "adherence_share"}
LABELS = {
    "neutral_fluency": "neutral fluency",
    "mfv_answer_mass": "MFV answer mass",
    "adherence_share": "adherence / base",
}
LEGACY_MFV_KEY = "coherence"


def mfv_answer_mass(result: dict) -> float:
    """An eval's MFV answer-token mass; NaN when it ran without MFV (old evals stored it as `coherence`)."""
    value = result.get("mfv_answer_mass", result.get(LEGACY_MFV_KEY))
    return math.nan if value is None else float(value)


def coherence_columns(result: dict, base: dict) -> dict[str, float]:
    """Every coherence quantity of one eval against the base's eval (NaN where a readout did not run)."""
    fluency = math.nan
    if result.get("neutral_nll") is not None and base.get("neutral_nll") is not None:
        fluency = neutral_fluency(result["neutral_nll"], base["neutral_nll"])
    return {
        "neutral_fluency": fluency,
        "mfv_answer_mass": mfv_answer_mass(result),
        "adherence_share": adherence_ratio(result, base),
    }


def floor_column(config: Config) -> str:
    """The metrics column `loop.coh_floor` applies to."""
    return FLOOR_COLUMN[config.loop.coherence]


def floor_value(config: Config, result: dict, base: dict) -> float:
    """The quantity the loop compares with `loop.coh_floor`, in [0, 1]; a clear error where it cannot be read."""
    value = coherence_columns(result, base)[floor_column(config)]
    if math.isnan(value):
        reasons = {
            "neutral": "the eval has no neutral NLL",
            "mfv": "the eval ran without MFV (eval.mfv=false)",
            "adherence": f"base adherence {(base.get('adherence') or {}).get('pmi')} is not > 0, so a share of it "
            "means nothing on this model; use loop.coherence=neutral",
        }
        raise DataError(f"loop.coherence={config.loop.coherence}: {reasons[config.loop.coherence]}")
    return value


def renamed_columns(row: dict[str, object], config: Config | None = None) -> dict[str, object]:
    """A metrics or sweep CSV row written before the rename, with today's column names: `coherence` was the MFV
    answer mass, `loop_coherence` the floor's quantity (neutral fluency unless `config` says otherwise)."""
    renamed = dict(row)
    if "loop_coherence" in renamed:
        column = floor_column(config) if config is not None else "neutral_fluency"
        renamed.setdefault(column, renamed.pop("loop_coherence"))
    if LEGACY_MFV_KEY in renamed:
        renamed.setdefault("mfv_answer_mass", renamed.pop(LEGACY_MFV_KEY))
    return renamed


# Frontier JSON written before the rename: the points' neutral fluency and the gain at equal trait.
LEGACY_FRONTIER_KEYS = {"coherence": "neutral_fluency", "coherence_gain": "fluency_gain"}


def _renamed_keys(record: dict) -> dict:
    return {LEGACY_FRONTIER_KEYS.get(key, key): value for key, value in record.items()}


def renamed_frontier(result: dict) -> dict:
    """One round's frontier result with any old key names renamed (its curve points, healed, prompt and gain)."""
    renamed = dict(result)
    renamed["curve"] = [_renamed_keys(point) for point in result["curve"]]
    for part in ("healed", "prompt", "gain"):
        renamed[part] = _renamed_keys(result[part])
    return renamed


def read_frontier(path: Path) -> dict | list[dict]:
    """A frontier_round_XX.json (one result) or frontier.json (a list of them), in the current key names."""
    data = read_json(path, "frontier file")
    return [renamed_frontier(result) for result in data] if isinstance(data, list) else renamed_frontier(data)
