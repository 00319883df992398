"""interp_heal command line: `python cli.py --help`.

User errors (bad config, unknown model, missing data) print one line and exit 2; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from loguru import logger

from analyses.filter_calibration import run_filter_calibration
from interp_heal.config import Config, config_to_yaml, load_config
from interp_heal.errors import InterpHealError
from interp_heal.jobs import run_collect, run_heal, run_steer
from interp_heal.models import EMBEDDED_MODELS, TINY_RANDOM, embedded_status, load_model

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Steer, heal, repeat: distil steering vectors into LoRA weights behind a KL barrier.",
)

ConfigOption = typer.Option(None, "--config", "-c", help="YAML preset (see configs/).")
SetOption = typer.Option(None, "--set", help="Override a config key, e.g. --set heal.lam=0.5 (repeatable).")


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for user errors."),
) -> None:
    """Global options; `--debug` is read by `main()` before dispatch."""


def _resolve(config_path: Path | None, overrides: list[str] | None) -> Config:
    return load_config(config_path, overrides or [])


@app.command()
def models(load: bool = typer.Option(False, "--load", help="Load each model once and time it.")) -> None:
    """List the embedded models and whether they load (and how fast, with --load)."""
    for name, embedded in EMBEDDED_MODELS.items():
        typer.echo(f"{name:<14} {embedded.hf_id}  [{embedded_status(name)}]")
        if load:
            started = time.perf_counter()
            _, _, info = load_model(name)
            typer.echo(f"{'':<14} loaded in {time.perf_counter() - started:.2f}s: {info.as_dict()}")
    typer.echo(f"{TINY_RANDOM:<14} random 4-layer llama with the SmolLM2 tokenizer, for tests  [built in memory]")


@app.command("config")
def show_config(config: Path | None = ConfigOption, overrides: list[str] | None = SetOption) -> None:
    """Print the resolved config (preset + overrides + defaults) as YAML."""
    typer.echo(config_to_yaml(_resolve(config, overrides)), nl=False)


@app.command()
def steer(
    config: Path | None = ConfigOption,
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    overrides: list[str] | None = SetOption,
    n_samples: int = typer.Option(4, help="Task prompts for the greedy sample table."),
) -> None:
    """Extract the persona-pair steering vector and write greedy samples at each coefficient."""
    resolved = _resolve(config, overrides)
    result = run_steer(resolved, out, n_samples)
    typer.echo(f"vector: {result.vector_path}  (layers {list(result.vector.layers)})")
    typer.echo(f"samples: {result.samples_path}")
    for record in result.samples:
        first_line = " ".join(record.completion.split())[:100]
        typer.echo(f"  coeff {record.coeff:>6g} | {record.prompt[:40]:<40} | {first_line}")


@app.command()
def collect(
    config: Path | None = ConfigOption,
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    overrides: list[str] | None = SetOption,
) -> None:
    """Vector, dose-controlled steered sampling and filter: writes completions.jsonl and summary.json."""
    collection = run_collect(_resolve(config, overrides), out)
    summary = collection.summary()
    typer.echo(
        f"kappa {summary['kappa']:.3f} (coeffs {summary['coeffs']}): kept {len(collection.kept)} at that dose; "
        f"overall {summary['kept']}/{summary['generated']}, drops {summary['drop_reasons']}"
    )
    typer.echo(f"completions: {out / 'completions.jsonl'}")


@app.command()
def heal(
    config: Path | None = ConfigOption,
    source: Path = typer.Option(..., "--from", help="A collect folder (completions.jsonl + summary.json)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: train_log.csv and adapter/."),
    overrides: list[str] | None = SetOption,
) -> None:
    """Train one round's LoRA on a collect folder's kept completions, behind the KL barrier."""
    result = run_heal(_resolve(config, overrides), source, out)
    last = result.log[-1]
    typer.echo(
        f"adapter: {result.adapter_dir}  ({len(result.log)} steps; last nll {last['nll']:.3f}, "
        f"kl_rmse {last['kl_rmse']:.3f}, barrier active {last['barrier_active_frac']:.2f}); {result.val}"
    )


@app.command("calibrate-filter")
def calibrate_filter(
    config: Path | None = ConfigOption,
    out: Path = typer.Option(Path("reports/filter_calibration"), "--out", "-o", help="Output folder."),
    overrides: list[str] | None = SetOption,
    coeffs: list[float] = typer.Option([0.0, 0.5, 1.0, 1.5, 2.0, 3.0], "--coeff", help="Coefficient ladder."),
    n_prompts: int = typer.Option(32, help="Task prompts sampled at each coefficient."),
) -> None:
    """Score distributions of sampled completions at a ladder of coefficients (chooses filter defaults)."""
    run_filter_calibration(_resolve(config, overrides), out, coeffs, n_prompts)
    typer.echo((out / "calibration.md").read_text())


def main() -> None:
    debug = "--debug" in sys.argv
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if debug else "INFO", format="{time:HH:mm:ss} | {level:<7} | {message}")
    try:
        app()
    except InterpHealError as err:
        if debug:
            raise
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
