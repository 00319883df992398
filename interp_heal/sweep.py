"""Matched experiments: several loop runs that differ only in named overrides of one base preset.

`python cli.py sweep -c configs/experiments.yaml` advances the runs breadth-first (round 0 of every run,
then round 1 of every run, ...), so an interrupted sweep leaves every arm at the same depth, and rerunning
the command resumes each run folder where it stopped. A run whose config differs from an earlier run's only in
`heal` copies that run's finished heal-independent stages (base evals, round 0 up to the steered eval) instead
of recomputing them; with `--only`, the sweep's other runs already on disk lend theirs too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from loguru import logger
from pydantic import Field, ValidationError

from interp_heal.collect import StarvedDataError
from interp_heal.config import Config, Section, key_line, load_config, read_yaml_mapping
from interp_heal.errors import ConfigError
from interp_heal.loop import run_loop
from interp_heal.run_folder import run_root, shared_stages


class SweepConfig(Section):
    base: str = Field(description="Base preset, relative to the sweep file (e.g. demo.yaml).")
    runs_dir: str = Field("runs/experiments", description="Each run's folder is <runs_dir>/<run name>.")
    overrides: list[str] = Field(default_factory=list, description="Applied to every run (e.g. loop.rounds=6).")
    runs: dict[str, list[str]] = Field(min_length=1, description="Run name -> its own overrides.")
    anchor: str = Field("rmse_base", description="The reference arm; its seed variants give the noise floor.")
    frontier: list[str] = Field(
        default_factory=list,
        description="Runs whose every finished round gets a steering frontier (`cli.py frontier`) after the sweep.",
    )
    report: Literal["experiments", "controls"] = Field(
        "experiments",
        description="Which report the sweep writes: experiments.md (arms vs the anchor, Q1-Q3) or controls.md "
        "(the base steering curve; Q4-Q6, the source x target table; analyses/controls.py).",
    )
    report_dir: str = Field(
        "reports",
        description="Where the experiments report is written (experiments.md, .csv, one figure per question).",
    )


def load_sweep(path: Path) -> SweepConfig:
    tree, node = read_yaml_mapping(path, "sweep file")
    try:
        return SweepConfig.model_validate(tree)
    except ValidationError as err:
        problems = []
        for problem in err.errors():
            line = key_line(node, tuple(problem["loc"]))
            where = f"{path} line {line}" if line else str(path)
            problems.append(f"{where}: {'.'.join(map(str, problem['loc']))}: {problem['msg']}")
        raise ConfigError(f"{'; '.join(problems)} (see configs/experiments.yaml for the layout)") from None


def sweep_configs(path: Path) -> dict[str, Config]:
    """Every run's full config; all of them are validated before any run starts."""
    sweep = load_sweep(path)
    unknown = sorted(set(sweep.frontier) - set(sweep.runs))
    if unknown:
        raise ConfigError(f"{path}: frontier names runs {unknown} the sweep does not have ({sorted(sweep.runs)})")
    base_path = (path.parent / sweep.base).resolve()
    configs: dict[str, Config] = {}
    for name, run_overrides in sweep.runs.items():
        overrides = [*sweep.overrides, *run_overrides, f"output.runs_dir={sweep.runs_dir}", f"output.name={name}"]
        try:
            configs[name] = load_config(base_path, overrides)
        except ConfigError as err:
            raise ConfigError(f"sweep run {name!r}: {err}") from None
    return configs


def run_sweep(path: Path, only: list[str] | None = None) -> tuple[dict[str, Path], dict[str, str]]:
    """Every selected run advanced to its planned rounds: (run folders by name, why each round-0-starved arm has
    none). An arm whose round 0 starves has nothing to continue from; the other arms still run."""
    configs = sweep_configs(path)
    unknown = sorted(set(only or []) - set(configs))
    if unknown:
        raise ConfigError(f"unknown sweep run(s) {unknown}; the sweep has {sorted(configs)}")
    selected = {name: config for name, config in configs.items() if not only or name in only}
    # Runs left out by --only still lend their finished stages: an arm added to a finished sweep reuses its data.
    unselected = {name: run_root(config) for name, config in configs.items() if name not in selected}
    donors = {name: root for name, root in unselected.items() if (root / "state.json").is_file()}
    folders: dict[str, Path] = {}
    starved: dict[str, str] = {}
    for depth in range(1, max(config.loop.rounds for config in selected.values()) + 1):
        for name, config in selected.items():
            if depth <= config.loop.rounds and name not in starved:
                logger.info(f"sweep: {name} up to round {depth - 1}")
                donor = _stage_donor(name, configs, {**donors, **folders})
                try:
                    folders[name] = run_loop(config, max_rounds=depth, share_from=donor)
                except StarvedDataError as err:  # only round 0 raises it (a later round ends its run)
                    logger.error(f"sweep: {name} starved at round 0, the other runs go on: {err}")
                    starved[name] = str(err)
    return folders, starved


def _stage_donor(name: str, configs: dict[str, Config], folders: dict[str, Path]) -> Path | None:
    """The earlier run of this sweep `name` can copy most finished stages from (`run_folder.shared_stages`): one
    that differs only in `heal` gives the base evals and the round-0 data, one that differs also in
    `loop.source` the base evals alone."""
    candidates = [(len(shared_stages(configs[name], configs[other])), folder) for other, folder in folders.items()
                  if other != name]  # fmt: skip
    count, donor = max(candidates, key=lambda candidate: candidate[0], default=(0, None))
    return donor if count else None
