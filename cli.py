"""interp_heal command line: `python cli.py --help`.

User errors (bad config, unknown model, missing or malformed files, a path that cannot be written) print one
line, `error: <file>[ line N]: <what is wrong> (<what to do>)`, and exit 2; anything else is a bug and keeps its
traceback. `--debug` (or INTERP_HEAL_DEBUG=1) shows the traceback for every error. docs/errors.md has the details.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Literal

import typer
import yaml
from loguru import logger
from safetensors import SafetensorError
from typer.core import TyperGroup

from analyses.answers import write_answers
from analyses.controls import write_controls_report
from analyses.diag_axis import evaluations_from_config, evaluations_from_run, format_table, run_diag_axis
from analyses.diffs import format_diffs, run_diffs
from analyses.experiments import write_experiments_report
from analyses.filter_calibration import run_filter_calibration
from analyses.frontier import format_frontier, run_frontier
from analyses.html_report import write_html_report
from analyses.logit_lens import run_logit_lens
from analyses.pooled import write_pooled_report
from analyses.project_adapters import format_projection, run_project_adapters
from analyses.rescore import Scored, rescore_run
from interp_heal.architecture import band_to_layers
from interp_heal.axis_check import format_axis_check
from interp_heal.collect import StarvedDataError
from interp_heal.config import Config, config_markdown, config_to_yaml, load_config
from interp_heal.embedded import EMBEDDED_MODELS, embedded_status
from interp_heal.errors import ConfigError, InterpHealError
from interp_heal.io import os_error_hint
from interp_heal.jobs import run_check_axis, run_collect, run_eval, run_heal, run_pairs, run_steer
from interp_heal.loop import run_loop
from interp_heal.models import TINY_RANDOM, load_model, model_shape
from interp_heal.run_folder import run_root
from interp_heal.steer import SteeringVector
from interp_heal.sweep import load_sweep, run_sweep, sweep_configs


def _debug(ctx: typer.Context | None = None) -> bool:
    return bool(ctx and ctx.params.get("debug")) or os.environ.get("INTERP_HEAL_DEBUG", "0") not in ("", "0")


def user_error_line(err: BaseException) -> str | None:
    """The one `error:` line for an error the user can fix, or None for a bug (which keeps its traceback).

    The project's own errors already name the file (read sites know it); the parse errors below are those a
    reader let through, named as well as the exception allows; an OSError names the path it failed on.
    """
    if isinstance(err, InterpHealError):
        text = str(err)
    elif isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        text = f"{mark.name} line {mark.line + 1}: not valid YAML: {err.problem} (fix the file)"
    elif isinstance(err, json.JSONDecodeError):
        text = f"line {err.lineno}: not valid JSON: {err.msg} (rerun with --debug to see which file)"
    elif isinstance(err, SafetensorError):
        text = f"not a readable safetensors file: {err} (rerun with --debug to see which file)"
    elif isinstance(err, OSError) and err.filename is not None:
        text = f"{err.filename}: {err.strerror or err} ({os_error_hint(err)})"
    else:
        return None
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


# Typer vendors its own click (0.2x), whose usage errors are not the click package's: take the class from typer.
UsageError = typer.BadParameter.__base__


class OneLineErrors(TyperGroup):
    """The one place where errors become `error: ...` lines and exit status 2 (see `user_error_line`)."""

    def invoke(self, ctx: typer.Context) -> object:
        try:
            return super().invoke(ctx)
        except UsageError as err:  # a mistyped option or value: click's many-line usage box, made one line
            command = err.ctx.command_path if err.ctx else ctx.command_path
            message = err.format_message().replace("Value error, ", "")
            typer.secho(f"error: {message} (see `{command} --help`)", err=True, fg=typer.colors.RED)
            raise SystemExit(2) from None
        except Exception as err:
            line = None if _debug(ctx) else user_error_line(err)
            if line is None:
                raise
            typer.secho(f"error: {line}", err=True, fg=typer.colors.RED)
            raise SystemExit(2) from None


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Steer, heal, repeat: distil steering vectors into LoRA weights behind a KL barrier.",
)

ConfigOption = typer.Option(None, "--config", "-c", help="YAML preset (see configs/).")
SetOption = typer.Option(None, "--set", help="Override a config key, e.g. --set heal.lam=0.5 (repeatable).")
MfvCompatOption = typer.Option(
    None, "--mfv-compat", help="MFV forced path: none, or tinymfv to match tinymfv's numbers (= --set eval.compat=)."
)


@app.callback()
def _global_options(
    debug: bool = typer.Option(
        False, "--debug", help="Show the full traceback for every error (also: INTERP_HEAL_DEBUG=1)."
    ),
) -> None:
    """Global options; `--debug` is read by `OneLineErrors` and `main()`."""


def _resolve(config_path: Path | None, overrides: list[str] | None, mfv_compat: str | None = None) -> Config:
    """`--mfv-compat X` is an alias of `--set eval.compat=X`; an explicit --set comes later, so it wins."""
    compat = [f"eval.compat={mfv_compat}"] if mfv_compat is not None else []
    return load_config(config_path, [*compat, *(overrides or [])])


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
def show_config(
    config: Path | None = ConfigOption,
    overrides: list[str] | None = SetOption,
    markdown: bool = typer.Option(False, "--markdown", help="Print the reference of every key (docs/config.md)."),
) -> None:
    """Print the resolved config (preset + overrides + defaults) as YAML, or the reference of every key."""
    if markdown:
        typer.echo(config_markdown())
        return
    typer.echo(config_to_yaml(_resolve(config, overrides)), nl=False)


@app.command()
def plan(
    config: Path | None = ConfigOption,
    overrides: list[str] | None = SetOption,
    model_config: Path | None = typer.Option(None, "--model-config", help="A local config.json for the model."),
) -> None:
    """Dry run: resolve the config and the model's layer indices from its config alone (no weights loaded)."""
    resolved = _resolve(config, overrides)
    shape = model_shape(resolved.model.spec, model_config)
    steer_layers = band_to_layers(resolved.steer.band, shape.n_layers)
    heal_layers = band_to_layers(resolved.heal.band, shape.n_layers)
    typer.echo(f"model {resolved.model.spec}: {shape.architecture}, {shape.n_layers} layers, d={shape.d_model}")
    typer.echo(f"steer band {list(resolved.steer.band)} -> layers {steer_layers}")
    lora = f"{len(heal_layers)} layers x {len(resolved.heal.target_modules)} modules, r={resolved.heal.lora_r}"
    typer.echo(f"heal band {list(resolved.heal.band)} -> LoRA on layers {heal_layers[0]}..{heal_layers[-1]} ({lora})")
    typer.echo(f"{resolved.loop.rounds} rounds; runs/{resolved.output.name}; persona axis {resolved.persona.axis}")


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
    if not result.main_process:
        return
    last = result.log[-1]
    typer.echo(
        f"adapter: {result.adapter_dir}  ({len(result.log)} steps; last nll {last['nll']:.3f}, "
        f"kl_rmse {last['kl_rmse']:.3f}, barrier active {last['barrier_active_frac']:.2f}); {result.val}"
    )


