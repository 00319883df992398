"""Sweeps: matched runs advanced breadth-first, resumable, and the experiments report over them."""

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from analyses.answers import splice
from analyses.experiments import (
    CONTROLS_BEGIN,
    CONTROLS_END,
    ROUND_COLUMNS,
    Band,
    Run,
    aggregate_ratio,
    code_note,
    coherence_answer,
    differences,
    distilled_fraction,
    experiments_csv,
    kl_tail_section,
    reference_answer,
    reproduction_section,
    round_cells,
    round_table,
    seed_band,
    seed_group,
    tail_shape,
)
from cli import app
from interp_heal.collect import StarvedDataError
from interp_heal.config import load_config
from interp_heal.errors import ConfigError
from interp_heal.io import write_json
from interp_heal.loop import run_loop
from interp_heal.provenance import code_label, provenance
from interp_heal.questions import heading
from interp_heal.report import stop_reason
from interp_heal.run_folder import HEAL_INDEPENDENT_STAGES
from interp_heal.sweep import run_sweep, sweep_configs

SMOKE = Path("configs/smoke.yaml").resolve()


def _sweep_file(tmp_path: Path, runs: dict[str, list[str]], rounds: int = 1) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(SMOKE), "runs_dir": str(tmp_path / "runs"), "overrides": [f"loop.rounds={rounds}"],
        "runs": runs, "report_dir": str(tmp_path / "report"),
    }, sort_keys=False))  # fmt: skip
    return path


def test_sweep_configs_differ_only_in_their_overrides(tmp_path):
    configs = sweep_configs(_sweep_file(tmp_path, {"rmse_base": [], "mean_base": ["heal.agg=mean"]}))
    first, second = configs["rmse_base"], configs["mean_base"]
    assert (first.heal.agg, second.heal.agg) == ("rmse", "mean")
    assert first.model_copy(update={"heal": second.heal, "output": second.output}) == second
    assert first.loop.rounds == 1 and first.output.name == "rmse_base"


def test_the_experiments_sweep_resolves():
    configs = sweep_configs(Path("configs/experiments.yaml"))
    assert len(configs) >= 7 and all(config.loop.rounds >= 6 for config in configs.values())
    aggregates = {(config.heal.agg, config.heal.ref, config.heal.lam > 0, config.seed) for config in configs.values()}
    assert {("rmse", "base", True, 0), ("mean", "base", True, 0), ("p95", "base", True, 0)} <= aggregates
    assert {("rmse", "base", False, 0), ("rmse", "prev", True, 0), ("rmse", "base", True, 1)} <= aggregates


def test_a_bad_run_override_names_the_run(tmp_path):
    with pytest.raises(ConfigError, match=r"(?s)sweep run .broken..*heal\.lamm"):
        sweep_configs(_sweep_file(tmp_path, {"rmse_base": [], "broken": ["heal.lamm=1"]}))


