"""The controls report (issue 22): every arm against the base steering curve, Q4 and Q5, on a smoke sweep."""

import csv
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from analyses.controls import arm_kind, distributions_minus_samples, glance, seed_anchors, stopped_runs, verdicts
from analyses.experiments import Run, seed_group
from analyses.frontier import CurvePoint, healing_gain
from cli import app
from interp_heal.config import load_config
from interp_heal.evaluate import neutral_fluency, paired_difference
from interp_heal.questions import heading

SMOKE = Path("configs/smoke.yaml").resolve()


def _sweep(tmp_path: Path) -> Path:
    path = tmp_path / "controls.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(SMOKE), "runs_dir": str(tmp_path / "runs"),
        "overrides": ["loop.rounds=1", "heal.lr=0.02"],
        "anchor": "steer_tokens", "report": "controls", "report_dir": str(tmp_path / "report"),
        "runs": {"steer_tokens": [], "prompt_tokens": ["loop.source=prompt"]}, "frontier": ["steer_tokens"],
    }, sort_keys=False))  # fmt: skip
    return path


def _healed(run: Path) -> tuple[dict, CurvePoint]:
    result = json.loads((run / "round_00" / "eval_healed.json").read_text())
    base_nll = json.loads((run / "eval_base.json").read_text())["neutral_nll"]
    trait = result["trait"]
    point = CurvePoint(0.0, trait["log_odds"], neutral_fluency(result["neutral_nll"], base_nll), 0.0, trait["per_item"])
    return trait, point


def test_the_controls_sweep_reports_every_arm_against_the_base_steering_curve(tmp_path):
    result = CliRunner().invoke(app, ["sweep", "-c", str(_sweep(tmp_path))])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "report" / "controls.md").read_text()
    assert heading("steering_less") in report and heading("steering_needed") in report
    assert heading("samples_or_distributions") in report
    assert "| steer x tokens | 0 | 1 |" in report and "| prompt x tokens | 0 | 1 |" in report, "the 2 x 2 at a glance"
    assert "| `steer_tokens` | steer x tokens | 0 |" in report and "| `prompt_tokens` | prompt x tokens | 0 |" in report
    assert (tmp_path / "report" / "pareto.html").is_file()

    runs = tmp_path / "runs"
    frontier = json.loads((runs / "steer_tokens" / "analysis" / "frontier_round_00.json").read_text())
    curve = [CurvePoint(**point) for point in frontier["curve"]]
    steer_trait, steer_point = _healed(runs / "steer_tokens")
    prompt_trait, prompt_point = _healed(runs / "prompt_tokens")
    # Round 0's own frontier is the base steering curve, so both gain columns of Q4 must agree.
    q4 = next(line for line in report.splitlines() if line.startswith("| `steer_tokens` | 0 |"))
    assert q4.split(" | ")[3] == q4.split(" | ")[-1].removesuffix(" |")
    gain = healing_gain(curve, prompt_point, 2000)
    row = next(line for line in report.splitlines() if line.startswith("| `prompt_tokens` | prompt x tokens | 0 |"))
    expected = f"{gain['trait_gain']:+.3f}" if not gain["note"] else "not spanned"
    assert expected in row.split(" | ")[-1]
    with (tmp_path / "report" / "gains.csv").open() as handle:
        committed = {(row["run"], int(row["round"])): row for row in csv.DictReader(handle)}
    assert float(committed[("prompt_tokens", 0)]["trait_gain"]) == pytest.approx(gain["trait_gain"], nan_ok=True)
    assert committed[("prompt_tokens", 0)]["note"] == gain["note"]
    diff = paired_difference(prompt_trait, steer_trait, 2000)
    assert f"| `prompt_tokens` | `steer_tokens` | 0 | {diff['diff']:+.3f} [" in report
    assert steer_point.trait == frontier["healed"]["trait"]
    base_adherence = json.loads((runs / "steer_tokens" / "eval_base.json").read_text())["adherence"]["pmi"]
    healed_adherence = json.loads((runs / "steer_tokens" / "round_00" / "eval_healed.json").read_text())["adherence"]
    assert heading("adherence") in report
    assert f"- `steer_tokens`: adherence {healed_adherence['pmi']:.3f} -> {healed_adherence['pmi']:.3f} over rounds " \
           f"0-0 (base {base_adherence:.3f}, prompting baseline " in report  # fmt: skip


def _run(name: str, tmp_path: Path) -> Run:
    return Run(name, load_config(SMOKE, [f"output.name={name}", f"output.runs_dir={tmp_path}"]), [], [], [])


def test_verdicts_bucket_rounds_by_their_interval(tmp_path, monkeypatch):
    curve = [CurvePoint(d, 0.1 * d, 1.0 - 0.1 * d, 0.0, [0.1 * d] * 4) for d in range(5)]
    points = {0: CurvePoint(0, 0.5, 0.9, 0.0, [0.5, 0.5, 0.5, 0.5]),  # curve: 0.1 at 0.9 -> above
              1: CurvePoint(0, 0.1, 0.9, 0.0, [0.0, 0.2, 0.0, 0.2]),  # on the curve, items spread around it
              2: CurvePoint(0, 0.1, 0.2, 0.0, [0.1] * 4)}  # fluency 0.2 is below the curve's range  # fmt: skip
    monkeypatch.setattr("analyses.controls.student_point", lambda run, r: points[r])
    monkeypatch.setattr(Run, "rounds", lambda self: [0, 1, 2])
    monkeypatch.setattr("analyses.controls.curve_for", lambda run, anchors: curve)
    line = verdicts({"arm": _run("arm", tmp_path)}, {}, "steer")[0]
    assert healing_gain(curve, points[0], 200)["ci95"][0] > 0
    assert line == "- `arm`: above the curve (CI > 0) in rounds 0; on it (CI spans 0) in rounds 1; outside its " \
                   "fluency range in rounds 2."  # fmt: skip