@app.command("check-axis")
def check_axis_command(
    config: Path | None = ConfigOption,
    overrides: list[str] | None = SetOption,
    out: Path | None = typer.Option(None, "--out", "-o", help="JSON file (default runs/check-axis/<axis>.json)."),
) -> None:
    """Is the persona axis expressible on this model? Persona gap vs placebo, +v vs -v; exit 1 when not."""
    resolved = _resolve(config, overrides)
    default_out = Path(resolved.output.runs_dir) / "check-axis" / f"{resolved.persona.axis}.json"
    check = run_check_axis(resolved, out or default_out)
    typer.echo(format_axis_check(check))
    if not check.expressible:
        raise typer.Exit(1)


@app.command()
def pairs(
    out: Path = typer.Option(..., "--out", "-o", help="JSONL of drafted items (a .md preview is written beside it)."),
    config: Path | None = ConfigOption,
    overrides: list[str] | None = SetOption,
    scenarios: Path | None = typer.Option(
        None, "--scenarios", help="Text file, one scenario a line (default: the built-in readouts' scenarios)."
    ),
    n: int | None = typer.Option(None, "--n", min=1, help="Use the first N scenarios."),
    samples: int = typer.Option(4, "--samples", min=1, help="Replies sampled per scenario and persona."),
) -> None:
    """Draft paired readout items from the model's own persona-prompted replies, for you to read and edit."""
    drafted, skipped, preview = run_pairs(_resolve(config, overrides), out, scenarios, n, samples)
    typer.echo(f"{len(drafted)} items -> {out}; {len(skipped)} scenarios skipped; preview {preview}")