def test_sweep_runs_resumes_and_reports(tmp_path):
    path = _sweep_file(tmp_path, {"rmse_base": [], "no_barrier": ["heal.lam=0"], "rmse_base_seed1": ["seed=1"]})
    runner = CliRunner()
    result = runner.invoke(app, ["sweep", "-c", str(path)])
    assert result.exit_code == 0, result.output
    for name in ("rmse_base", "no_barrier", "rmse_base_seed1"):
        assert (tmp_path / "runs" / name / "round_00" / "eval_healed.json").is_file()
    state = (tmp_path / "runs" / "no_barrier" / "state.json").read_text()
    assert _adopted(tmp_path / "runs" / "no_barrier") == set(HEAL_INDEPENDENT_STAGES)
    assert _adopted(tmp_path / "runs" / "rmse_base_seed1") == set(), "another seed shares nothing"
    result = runner.invoke(app, ["sweep", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "no_barrier" / "state.json").read_text() == state, "a finished sweep reruns nothing"
    report = (tmp_path / "report" / "experiments.md").read_text()
    assert (
        heading("beats_prompting") in report
        and heading("barrier_aggregate") in report
        and "`rmse_base` (1 of 1 rounds)" in report
    )
    assert "over 2 seed(s)" in report, "the seed variant must join the anchor's noise floor"
    assert "| 0 |" in report and "`no_barrier` trait minus the anchor's seed mean: round 0:" in report
    assert f"`rmse_base_seed1`: {code_label(provenance())}." in report, "the code that computed the runs is named"
    assert (tmp_path / "report" / "q2_barrier_aggregate.html").is_file()
    assert (tmp_path / "report" / "experiments.csv").read_text().count("\n") == 1 + 3 * 4
    rows = list(csv.DictReader((tmp_path / "report" / "experiments.csv").open()))
    healed = [row for row in rows if row["stage"].startswith("healed")]
    assert len(healed) == 3 and all(0 < float(row["adapter_write_share"]) <= 1 for row in healed)
    assert "adapter write share on v_r" in report
    earlier = tmp_path / "earlier.csv"
    earlier.write_text((tmp_path / "report" / "experiments.csv").read_text())
    splice(tmp_path / "report" / "experiments.md", [CONTROLS_BEGIN, "pooled controls answers", CONTROLS_END])
    result = runner.invoke(app, ["sweep", "-c", str(path), "--report-only", "--compare-to", str(earlier)])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "report" / "experiments.md").read_text()
    assert "| 0 | 3 | 0 (`rmse_base`) | 0 (`rmse_base`) |" in report
    assert f"{CONTROLS_BEGIN}\npooled controls answers\n{CONTROLS_END}" in report, "a rewrite keeps the answers"


