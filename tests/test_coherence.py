"""One name per coherence quantity (issue 26): metrics columns, the floor's quantity, and the old names on read.

`tests/fixtures/legacy_run` holds evals in the layout written before the rename (the MFV answer mass stored as
`coherence`), a sweep table with the old `loop_coherence` / `coherence` columns, and a frontier with the fluency
named `coherence`.
"""

import csv
import math
from pathlib import Path

import pytest

from analyses.experiments import Run, reproduction_section
from analyses.frontier import CurvePoint, healing_gain
from interp_heal.coherence import COHERENCE_COLUMNS, coherence_columns, floor_value, read_frontier, renamed_columns
from interp_heal.config import load_config
from interp_heal.errors import ConfigError, DataError
from interp_heal.report import METRIC_FIELDS, metric_rows, summary_markdown

LEGACY = Path("tests/fixtures/legacy_run")
SMOKE = Path("configs/smoke.yaml")


def test_every_metrics_column_names_one_quantity():
    assert set(COHERENCE_COLUMNS) <= set(METRIC_FIELDS)
    assert "coherence" not in METRIC_FIELDS and "loop_coherence" not in METRIC_FIELDS


def test_a_run_folder_written_before_the_rename_still_reports():
    config = load_config(SMOKE, ["loop.rounds=1"])
    rows = {row["stage"]: row for row in metric_rows(LEGACY, config)}
    healed = rows["healed 0"]
    assert healed["mfv_answer_mass"] == pytest.approx(0.58)
    assert healed["neutral_fluency"] == pytest.approx(math.exp(2.797 - 2.819))
    assert rows["base"]["neutral_fluency"] == 1.0 and math.isnan(healed["adherence_share"])
    summary = summary_markdown(list(rows.values()), LEGACY, config, {})
    assert "| stage | trait log-odds [95% CI] | neutral fluency |" in summary


def test_the_floor_reads_the_quantity_loop_coherence_names():
    base = {"neutral_nll": 2.0, "coherence": 0.7}
    healed = {"neutral_nll": 2.0 + math.log(2), "mfv_answer_mass": 0.3}
    assert floor_value(load_config(SMOKE), healed, base) == pytest.approx(0.5)
    assert floor_value(load_config(SMOKE, ["loop.coherence=mfv"]), healed, base) == pytest.approx(0.3)
    # An eval from before the rename: the old key is the MFV mass.
    assert floor_value(load_config(SMOKE, ["loop.coherence=mfv"]), base, base) == pytest.approx(0.7)
    with pytest.raises(DataError, match=r"eval\.mfv=false"):
        floor_value(load_config(SMOKE, ["loop.coherence=mfv"]), {"neutral_nll": 2.0}, base)
    assert math.isnan(coherence_columns({}, base)["neutral_fluency"])


def test_an_old_sweep_table_compares_under_the_new_names():
    with (LEGACY / "experiments.csv").open() as handle:
        row = renamed_columns(next(csv.DictReader(handle)))
    assert row["neutral_fluency"] == "0.978" and row["mfv_answer_mass"] == "0.58"
    assert "loop_coherence" not in row and "coherence" not in row
    assert renamed_columns({"loop_coherence": "0.4"}, load_config(SMOKE, ["loop.coherence=mfv"])) == {
        "mfv_answer_mass": "0.4"
    }
    config = load_config(SMOKE, ["output.name=rmse_base"])
    run = Run("rmse_base", config, [{"stage": "healed 0", "round": 0, "trait_log_odds": 0.9, "neutral_fluency": 0.9}],
              [], [])  # fmt: skip
    table = reproduction_section({"rmse_base": run}, LEGACY / "experiments.csv")
    assert "| 0 | 1 | 0.007 (`rmse_base`) | 0.078 (`rmse_base`) |" in table


def test_a_floor_on_a_readout_that_does_not_run_is_refused_before_the_run():
    for overrides, readout in ((["loop.coherence=mfv", "eval.mfv=false"], "eval.mfv"),
                               (["loop.coherence=adherence", "eval.adherence=false"], "eval.adherence")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"needs {readout}=true"):
            load_config(SMOKE, overrides)


def test_a_frontier_written_before_the_rename_reads_and_reports_as_fluency():
    result = read_frontier(LEGACY / "analysis" / "frontier_round_00.json")
    assert result["healed"]["neutral_fluency"] == 0.9 and result["gain"]["fluency_gain"] == 0.15
    assert "coherence" not in result["curve"][0] and "coherence_gain" not in result["gain"]
    curve = [CurvePoint(**point) for point in result["curve"]]
    gain = healing_gain(curve, CurvePoint(**result["healed"]), n_bootstrap=50)
    assert gain["trait_gain"] == pytest.approx(0.95 - 0.8)  # the curve's trait at fluency 0.9 is dose 1's
    assert read_frontier(LEGACY / "analysis" / "frontier.json") == [result]
    config = load_config(SMOKE, ["loop.rounds=1"])
    summary = summary_markdown(metric_rows(LEGACY, config), LEGACY, config, {})
    assert "| 0 | 3 | 0.950 / 0.900 | 0.150 [0.100, 0.200]  | 0.150 |" in summary