@app.command("eval")
def eval_command(
    out: Path = typer.Option(..., "--out", "-o", help="OUT.json (per-row records go to OUT.rows.jsonl)."),
    config: Path | None = ConfigOption,
    model: str | None = typer.Option(None, "--model", help="Model spec (default: the config's)."),
    adapters: list[Path] | None = typer.Option(None, "--adapters", help="Adapter folders to bake, in order."),
    vector: Path | None = typer.Option(None, "--vector", help="Steering vector (.safetensors) active throughout."),
    coeff: float = typer.Option(0.0, "--coeff", help="Steering coefficient for --vector."),
    persona: str | None = typer.Option(None, "--persona", help="Prompting baseline: this axis' persona."),
    persona_side: Literal["pos", "neg"] = typer.Option("pos", "--persona-side", help="Which persona of --persona."),
    mfv_data: Path | None = typer.Option(None, "--mfv-data", help="MFV data folder."),
    protocol: str | None = typer.Option(None, "--protocol", help="words or digits."),
    condition: str | None = typer.Option(None, "--condition", help="other_violate or self_violate."),
    n_vignettes: int | None = typer.Option(None, "--n-vignettes", help="Stratified subset size."),
    think_tokens: int | None = typer.Option(None, "--think-tokens", help="Greedy think tokens before answering."),
    mfv_compat: str | None = MfvCompatOption,
    sets: list[str] | None = typer.Option(
        None, "--set", help="A vignette set name (e.g. --set classic), or a config override key=value."
    ),
) -> None:
    """Evaluate a model state: trait log-odds, neutral coherence and the MFV profile."""
    # `--set` does double duty here: the vignette set (as the MFV tooling names it) and, like every other
    # command, config overrides; an override always contains "=", a set name never does.
    overrides = [value for value in sets or [] if "=" in value]
    set_names = [value for value in sets or [] if "=" not in value]
    if len(set_names) > 1:
        raise ConfigError(f"give at most one vignette set with --set, got {set_names}")
    set_name = set_names[0] if set_names else None
    flags = {
        "model.spec": model,
        "eval.mfv_data": mfv_data,
        "eval.protocol": protocol,
        "eval.set_name": set_name,
        "eval.condition": condition,
        "eval.n_vignettes": n_vignettes,
        "eval.think_tokens": think_tokens,
        "eval.compat": mfv_compat,
    }
    from_flags = [f"{key}={value}" for key, value in flags.items() if value is not None]
    resolved = _resolve(config, [*from_flags, *overrides])
    result = run_eval(resolved, out, adapters, vector, coeff, persona, persona_side)
    typer.echo(format_eval(result))


def format_eval(result: dict) -> str:
    trait = result["trait"]
    lines = [
        f"trait ({trait['axis']}) log-odds {trait['log_odds']:+.3f} nats/token, "
        f"95% CI [{trait['ci95'][0]:+.3f}, {trait['ci95'][1]:+.3f}] over {trait['n_items']} scenarios",
        f"neutral NLL {result['neutral_nll']:.3f}; KL to base mean {result['neutral_kl_mean']:.4f} "
        f"rmse {result['neutral_kl_rmse']:.4f}",
    ]
    if "nats" in result:
        nats = ", ".join(f"{k} {v:+.2f}" for k, v in result["nats"].items())
        lines.append(
            f"MFV ({result['n_rows']} rows, {result['think_tokens']} think, compat {result['mfv_compat']}): {nats}; "
            f"answer-token mass {result['mfv_answer_mass']:.3f}, top-1 vs humans {result['top1_acc']:.2f}"
        )
    if "adherence" in result:
        adherence = result["adherence"]
        lines.append(
            f"task adherence {adherence['pmi']:+.3f} nats/token, 95% CI [{adherence['ci95'][0]:+.3f}, "
            f"{adherence['ci95'][1]:+.3f}] over {adherence['n_prompts']} held-out prompts; base NLL of the replies "
            f"{adherence['nll']:.3f}"
        )
    return "\n".join(lines)


