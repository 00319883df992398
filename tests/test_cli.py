import subprocess
import sys

from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def test_help_lists_working_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("models", "config"):
        assert command in result.output


def test_models_lists_embedded():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert "smollm2-135m" in result.output and "tiny-random" in result.output


def test_config_prints_resolved_yaml():
    result = runner.invoke(app, ["config", "-c", "configs/smoke.yaml", "--set", "heal.lam=0.7"])
    assert result.exit_code == 0, result.output
    assert "lam: 0.7" in result.output and "spec: tiny-random" in result.output


def test_user_error_is_one_line_without_traceback():
    result = subprocess.run(
        [sys.executable, "cli.py", "config", "--set", "heal.agg=median"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: invalid config") and "heal.agg" in result.stderr
    assert "Traceback" not in result.stderr
    debug = subprocess.run(
        [sys.executable, "cli.py", "--debug", "config", "--set", "heal.agg=median"], capture_output=True, text=True
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr
