"""frontier: interpolation on a known curve, a zero gain for a point on the curve, the base at dose 0, and the
analysis end to end on the smoke run."""

from __future__ import annotations

import json
import math

import pytest

from analyses.frontier import DOSE_LADDER, CurvePoint, crossing, healing_gain, interpolate, run_frontier
from interp_heal.config import load_config
from interp_heal.evaluate import neutral_coherence, neutral_fluency, trait_log_odds
from interp_heal.paired_items import readout_items
from interp_heal.questions import heading


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