@app.command()
def run(
    config: Path | None = ConfigOption,
    overrides: list[str] | None = SetOption,
    fresh: bool = typer.Option(False, "--fresh", help="Delete the run folder and start over."),
    mfv_compat: str | None = MfvCompatOption,
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder (default runs/<output.name>)."),
) -> None:
    """The steer-heal loop; rerunning the same command resumes after the last finished stage."""
    # The run folder is output.runs_dir / output.name, so --out sets both (an explicit --set still wins).
    folder = [f"output.runs_dir={out.parent}", f"output.name={out.name}"] if out is not None else []
    root = run_loop(_resolve(config, [*folder, *(overrides or [])], mfv_compat), fresh=fresh)
    typer.echo(f"run folder: {root}")
    typer.echo((root / "summary.md").read_text())


@app.command()
def sweep(
    config: Path = typer.Option(..., "--config", "-c", help="Sweep file (see configs/experiments.yaml)."),
    only: list[str] | None = typer.Option(None, "--only", help="Run just these named runs (repeatable)."),
    report_only: bool = typer.Option(False, "--report-only", help="Only rewrite the report from finished rounds."),
    compare_to: Path | None = typer.Option(
        None, "--compare-to", exists=True, dir_okay=False, help="An earlier sweep's experiments.csv to compare with."
    ),
) -> None:
    """Matched loop runs from one sweep file, advanced round by round (rerun to resume); then the report."""
    settings = load_sweep(config)
    starved: dict[str, str] = {}
    if not report_only:
        others = [run_root(run_config) for run_config in sweep_configs(config).values()]
        folders, starved = run_sweep(config, only)
        for name, root in folders.items():
            typer.echo(f"{name}: {root}")
            if name in settings.frontier:  # resumable: finished rounds are skipped, a shared round-0 curve reused
                typer.echo(format_frontier(run_frontier(root, others=others)))
    if settings.report == "controls":
        report = write_controls_report(config, Path(settings.report_dir), settings.anchor)
    else:
        report = write_experiments_report(config, Path(settings.report_dir), settings.anchor, compare_to)
    typer.echo(f"report: {report}")
    if starved:  # after the report: the other arms' results are written, then the failure said
        arms = "; ".join(f"{name}: {why}" for name, why in starved.items())
        raise StarvedDataError(f"{config}: round 0 starved in {len(starved)} run(s), not in the report: {arms}", None)


@app.command()
def pooled(
    configs: list[Path] = typer.Option(
        ..., "--config", "-c", exists=True, dir_okay=False, help="Controls sweep files (repeatable; first: anchor)."
    ),
    out: Path = typer.Option(Path("reports/controls_pooled"), "--out", "-o", help="Output folder."),
    rounds: list[int] = typer.Option([0, 2, 5], "--round", help="Rounds of the at-a-glance table (repeatable)."),
    experiments: Path | None = typer.Option(
        None,
        "--experiments",
        dir_okay=False,
        help="Also rewrite the controls answers of this page (experiments.md).",
    ),
) -> None:
    """Every arm with its seeds pooled across committed sweep pages (no run folder needed): pooled.md/.csv/.png."""
    typer.echo(f"report: {write_pooled_report(configs, out, tuple(rounds))}")
    if experiments is not None:
        typer.echo(f"answers: {write_answers(configs, experiments, out / 'pooled.png', tuple(rounds))}")