def test_a_run_selected_with_only_copies_stages_from_the_sweeps_runs_already_on_disk(tmp_path):
    path = _sweep_file(tmp_path, {"rmse_base": [], "no_barrier": ["heal.lam=0"], "rmse_base_seed1": ["seed=1"]})
    runner = CliRunner()
    result = runner.invoke(app, ["sweep", "-c", str(path), "--only", "rmse_base"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "runs" / "no_barrier").exists(), "--only runs nothing else"
    result = runner.invoke(app, ["sweep", "-c", str(path), "--only", "no_barrier", "--only", "rmse_base_seed1"])
    assert result.exit_code == 0, result.output
    assert _adopted(tmp_path / "runs" / "no_barrier") == set(HEAL_INDEPENDENT_STAGES)
    assert _adopted(tmp_path / "runs" / "rmse_base_seed1") == set(), "another seed shares nothing"


def test_an_arm_starved_at_round_0_is_left_out_and_the_others_run_on(tmp_path, monkeypatch):
    path = _sweep_file(tmp_path, {"fed": [], "starves": ["heal.lam=0"]}, rounds=2)
    calls = []

    def loop(config, max_rounds, share_from):
        calls.append((config.output.name, max_rounds))
        if config.output.name == "starves":
            raise StarvedDataError("only 3 completions kept", None)
        return tmp_path / config.output.name

    monkeypatch.setattr("interp_heal.sweep.run_loop", loop)
    folders, starved = run_sweep(path)
    assert folders == {"fed": tmp_path / "fed"} and starved == {"starves": "only 3 completions kept"}
    assert calls == [("fed", 1), ("starves", 1), ("fed", 2)], "a starved arm is not tried again at the next depth"
    reported = []
    monkeypatch.setattr("cli.write_experiments_report", lambda *args: reported.append(args) or tmp_path / "r.md")
    result = CliRunner().invoke(app, ["sweep", "-c", str(path)])
    assert reported, "the report is written before the starved arm is reported"
    assert result.exit_code == 2 and "round 0 starved in 1 run(s)" in result.output
    assert "starves: only 3 completions kept" in result.output


def _adopted(run: Path) -> set[str]:
    return {name for name, entry in json.loads((run / "state.json").read_text()).items() if "adopted_from" in entry}


def _smoke(runs_dir: Path, name: str, *overrides: str):
    return load_config(SMOKE, ["loop.rounds=1", f"output.runs_dir={runs_dir}", f"output.name={name}", *overrides])


def test_which_stages_runs_share(tmp_path):
    from interp_heal.run_folder import BASE_STAGES, differs_only_in_heal, shared_stages

    one = _smoke(tmp_path, "one")
    assert differs_only_in_heal(one, _smoke(tmp_path, "three", "loop.rounds=3", "heal.max_examples=2"))
    assert shared_stages(one, _smoke(tmp_path, "three", "loop.rounds=3")) == HEAL_INDEPENDENT_STAGES
    prompted = _smoke(tmp_path, "prompted", "loop.source=prompt")
    assert not differs_only_in_heal(one, prompted)
    assert shared_stages(one, prompted) == shared_stages(prompted, one) == BASE_STAGES, "the base evals only"
    assert shared_stages(prompted, _smoke(tmp_path, "p2", "loop.source=prompt", "heal.lam=0")) == tuple(
        stage for stage in HEAL_INDEPENDENT_STAGES if stage != "round_00/vector"
    )
    assert shared_stages(one, _smoke(tmp_path, "floor", "loop.coh_floor=0.9")) == ()
    assert shared_stages(one, _smoke(tmp_path, "seed", "seed=1")) == ()


def test_copied_heal_independent_stages_end_as_if_computed(tmp_path):
    donor = run_loop(_smoke(tmp_path / "sweep", "donor"))
    sharing = run_loop(_smoke(tmp_path / "sweep", "sharing", "heal.lora_r=4"), share_from=donor)
    alone = run_loop(_smoke(tmp_path / "alone", "sharing", "heal.lora_r=4"))
    assert _adopted(sharing) == set(HEAL_INDEPENDENT_STAGES) and _adopted(alone) == set()
    for name in ("eval_base.json", "round_00/completions.jsonl", "round_00/eval_healed.json", "metrics.csv"):
        assert (sharing / name).read_bytes() == (alone / name).read_bytes(), name
    # Control: the heal itself was not copied; its rank differs, so the healed eval must too.
    assert (sharing / "round_00/eval_healed.json").read_bytes() != (donor / "round_00/eval_healed.json").read_bytes()


def test_sharing_stages_across_seeds_is_refused_before_anything_is_written(tmp_path):
    donor = run_loop(_smoke(tmp_path, "donor"), max_rounds=1)
    with pytest.raises(ConfigError, match=r"differs outside `heal`.*seed"):
        run_loop(_smoke(tmp_path, "other_seed", "seed=1"), share_from=donor)
    assert not (tmp_path / "other_seed").exists()


def _metrics_run(name: str, trait: float, coherence: float, *overrides: str) -> Run:
    config = load_config(SMOKE, [*overrides, f"output.name={name}"])
    return Run(name, config, [{"stage": "healed 0", "round": 0, "trait_log_odds": trait, "neutral_fluency": coherence}],
               [], [])  # fmt: skip


def test_arm_differences_are_judged_against_the_seed_spread_only_when_there_is_one():
    anchor, arm = _metrics_run("rmse_base", 1.00, 0.90), _metrics_run("mean_base", 0.90, 0.80, "heal.agg=mean")
    runs = {"rmse_base": anchor, "mean_base": arm}

    def judged(runs: dict[str, Run]) -> str:
        group = seed_group(runs, "rmse_base")
        noise = {key: seed_band(group, key) for key in ("trait_log_odds", "neutral_fluency")}
        return "\n".join(differences(runs, ["mean_base"], noise))

    assert "round 0: -0.100 (no noise floor: 1 seed)" in judged(runs)
    runs["rmse_base_seed1"] = _metrics_run("rmse_base_seed1", 1.02, 0.88, "seed=1")  # spread 0.02 around 1.01 / 0.89
    fluency = "neutral fluency minus the anchor's seed mean: round 0: -0.090 (beyond the seed spread 0.020)"
    assert fluency in judged(runs)
    runs["rmse_base_seed2"] = _metrics_run("rmse_base_seed2", 0.80, 0.70, "seed=2")  # now a spread of 0.22 / 0.20
    assert "trait minus the anchor's seed mean: round 0: -0.040 (within the seed spread 0.220)" in judged(runs)


def test_kl_tail_shape_is_scale_free_and_judged_against_the_seed_spread():
    shape = tail_shape({"neutral_kl_mean": 0.2, "neutral_kl_p95": 0.6, "neutral_kl_max": 3.0})
    assert shape == pytest.approx({"kl_p95_over_mean": 3.0, "kl_max_over_mean": 15.0})
    assert all(math.isnan(v) for v in tail_shape({"neutral_kl_mean": 0.0, "neutral_kl_p95": 0.0}).values())

    def tailed(name: str, p95_over_mean: float, *overrides: str) -> Run:
        run = _metrics_run(name, 1.0, 0.9, *overrides)
        run.rows[0].update(kl_p95_over_mean=p95_over_mean, kl_max_over_mean=10.0)
        return run

    runs = {"rmse_base": tailed("rmse_base", 3.0), "rmse_base_seed1": tailed("rmse_base_seed1", 3.05, "seed=1"),
            "mean_matched": tailed("mean_matched", 3.3, "heal.agg=mean", "heal.tau=0.36")}  # fmt: skip
    text = "\n".join(kl_tail_section(runs, "rmse_base", ["rmse_base", "mean_matched"]))
    assert "| 0 | 3.00, 10.0 | 3.30, 10.0 | 0.05, 0.0 (2) |" in text
    assert "`mean_matched` neutral KL p95 / mean minus the anchor's seed mean: round 0: +0.275 (beyond the seed" in text


def test_reproduction_reports_the_largest_drift_per_round(tmp_path):
    runs = {"rmse_base": _metrics_run("rmse_base", 1.00, 0.90), "seed1": _metrics_run("seed1", 0.80, 0.95, "seed=1")}
    earlier = tmp_path / "earlier.csv"
    earlier.write_text(experiments_csv(runs))
    runs["rmse_base"].rows[0]["trait_log_odds"] = 1.25  # this run drifted since
    runs["new_arm"] = _metrics_run("new_arm", 0.5, 0.5, "heal.lam=0")  # not in the earlier sweep: ignored
    text = "\n".join(reproduction_section(runs, earlier))
    assert "| 0 | 2 | 0.25 (`rmse_base`) | 0 (`rmse_base`) |" in text


def test_code_note_groups_runs_by_the_code_of_their_process_starts():
    runs = {name: replace(_metrics_run(name, 1.0, 1.0), code=code) for name, code in
            (("a", ["unrecorded", "abc1234"]), ("b", ["abc1234", "abc1234"]), ("c", ["abc1234"]))}  # fmt: skip
    assert code_note(runs).endswith("`a`: unrecorded then abc1234; `b`, `c`: abc1234.")


def test_distilled_fraction_measures_each_round_from_the_model_it_steered():
    traits = {"base": 0.5, "steered 0": 1.5, "healed 0": 1.0, "steered 1": 1.0, "healed 1": 1.0}
    rows = [{"stage": stage, "round": int(stage[-1]) if stage[-1].isdigit() else -1, "trait_log_odds": trait}
            for stage, trait in traits.items()]  # fmt: skip
    run = Run("rmse_base", load_config(SMOKE), rows, [], [])
    assert distilled_fraction(run, 0) == pytest.approx(0.5)  # half of the push from 0.5 to 1.5
    assert math.isnan(distilled_fraction(run, 1)), "a round whose steering did not move the trait has no fraction"
    assert round_cells(run, 0)[ROUND_COLUMNS.index("distilled")] == "0.50"


def test_aggregate_ratio_is_the_median_over_steps_past_the_noise_floor(tmp_path):
    log = tmp_path / "train_log.csv"
    rows = [(0.0, 0.0, 0.0), (0.001, 0.01, 0.003), (0.3, 0.4, 0.8), (0.35, 0.5, 1.1), (0.6, 0.75, 1.4)]
    log.write_text("step,kl_mean,kl_rmse,kl_p95\n" + "".join(f"{i},{m},{r},{p}\n" for i, (m, r, p) in enumerate(rows)))
    # the first two steps sit below the 0.05 floor (the student still equals the base) and would skew the ratio
    assert aggregate_ratio(log, "mean") == pytest.approx(0.75)  # median of 0.75, 0.70, 0.80
    assert aggregate_ratio(log, "p95") == pytest.approx(2.0)  # median of 2.0, 2.2, 1.867
    assert math.isnan(aggregate_ratio(log, "mean", floor=1.0)), "no step past the floor: no ratio, not a crash"


def test_q2_answer_names_the_rounds_where_rmse_held_coherence_and_mean_did_not():
    runs = {"rmse_base": _metrics_run("rmse_base", 1.00, 0.90), "mean_base": _metrics_run("mean_base", 1.10, 0.80,
            "heal.agg=mean"), "no_barrier": _metrics_run("no_barrier", 1.2, 0.7, "heal.lam=0")}  # fmt: skip
    answer = "\n".join(coherence_answer(runs, "rmse_base", list(runs)))
    assert "in no round that can be judged yet (fewer than two seeds)" in answer
    assert "no_barrier" not in answer, "Q2's answer is about the mean barrier"
    runs["rmse_base_seed1"] = _metrics_run("rmse_base_seed1", 1.02, 0.88, "seed=1")  # coherence 0.89 +- 0.02
    answer = "\n".join(coherence_answer(runs, "rmse_base", list(runs)))
    assert "did not (mean's coherence below the anchor's seeds beyond their spread) in rounds [0]" in answer
    assert "Trait: higher in rounds [0]." in answer
    assert Band(0.89, 0.88, 0.90, 2).judge(0.875) == "within" and Band(0.89, 0.89, 0.89, 1).judge(0.5) == "unjudged"


def test_q3_answer_judges_the_other_reference_and_says_why_the_loop_stopped_it():
    prev = replace(_metrics_run("rmse_prev", 1.3, 0.45, "heal.ref=prev"), stopped="coherence 0.45 < 0.5")
    runs = {"rmse_base": _metrics_run("rmse_base", 1.00, 0.90), "rmse_prev": prev,
            "rmse_base_seed1": _metrics_run("rmse_base_seed1", 1.02, 0.88, "seed=1"),
            "mean_base": _metrics_run("mean_base", 1.3, 0.5, "heal.agg=mean")}  # fmt: skip
    answer = "\n".join(reference_answer(runs, "rmse_base", list(runs)))
    assert "- `rmse_prev` (rmse KL to prev, lambda" in answer and "mean_base" not in answer, "only the other reference"
    assert "Coherence: lower in rounds [0]. Trait: higher in rounds [0]. The loop stopped it: coherence 0.45" in answer
    assert round_table(runs["rmse_prev"])[-2] == "Stopped by the loop: coherence 0.45 < 0.5."
    assert "Stopped" not in "\n".join(round_table(runs["rmse_base"]))


def test_stop_reason_reads_what_the_loop_writes_and_is_empty_for_a_run_that_was_not_stopped(tmp_path):
    assert stop_reason(tmp_path) == ""
    write_json(tmp_path / "stopped.json", {"round": 3, "reason": "healed coherence 0.366 < coh_floor 0.5"})
    assert stop_reason(tmp_path) == "healed coherence 0.366 < coh_floor 0.5"


def test_the_controls_sweep_resolves_every_arm(tmp_path):
    from interp_heal.sweep import load_sweep, sweep_configs

    configs = sweep_configs(Path("configs/controls.yaml"))
    arms = {(config.loop.source, config.heal.target) for config in configs.values()}
    assert arms == {("steer", "tokens"), ("prompt", "tokens"), ("steer", "logits"), ("prompt", "logits")}
    full = {name: config for name, config in configs.items() if config.heal.max_examples is None}
    assert len(full) == 4 and len({config.loop.rounds for config in full.values()}) == 1
    sizes = {(c.loop.source, c.heal.target, c.heal.max_examples) for c in configs.values() if c not in full.values()}
    assert sizes == {(source, target, n) for source, target in arms for n in (10, 20)}
    assert set(load_sweep(Path("configs/controls.yaml")).frontier) <= set(configs)
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: demo.yaml\nruns: {a: []}\nfrontier: [b]\n")
    (tmp_path / "demo.yaml").write_text(Path("configs/demo.yaml").read_text())
    with pytest.raises(ConfigError, match=r"frontier names runs \['b'\]"):
        sweep_configs(bad)