def test_each_arm_is_read_against_the_anchor_of_its_own_seed():
    """A seed variant (even one planned for fewer rounds) anchors the arms of its seed: their base curve and their
    Q5 reference come from the same seed's vector and data, never another seed's."""

    def run(name: str, *overrides: str) -> Run:
        return Run(name, load_config(SMOKE, list(overrides)), [], [], [])

    seed = load_config(SMOKE).seed
    runs = {"steer": run("steer"), "prompt": run("prompt", "loop.source=prompt"),
            "steer_seed9": run("steer_seed9", "seed=9", "loop.rounds=1"),
            "prompt_seed9": run("prompt_seed9", "seed=9", "loop.source=prompt")}  # fmt: skip
    anchors = seed_anchors(runs, "steer")
    assert {key: value.name for key, value in anchors.items()} == {seed: "steer", 9: "steer_seed9"}
    assert [member.name for member in seed_group(runs, "steer")] == ["steer", "steer_seed9"]


def test_the_glance_pools_each_cells_seeds_and_leaves_other_arms_out():
    def run(name: str, trait: float, *overrides: str) -> Run:
        row = {"stage": "healed 0", "round": 0, "trait_log_odds": trait, "neutral_fluency": 0.9, "adherence": 0.5,
               "reply_trait": trait / 4}  # fmt: skip
        return Run(name, load_config(SMOKE, list(overrides)), [row], [], [])

    runs = {"steer": run("steer", 0.8), "steer_seed9": run("steer_seed9", 1.0, "seed=9", "loop.rounds=1"),
            "prompt_logits": run("prompt_logits", 0.6, "loop.source=prompt", "heal.target=logits"),
            "steer_offprompt": run("steer_offprompt", 5.0, "filter.min_adherence=0.45"),
            "steer_n10": run("steer_n10", 5.0, "heal.max_examples=10")}  # fmt: skip
    gains = {(name, 0): {"note": "", "trait_gain": gain}
             for name, gain in {"steer": 0.1, "steer_seed9": 0.3, "prompt_logits": -0.2}.items()}  # fmt: skip
    gains |= {("steer_offprompt", 0): None, ("steer_n10", 0): None}
    lines = glance(runs, runs["steer"], gains)
    rows = [line for line in lines if line.startswith("| steer x") or line.startswith("| prompt x")]
    assert rows == [
        "| steer x tokens | 0 | 2 | 0.900 [0.800, 1.000] | 0.225 [0.200, 0.250] | 0.900 [0.900, 0.900] | "
        "0.500 [0.500, 0.500] | +0.200 [+0.100, +0.300] |",
        "| prompt x logits | 0 | 1 | 0.600 | 0.150 | 0.900 | 0.500 | -0.200 |",
    ], "the filter variant and the 10-example arm are not cells of the 2 x 2"


def test_arms_the_loop_stopped_are_listed_with_its_reason(tmp_path):
    starved = Run("dosed", load_config(SMOKE), [], [], [], stopped="round 2 starved: only 18 completions kept")
    assert stopped_runs({"steer": _run("steer", tmp_path), "dosed": starved}) == [
        "Stopped by the loop before their planned rounds:", "", "- `dosed`: round 2 starved: only 18 completions kept",
        "",
    ]  # fmt: skip
    assert stopped_runs({"steer": _run("steer", tmp_path)}) == []


def test_the_logits_arm_is_paired_with_its_tokens_twin_not_a_variant_with_the_same_kept_count(monkeypatch):
    """A barrier or filter variant trained on as many examples as the tokens arm must not stand in for it."""
    traits = {"steer": 0.8, "steer_p95": 0.5, "steer_logits": 1.0}

    def run(name: str, *overrides: str) -> Run:
        row = {"stage": "healed 0", "round": 0, "neutral_fluency": 0.9}
        return Run(name, load_config(SMOKE, [f"output.name={name}", *overrides]), [row], [], [])

    monkeypatch.setattr("analyses.controls.eval_json", lambda r, stage: {"trait": {"per_item": [traits[r.name]] * 4}})
    runs = [run("steer"), run("steer_logits", "heal.target=logits", "loop.rounds=1"),
            run("steer_p95", "heal.agg=p95", "heal.tau=1.02")]  # fmt: skip
    rows = [(arm_kind(r), 57, r.name, r) for r in runs]
    table = [line for line in distributions_minus_samples(rows) if line.startswith("| steer |")]
    assert table == ["| steer | 57 | +0.200 [+0.200, +0.200] | +0.000 |"]
    assert distributions_minus_samples([row for row in rows if row[2] != "steer"]) == [], "no twin, no row"