@app.command("diag-axis")
def diag_axis(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: diag_axis.json and diag_axis.html/.png."),
    run_dir: Path | None = typer.Option(None, "--run", help="Read base/steered/prompt evals from a loop run."),
    config: Path | None = ConfigOption,
    coeff: float = typer.Option(1.0, "--coeff", help="Steering coefficient when computing (no --run)."),
    overrides: list[str] | None = SetOption,
    mfv_compat: str | None = MfvCompatOption,
) -> None:
    """Which MFV foundation does the vector move? Base vs steered vs prompting baseline, sorted by |delta|."""
    if run_dir is not None:
        evaluations = evaluations_from_run(run_dir)
    else:
        evaluations = evaluations_from_config(_resolve(config, overrides, mfv_compat), coeff)
    typer.echo(format_table(run_diag_axis(evaluations, out)))


@app.command("project-adapters")
def project_adapters_command(
    run_dir: Path = typer.Option(..., "--run", help="A loop run folder."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default RUN/analysis)."),
    n_prompts: int = typer.Option(32, help="Held-out context prompts for the activation deltas."),
) -> None:
    """Project each round's adapter onto the steering vector, in activation and weight space."""
    projection = run_project_adapters(run_dir, out, n_prompts)
    band = list(SteeringVector.load(run_dir / "round_00" / "vector.safetensors").layers)
    typer.echo(format_projection(projection, band))


@app.command()
def frontier(
    run_dir: Path = typer.Option(..., "--run", help="A loop run folder."),
    rounds: list[int] | None = typer.Option(None, "--round", help="Round(s) (default: every finished one)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default RUN/analysis)."),
    share_from: list[Path] | None = typer.Option(
        None, "--share-from", help="Runs whose round-0 curve is this run's when both steer the base with one vector."
    ),
) -> None:
    """Is healing more than steering less? Each round's steering curve (>= 7 doses) against the healed student."""
    results = run_frontier(run_dir, rounds, out, share_from)
    typer.echo(format_frontier(results))


@app.command()
def rescore(
    run_dirs: list[Path] = typer.Option(..., "--run", help="Loop run folder(s) evaluated before the readout existed."),
) -> None:
    """Add the held-out trait (own replies read under each persona) to runs evaluated before it existed."""
    scored: Scored = {}  # a sweep's runs share their base evals: each is read once
    for run_dir in run_dirs:
        written = rescore_run(run_dir, scored)
        typer.echo(f"{run_dir}: held-out trait for {len(written)} eval(s); metrics.csv and summary.md rewritten")


@app.command()
def diffs(
    run_dir: Path = typer.Option(..., "--run", help="A loop run folder."),
    rounds: list[int] | None = typer.Option(None, "--round", help="Round(s) to diff (default: every finished one)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default RUN/analysis)."),
    max_kept: int = typer.Option(32, help="Kept completions compared (half fit the directions, half measure)."),
) -> None:
    """Per-token KL and hidden deltas of steered and healed vs base; trait vs incoherence directions."""
    for result in run_diffs(run_dir, rounds, out, max_kept):
        typer.echo(format_diffs(result))


@app.command("logit-lens")
def logit_lens(
    run_dir: Path = typer.Option(..., "--run", help="A loop run folder."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default RUN/analysis)."),
    top_k: int = typer.Option(10, help="Tokens listed per direction."),
) -> None:
    """Top promoted and suppressed tokens of each round's vector, per band layer (TransformerLens bridge)."""
    result = run_logit_lens(run_dir, out, top_k)
    for round_result in result["rounds"]:
        for row in round_result["layers"]:
            promoted = " ".join(repr(token) for token, _ in row["promoted"])
            typer.echo(f"round {round_result['round']} L{row['layer']}: + {promoted}")


@app.command()
def report(
    run_dir: Path = typer.Option(..., "--run", help="A loop run folder."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default RUN/report)."),
    static: bool = typer.Option(False, "--static", help="Figures as inlined PNGs (no JavaScript, small files)."),
) -> None:
    """Self-contained HTML: an index and one page per round (computes missing analyses first)."""
    typer.echo(f"report: {write_html_report(run_dir, out, static)}")


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
    debug = "--debug" in sys.argv or _debug()
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if debug else "INFO", format="{time:HH:mm:ss} | {level:<7} | {message}")
    app()


if __name__ == "__main__":
    main()
