"""Pooling an arm's seeds across committed sweep pages (`analyses/pooled.py`): only committed files are read."""

import csv
import math
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from analyses.pooled import ANCHOR_LABEL, PageRun, arm_label, merged, read_page, write_pooled_report
from cli import app
from interp_heal.config import load_config
from interp_heal.errors import DataError
from interp_heal.sweep import load_sweep, sweep_configs

SMOKE = Path("configs/smoke.yaml").resolve()
FIELDS = [
    "run",
    "stage",
    "round",
    "trait_log_odds",
    "neutral_fluency",
    "adherence",
    "generation_keep_rate",
    "reply_trait",
]


def _page(tmp_path: Path, name: str, runs: dict[str, list[str]], rows: list[list], gains: list[list] = ()) -> Path:
    """A sweep file over the smoke preset and its committed page: controls.csv rows (run, stage, round, trait,
    fluency, adherence, keep-rate and, in rows that have it, the held-out trait) and, when given, gains.csv rows
    (run, round, gain)."""
    report = tmp_path / name
    report.mkdir()
    sweep = tmp_path / f"{name}.yaml"
    sweep.write_text(yaml.safe_dump({"base": str(SMOKE), "runs_dir": str(tmp_path / "runs"), "report": "controls",
                                     "report_dir": str(report), "anchor": next(iter(runs)), "runs": runs}))  # fmt: skip
    with (report / "controls.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(FIELDS)
        writer.writerows(rows)
    if gains:
        with (report / "gains.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["run", "round", "trait_gain", "ci_low", "ci_high", "fluency_gain", "note"])
            writer.writerows([[run, r, gain, gain - 0.05, gain + 0.05, "", ""] for run, r, gain in gains])
    return sweep


def _pages(tmp_path: Path) -> tuple[Path, Path]:
    first = _page(
        tmp_path, "first", {"steer": [], "steer_seed1": ["seed=1"], "prompt": ["loop.source=prompt"]},
        [["steer", "base", "", 0.5, 1.0, 0.8, 0.9], ["steer", "prompt-baseline", "", 0.7, 1.0, 0.7, 0.9],
         ["steer", "healed 0", 0, 0.8, 0.9, 0.6, 0.95, 0.3], ["steer_seed1", "base", "", 0.6, 1.0, 0.9, 0.9],
         ["steer_seed1", "healed 0", 0, 1.0, 0.8, 0.4, 0.9], ["steer_seed1", "healed 1", 1, 1.1, 0.7, 0.3, 0.9],
         ["prompt", "healed 0", 0, 0.6, 0.95, 0.7, 1.0]],
        gains=[["steer", 0, 0.1], ["steer_seed1", 0, 0.3], ["prompt", 0, -0.2]],
    )  # fmt: skip
    second = _page(
        tmp_path, "second", {"steer_seed2": ["seed=2", "eval.mfv=false"], "steer_seed1_again": ["seed=1"]},
        [["steer_seed2", "healed 0", 0, 0.9, 0.85, 0.5, 0.9],
         ["steer_seed1_again", "healed 0", 0, 1.01, 0.8, 0.4, 0.9]],
    )  # fmt: skip
    return first, second


def test_arms_are_named_by_what_they_change_not_by_seed_rounds_or_mfv():
    anchor = load_config(SMOKE)
    assert arm_label(load_config(SMOKE, ["seed=3", "loop.rounds=9", "eval.mfv=false"]), anchor) == ANCHOR_LABEL
    variant = load_config(SMOKE, ["heal.target=logits", "loop.source=prompt", "output.name=x"])
    assert arm_label(variant, anchor) == "heal.target=logits, loop.source=prompt"


def test_seeds_from_two_pages_pool_per_round_and_a_repeat_is_measured_once(tmp_path):
    first, second = _pages(tmp_path)
    report = write_pooled_report([first, second], tmp_path / "pooled", rounds=(0, 1)).read_text()
    # Round 0 of the anchor config: seeds 0, 1 (first page) and 2 (second); the second page's seed 1 is a repeat.
    # Only seed 0 has the held-out trait (a readout the other pages predate): the cell names it.
    assert f"| {ANCHOR_LABEL} | 0 | 3 (0, 1, 2) | 0.900 [0.800, 1.000] | 0.300 (seed 0) | 0.850 [0.800, 0.900] | " \
        in report  # fmt: skip
    assert f"| {ANCHOR_LABEL} | 1 | 1 (1) | 1.100 | - | 0.700 | 0.300 | 0.900 | - |" in report
    assert "| loop.source=prompt | 0 | 1 (0) | 0.600 | - | 0.950 | 0.700 | 1.000 | -0.200 |" in report
    assert "| base | - | 2 (0, 1) | 0.550 [0.500, 0.600] |" in report
    glance = report.split("## At rounds 0, 1")[1].split("## Every arm")[0]
    assert f"| {ANCHOR_LABEL} | 0.900 / 0.300 (seed 0) / 0.850 / 0.500; +0.200 [+0.100, +0.300] (seeds 0, 1, 2) | " \
           "1.100 / - / 0.700 / 0.300; - (seeds 1) |" in glance  # fmt: skip
    assert "loop.source=prompt" not in glance, "an arm that never reached the last round is left out"
    assert f"- loop.source=prompt: seed 0 `prompt` of `{tmp_path / 'first'}`" in report
    assert "largest |difference| trait_log_odds 0.0100, neutral_fluency 0.0000, adherence 0.0000" in report
    with (tmp_path / "pooled" / "pooled.csv").open() as handle:
        gain = next(row for row in csv.DictReader(handle) if row["readout"] == "vs base curve" and row["round"] == "0"
                    and row["arm"] == ANCHOR_LABEL)  # fmt: skip
    # seed 2's page has no gains.csv: the gain pools the two seeds that have one
    assert (float(gain["mean"]), int(gain["n"])) == (pytest.approx(0.2), 2)
    assert (tmp_path / "pooled" / "pooled.html").is_file()


def test_a_readout_a_page_lacks_comes_from_a_later_page_of_the_same_seed():
    config = load_config(SMOKE)
    old = PageRun(Path("old"), "steer", config, {"healed 0": {"trait_log_odds": "0.9", "reply_trait": ""}})
    rows = {"healed 0": {"trait_log_odds": "0.8", "reply_trait": "0.1"},
            "healed 1": {"trait_log_odds": "1.0", "reply_trait": "0.2"}}  # fmt: skip
    new = PageRun(Path("new"), "steer", config, rows)
    both = merged([old, new])
    assert both.rows["healed 0"] == {"trait_log_odds": "0.9", "reply_trait": "0.1"}  # the first page's trait kept
    assert both.rows["healed 1"]["reply_trait"] == "0.2" and old.rows["healed 0"]["reply_trait"] == ""


def test_a_rerun_that_went_further_adds_its_later_rounds(tmp_path):
    first = _page(tmp_path, "first", {"steer": []}, [["steer", "healed 0", 0, 0.8, 0.9, 0.6, 0.95]])
    second = _page(tmp_path, "second", {"steer_again": []},
                   [["steer_again", "healed 0", 0, 0.7, 0.9, 0.6, 0.95],
                    ["steer_again", "healed 1", 1, 1.2, 0.8, 0.5, 0.95]])  # fmt: skip
    report = write_pooled_report([first, second], tmp_path / "pooled", rounds=(1, 0)).read_text()
    assert f"| {ANCHOR_LABEL} | 0 | 1 (0) | 0.800 |" in report, "round 0 from the first page"
    assert f"| {ANCHOR_LABEL} | 1 | 1 (0) | 1.200 |" in report, "round 1 only the rerun has"
    assert "## At rounds 0, 1" in report
    assert "largest |difference| trait_log_odds 0.1000" in report
    assert "(rounds 0-0); seed 0 `steer_again`" in report


def test_a_page_and_sweep_that_disagree_or_an_unreported_sweep_are_errors(tmp_path):
    sweep = _page(tmp_path, "page", {"steer": []}, [["elsewhere", "healed 0", 0, 1.0, 1.0, 1.0, 1.0]])
    with pytest.raises(DataError, match="does not define"):
        read_page(sweep)
    (tmp_path / "page" / "controls.csv").unlink()
    with pytest.raises(DataError, match="--report-only"):
        read_page(sweep)


def test_the_cli_writes_the_pooled_page(tmp_path):
    first, second = _pages(tmp_path)
    result = CliRunner().invoke(app, ["pooled", "-c", str(first), "-c", str(second), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "pooled.md").is_file()


@pytest.mark.parametrize("page", sorted(path.parent for path in Path("reports").glob("*/gains.csv")))
def test_committed_gains_match_their_page(page: Path):
    """A page's gains.csv is what its controls.md table shows, row for row both ways (pages older than gains.csv had
    theirs transcribed from that table after their run folders were gone: this keeps the transcription honest). The
    table lists the arms trained on all their data; gains.csv every arm. A '-' (no base curve for that seed on the
    page, as for seed 1 of controls_heldout, which ran no frontier) has no row, and a run has rows for all its rounds or
    for none: a round outside the curve's range is "not spanned", never '-'."""
    every_arm_row = re.compile(r"\| `(\w+)` \| \w+ x \w+ \| (\d+) \| .* \| ([^|]+) \|$")
    rows = [m for line in (page / "controls.md").read_text().splitlines() if (m := every_arm_row.match(line))]
    table = {(m[1], int(m[2])): None if m[3].strip() == "-" else m[3].strip() for m in rows}
    with (page / "gains.csv").open() as handle:
        committed = {(row["run"], int(row["round"])): _cell(row) for row in csv.DictReader(handle)}
    assert any(table.values()) and {key: committed.get(key) for key in table} == table
    assert not {run for (run, _), cell in table.items() if cell is None} & {run for run, _ in committed}  # all or none
    sweeps = [sweep for sweep in Path("configs").glob("controls*.yaml") if Path(load_sweep(sweep).report_dir) == page]
    subset_arms = {name for sweep in sweeps for name, config in sweep_configs(sweep).items()
                   if config.heal.max_examples is not None}  # fmt: skip
    assert {key for key in committed if key not in table} <= {key for key in committed if key[0] in subset_arms}


def _cell(row: dict[str, str]) -> str:
    if row["note"]:
        return f"not spanned ({row['note']})"
    gain, low, high = (float(row[key]) for key in ("trait_gain", "ci_low", "ci_high"))
    assert not math.isnan(gain)
    return f"{gain:+.3f} [{low:+.3f}, {high:+.3f}]"


def test_the_committed_pooled_page_is_what_its_pages_give_today(tmp_path):
    """reports/controls_pooled is regenerated from the sweep files its own command line names: a page committed
    later (or edited) without rerunning `pooled` fails here."""
    committed = Path("reports/controls_pooled")
    command = re.search(r"`python cli\.py pooled ([^`]*) -o ", (committed / "pooled.md").read_text())
    assert command is not None
    sweeps = [Path(path) for path in re.findall(r"-c (\S+)", command[1])]
    assert len(sweeps) >= 2
    write_pooled_report(sweeps, tmp_path)
    assert (tmp_path / "pooled.csv").read_text() == (committed / "pooled.csv").read_text()
