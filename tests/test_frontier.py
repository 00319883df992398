"""frontier: interpolation on a known curve, a zero gain for a point on the curve, the base at dose 0, and the
analysis end to end on the smoke run."""

from __future__ import annotations

import json
import math
import shutil

import pytest

import analyses.frontier
from analyses.frontier import (
    DOSE_LADDER,
    CurvePoint,
    crossing,
    healing_gain,
    interpolate,
    ladder_prefix,
    run_frontier,
)
from interp_heal.config import load_config
from interp_heal.evaluate import neutral_coherence, neutral_fluency, trait_log_odds
from interp_heal.paired_items import readout_items
from interp_heal.questions import heading
from interp_heal.steer import SteeringVector


def _point(dose: float, trait: float, fluency: float, n_items: int = 20) -> CurvePoint:
    # per-item values spread around the mean, mean exactly `trait`
    per_item = [trait + 0.1 * ((i % 5) - 2) for i in range(n_items)]
    return CurvePoint(dose, trait, fluency, 0.0, per_item)


CURVE = [_point(0.0, 0.6, 1.0), _point(1.0, 0.8, 0.9), _point(2.0, 1.0, 0.7), _point(4.0, 1.2, 0.4)]


def test_interpolation_is_exact_on_a_linear_segment():
    fluencies, traits = [p.neutral_fluency for p in CURVE], [p.trait for p in CURVE]
    assert interpolate(fluencies, traits, 0.8, falling=True) == pytest.approx(0.9)  # halfway between 0.9 and 0.7
    assert interpolate(traits, fluencies, 1.1, falling=False) == pytest.approx(0.55)
    assert crossing(fluencies, traits, 0.3, falling=True) is None
    assert math.isnan(interpolate(fluencies, traits, 0.3, falling=True))


def test_a_point_on_the_curve_has_zero_gain_and_a_point_above_it_a_positive_one():
    on_curve = healing_gain(CURVE, CURVE[2], n_bootstrap=200)
    assert on_curve["trait_gain"] == pytest.approx(0.0, abs=1e-9) and on_curve["ci95"] == pytest.approx([0, 0])
    assert on_curve["fluency_gain"] == pytest.approx(0.0, abs=1e-9)
    above = healing_gain(CURVE, _point(math.nan, 1.1, 0.8), n_bootstrap=200)
    assert above["trait_gain"] == pytest.approx(0.2) and above["ci95"][0] > 0
    assert above["fluency_gain"] == pytest.approx(0.8 - 0.55)
    outside = healing_gain(CURVE, _point(math.nan, 1.5, 0.2), n_bootstrap=100)
    assert math.isnan(outside["trait_gain"]) and "spans fluency" in outside["note"]


def test_a_stored_curve_is_reused_only_where_it_holds_every_dose_a_fresh_one_would_measure():
    ladder = [_point(float(d), 0.6 + 0.1 * i, 1.0 - 0.05 * i) for i, d in enumerate(DOSE_LADDER)]  # fluency to 0.70
    extended = [*ladder, _point(4.0, 1.3, 0.6), _point(8.0, 1.4, 0.5)]  # stopped below its own floor, 0.55
    assert ladder_prefix(extended, floor=0.75) == ladder  # the ladder already ends below 0.75
    assert ladder_prefix(extended, floor=0.65) == extended[:8]  # one doubling, to 0.6
    assert ladder_prefix(extended, floor=0.45) is None  # would go on doubling past the stored 0.5
    capped = [*extended, _point(16.0, 1.5, 0.5)]  # MAX_EXTRA_DOSES reached: a fresh curve stops there too
    assert ladder_prefix(capped, floor=0.45) == capped


@pytest.fixture(scope="module")
def frontier(smoke_run):
    return run_frontier(smoke_run)


def test_frontier_of_the_smoke_run(smoke_run, frontier, tiny_model, tokenizer):
    assert [r["round"] for r in frontier] == [0, 1]
    for result in frontier:
        doses = [p["dose"] for p in result["curve"]]
        assert len(doses) >= len(DOSE_LADDER) >= 7 and doses == sorted(doses) and doses[0] == 0.0
        assert set(result["gain"]) == {"trait_gain", "ci95", "fluency_gain", "note"}
    # Round 0 starts from the base: at dose 0 the curve is the base's own readouts.
    config = load_config(smoke_run / "config.yaml")
    base = json.loads((smoke_run / "eval_base.json").read_text())
    dose_zero = frontier[0]["curve"][0]
    assert dose_zero["trait"] == pytest.approx(base["trait"]["log_odds"], abs=1e-5)
    assert dose_zero["neutral_fluency"] == pytest.approx(1.0) and dose_zero["kl_rmse"] == pytest.approx(0.0, abs=1e-6)
    recomputed = trait_log_odds(tiny_model, tokenizer, readout_items(config.persona), config.eval)
    assert recomputed["log_odds"] == pytest.approx(dose_zero["trait"], abs=1e-5)
    nll = neutral_coherence(tiny_model, tokenizer, config.eval)["neutral_nll"]
    assert neutral_fluency(nll, base["neutral_nll"]) == pytest.approx(1.0)
    assert heading("steering_less") in (smoke_run / "summary.md").read_text()
    assert (smoke_run / "analysis" / "frontier.json").is_file()


def test_round_zero_copied_from_another_run_shares_its_curve(smoke_run, frontier, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(smoke_run, copy, ignore=shutil.ignore_patterns("analysis"))
    measured: list[float] = []
    real_curve = analyses.frontier.steering_curve

    def counted(*args, **kwargs):
        measured.append(args[6])  # the eval dose each fresh curve is measured at
        return real_curve(*args, **kwargs)

    monkeypatch.setattr(analyses.frontier, "steering_curve", counted)
    shared = run_frontier(copy, others=[smoke_run, copy])
    assert shared[0]["curve"] == frontier[0]["curve"] and shared[0]["curve_from"] == str(smoke_run)
    assert len(measured) == 1 and shared[1]["curve_from"] is None  # round 1 starts from the copy's own student
    assert shared[0]["gain"] == frontier[0]["gain"]
    # Another vector in round 0: its curve is measured, never borrowed.
    vector = SteeringVector.load(copy / "round_00" / "vector.safetensors")
    vector.scaled(2.0).save(copy / "round_00" / "vector.safetensors")
    (copy / "analysis" / "frontier_round_00.json").unlink()
    assert run_frontier(copy, rounds=[0], others=[smoke_run])[0]["curve_from"] is None and len(measured) == 2
