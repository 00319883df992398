"""The analyses on a finished smoke run of the tiny model."""

import json

import pytest
from typer.testing import CliRunner

from analyses.diag_axis import axis_table, evaluations_from_run
from analyses.project_adapters import finished_rounds, held_out_contexts, project_adapters
from cli import app
from interp_heal.config import load_config
from interp_heal.errors import DataError
from interp_heal.loop import run_loop
from interp_heal.personas import context_prompts

runner = CliRunner()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis_runs")
    config = load_config("configs/smoke.yaml", [f"output.runs_dir={root}", "output.name=analysis", "heal.lr=0.02"])
    return run_loop(config)


def test_diag_axis_reads_a_run(smoke_run, tmp_path):
    table = axis_table(evaluations_from_run(smoke_run))
    deltas = [abs(row["delta_steered"]) for row in table.rows]
    assert deltas == sorted(deltas, reverse=True) and len(table.rows) == 7
    assert table.most_moved_by_vector == table.rows[0]["foundation"]
    result = runner.invoke(app, ["diag-axis", "--run", str(smoke_run), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "most moved: by the vector" in result.output
    assert (tmp_path / "diag_axis.json").is_file() and (tmp_path / "diag_axis.html").is_file()


def test_diag_axis_on_an_incomplete_run_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="lacks the evaluations diag-axis reads"):
        evaluations_from_run(tmp_path)


def test_held_out_contexts_exclude_extraction_contexts():
    held_out = held_out_contexts(16, used=8, seed=0)
    assert len(held_out) == 16 and not set(held_out) & set(context_prompts(8, seed=0))


def test_project_adapters_on_smoke_run(smoke_run, tmp_path):
    assert finished_rounds(smoke_run) == [0, 1]
    projection = project_adapters(smoke_run, n_prompts=8)
    assert [r["round"] for r in projection.rounds] == [0, 1]
    first = projection.rounds[0]
    assert first["vector_cos_r0"] == pytest.approx(1.0, abs=1e-6)
    for key in ("vs_prev_on_v_r", "vs_prev_on_v_0", "vs_base_on_v_0"):
        shares = first[key]["share"]
        assert len(shares) == 4 and all(0.0 <= s <= 1.0 + 1e-6 for s in shares)
    # Round 0's delta against the previous student is its delta against the base.
    assert first["vs_prev_on_v_0"]["projection"] == pytest.approx(first["vs_base_on_v_0"]["projection"])
    assert any(norm > 0 for norm in first["delta_norm"]), "a trained adapter must change the activations"
    modules = {w["module"] for w in first["weights"]}
    assert modules == {"o_proj", "down_proj"}
    assert all(0.0 <= w["write_share"] <= 1.0 + 1e-6 for w in first["weights"])
    result = runner.invoke(app, ["project-adapters", "--run", str(smoke_run), "--out", str(tmp_path),
                                 "--n-prompts", "8"])  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "project_adapters.json").read_text())
    assert len(saved["rounds"]) == 2 and (tmp_path / "project_adapters.html").is_file()
