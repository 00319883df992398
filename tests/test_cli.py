import json
import subprocess
import sys

from typer.testing import CliRunner

from cli import app
from interp_heal.io import read_jsonl

runner = CliRunner()


def test_help_lists_working_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("models", "config", "steer"):
        assert command in result.output


def test_models_lists_embedded():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert all(name in result.output for name in ("smollm2-135m", "gemma3-270m", "tiny-random"))


def test_config_prints_resolved_yaml():
    result = runner.invoke(app, ["config", "-c", "configs/smoke.yaml", "--set", "heal.lam=0.7"])
    assert result.exit_code == 0, result.output
    assert "lam: 0.7" in result.output and "spec: tiny-random" in result.output


def test_user_error_is_one_line_without_traceback():
    result = subprocess.run(
        [sys.executable, "cli.py", "config", "--set", "heal.agg=median"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: --set heal.agg=median: heal.agg:") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    debug = subprocess.run(
        [sys.executable, "cli.py", "--debug", "config", "--set", "heal.agg=median"], capture_output=True, text=True
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_steer_command_writes_vector_and_samples(tmp_path):
    result = runner.invoke(app, ["steer", "-c", "configs/smoke.yaml", "-o", str(tmp_path), "--n-samples", "2"])
    assert result.exit_code == 0, result.output
    for name in ("vector.safetensors", "vector.json", "samples.jsonl", "config.yaml"):
        assert (tmp_path / name).is_file(), name
    rows = read_jsonl(tmp_path / "samples.jsonl")
    assert sorted({row["coeff"] for row in rows}) == [0.0, 4.0] and len(rows) == 4


def test_collect_on_random_model_refuses_to_train_but_keeps_evidence(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "cli.py",
            "collect",
            "-c",
            "configs/smoke.yaml",
            "-o",
            str(tmp_path),
            "--set",
            "filter.max_tail_ppl=30",
            "--set",
            "filter.bisect_steps=0",
            "--set",
            "filter.max_batches=1",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr
    assert "error: only 0 completions kept (need min_train=2); nothing will be trained" in result.stderr
    rows = read_jsonl(tmp_path / "completions.jsonl")
    assert rows and not any(row["kept"] for row in rows)
    assert (tmp_path / "summary.json").is_file()


def test_heal_command_trains_from_a_collect_folder(tmp_path, tokenizer):
    from interp_heal.io import write_json, write_jsonl
    from tests.test_heal import _completions

    collect_dir = tmp_path / "collect"
    rows = [{**c.as_dict(), "kept": True, "kappa": 0.5, "reasons": []} for c in _completions(tokenizer)]
    rows.append({**rows[0], "kept": False, "reasons": ["repetition"]})
    write_jsonl(collect_dir / "completions.jsonl", rows)
    write_json(collect_dir / "summary.json", {"kappa": 0.5})
    result = runner.invoke(
        app, ["heal", "-c", "configs/smoke.yaml", "--from", str(collect_dir), "-o", str(tmp_path / "h")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "h" / "adapter" / "adapter_model.safetensors").is_file()
    with (tmp_path / "h" / "train_log.csv").open() as handle:
        assert len(handle.readlines()) == 1 + 3  # header + ceil(5 train / batch 2) steps (1 of 6 held out for val)


def test_heal_command_refuses_starved_folder(tmp_path):
    from interp_heal.io import write_json, write_jsonl

    write_jsonl(tmp_path / "completions.jsonl", [])
    write_json(tmp_path / "summary.json", {"kappa": 1.0})
    result = subprocess.run(
        [
            sys.executable,
            "cli.py",
            "heal",
            "-c",
            "configs/smoke.yaml",
            "--from",
            str(tmp_path),
            "-o",
            str(tmp_path / "h"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "fewer than min_train=2" in result.stderr
    assert not (tmp_path / "h").exists()


def test_eval_command_on_fixture_data(tmp_path):
    out = tmp_path / "eval.json"
    result = runner.invoke(
        app,
        [
            "eval",
            "-c",
            "configs/smoke.yaml",
            "--mfv-data",
            "tests/fixtures/mfv",
            "--set",
            "fixture",
            "--n-vignettes",
            "7",
            "--persona",
            "love",
            "--out",
            str(out),
            "--set",
            "eval.n_bootstrap=100",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "trait (love) log-odds" in result.output and "MFV (7 rows" in result.output
    assert out.is_file() and out.with_suffix(".rows.jsonl").is_file()
    assert json.loads(out.read_text())["mfv_compat"] == "none"


def test_eval_mfv_compat_flag_is_recorded_and_needs_a_think(tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", "-c", "configs/smoke.yaml", "--out", str(out), "--mfv-compat", "tinymfv"]
    result = runner.invoke(app, [*args, "--think-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "2 think, compat tinymfv" in result.output
    written = json.loads(out.read_text())
    assert written["mfv_compat"] == written["config"]["compat"] == "tinymfv"
    refused = runner.invoke(app, args)  # the smoke preset thinks 0 tokens
    assert refused.exit_code == 2 and "compat=tinymfv needs think_tokens >= 1" in refused.output


def test_eval_without_data_names_both_ways_to_provide_it(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "INTERP_HEAL_MFV_DATA"}
    result = subprocess.run(
        [
            sys.executable,
            "cli.py",
            "eval",
            "-c",
            "configs/smoke.yaml",
            "--set",
            "eval.mfv_data=null",
            "--out",
            str(tmp_path / "e.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 2
    assert "--mfv-data" in result.stderr and "INTERP_HEAL_MFV_DATA" in result.stderr


def test_plan_resolves_paper_preset_layers_without_weights():
    """The research preset's layer indices for gemma-3-4b-it (34 layers), from its config.json alone."""
    result = runner.invoke(
        app, ["plan", "-c", "configs/paper.yaml", "--model-config", "tests/fixtures/gemma-3-4b-it/config.json"]
    )
    assert result.exit_code == 0, result.output
    assert "Gemma3ForConditionalGeneration, 34 layers, d=2560" in result.output
    assert "steer band [0.45, 0.55] -> layers [15, 16, 17, 18]" in result.output
    assert "LoRA on layers 6..27 (22 layers x 7 modules, r=32)" in result.output
