"""pooled: one arm's seeds gathered from several committed sweep pages (sessions or machines whose run folders are
gone): `python cli.py pooled -c configs/controls.yaml -c configs/controls_seeds.yaml ... -o reports/controls_pooled`.

A controls sweep commits `controls.csv` (every run x stage) and `gains.csv` (every healed student against its
seed's base steering curve) under its `report_dir`; its sweep file gives every run's full config. This reads those
files only, so it runs in seconds and needs no model. Runs are grouped by their config with the seed, the run
length, the run folder and MFV on/off left out (none of these changes what an arm is), labelled by how they differ
from the first page's anchor; per group and round: mean [min, max] over seeds of trait, held-out trait (where the
page has it), neutral fluency, adherence, own-reply keep-rate and the gain over the base curve. A seed measured on two
pages (a rerun) is read from the first page listing it, and the largest difference between the two measurements is
reported: a reproduction check.

Writes `pooled.md`, `pooled.csv` (one row per group, round and readout) and `pooled.png/html`.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from analyses.controls import band
from interp_heal.config import Config
from interp_heal.errors import DataError
from interp_heal.io import atomic_write_text
from interp_heal.report import save_figure
from interp_heal.sweep import load_sweep, sweep_configs

# Config keys that do not change what an arm is: its seed is what is pooled over, rounds only say how far it ran,
# MFV is a separate readout, and the rest only place or pace the run. Whole keys, or sections ending in a dot. The
# dtype is kept: bfloat16 on a GPU and float32 on a CPU are different measurements.
IGNORED_KEYS = ("seed", "output.", "loop.rounds", "eval.mfv", "eval.mfv_data", "model.device", "model.threads",
                "heal.ref_cache_mb")  # fmt: skip
READOUTS = {"trait": "trait_log_odds", "held-out trait": "reply_trait", "neutral fluency": "neutral_fluency",
            "adherence": "adherence", "own replies kept": "generation_keep_rate"}  # fmt: skip
REPEAT_READOUTS = ("trait_log_odds", "neutral_fluency", "adherence")
ANCHOR_LABEL = "as the anchor"


@dataclass(frozen=True)
class PageRun:
    """One run as its page committed it: metric rows by stage, gains over the base curve by round."""

    page: Path
    name: str
    config: Config
    rows: dict[str, dict[str, str]]
    gains: dict[int, dict[str, str]] = field(default_factory=dict)

    def rounds(self) -> list[int]:
        return sorted(int(row["round"]) for stage, row in self.rows.items() if stage.startswith("healed"))

    def value(self, stage: str, key: str) -> float:
        text = self.rows.get(stage, {}).get(key, "")
        return float(text) if text else math.nan

    def gain(self, r: int) -> float:
        row = self.gains.get(r)
        return float(row["trait_gain"]) if row and not row["note"] and row["trait_gain"] else math.nan


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def read_page(sweep_path: Path) -> list[PageRun]:
    """Every run of a sweep page that has committed rows; a page without `controls.csv` is an error (its sweep has
    not been reported), one without `gains.csv` (older pages) simply has no gains."""
    report_dir = Path(load_sweep(sweep_path).report_dir)
    metrics = report_dir / "controls.csv"
    if not metrics.is_file():
        raise DataError(f"{sweep_path}: no {metrics} (run `python cli.py sweep -c {sweep_path} --report-only` first)")
    rows: dict[str, dict[str, dict[str, str]]] = {}
    for row in _read_csv(metrics):
        rows.setdefault(row["run"], {})[row["stage"]] = row
    gains: dict[str, dict[int, dict[str, str]]] = {}
    if (report_dir / "gains.csv").is_file():
        for row in _read_csv(report_dir / "gains.csv"):
            gains.setdefault(row["run"], {})[int(row["round"])] = row
    configs = sweep_configs(sweep_path)
    unknown = sorted(set(rows) - set(configs))
    if unknown:
        raise DataError(f"{metrics} has runs {unknown} that {sweep_path} does not define: page and sweep disagree")
    return [PageRun(report_dir, name, configs[name], rows[name], gains.get(name, {})) for name in rows]


def flat(tree: dict, prefix: str = "") -> dict[str, object]:
    """A nested config dump as dotted keys (`heal.target`), lists and scalars as values."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def arm_label(config: Config, reference: Config) -> str:
    """How the arm differs from the reference, as overrides (`heal.target=logits, loop.source=prompt`)."""
    ours, theirs = flat(config.model_dump()), flat(reference.model_dump())
    diffs = [f"{key}={ours[key]}" for key in sorted(ours) if ours[key] != theirs.get(key) and not ignored(key)]
    return ", ".join(diffs) or ANCHOR_LABEL


def ignored(key: str) -> bool:
    return any(key == name or (name.endswith(".") and key.startswith(name)) for name in IGNORED_KEYS)


def merged(runs: list[PageRun]) -> PageRun:
    """One seed of one arm from every page that ran it: each stage from the first page that has it, so a rerun that
    went further adds its later rounds (`repeat_lines` shows how far the shared stages agree), and a readout that
    page lacks (one added after it was written) from the first later page that has it."""
    rows: dict[str, dict[str, str]] = {}
    gains: dict[int, dict[str, str]] = {}
    for run in runs:
        for stage, row in run.rows.items():
            known = rows.setdefault(stage, dict(row))
            known.update({key: value for key, value in row.items() if value and not known.get(key)})
        gains = {**run.gains, **gains}
    return PageRun(runs[0].page, runs[0].name, runs[0].config, rows, gains)


@dataclass(frozen=True)
class Pooled:
    sources: dict[str, dict[int, list[PageRun]]]  # label -> seed -> every page's run of it, in page order

    def groups(self) -> dict[str, dict[int, PageRun]]:
        return {label: {seed: merged(runs) for seed, runs in seeds.items()} for label, seeds in self.sources.items()}

    def repeats(self) -> list[tuple[PageRun, PageRun]]:
        return [(runs[0], other) for seeds in self.sources.values() for runs in seeds.values() for other in runs[1:]]


def pool(pages: list[list[PageRun]], reference: Config) -> Pooled:
    sources: dict[str, dict[int, list[PageRun]]] = {}
    for page in pages:
        for run in page:
            sources.setdefault(arm_label(run.config, reference), {}).setdefault(run.config.seed, []).append(run)
    return Pooled(sources)


GAIN = "vs base curve"


@dataclass(frozen=True)
class PooledRow:
    """One arm at one round (or a reference state): every readout's values over the seeds that reached it."""

    arm: str
    round: str
    seeds: tuple[int, ...]
    values: dict[str, list[float]]  # readout name (READOUTS, GAIN) -> one value per seed, NaN where unmeasured

    def seeds_cell(self) -> str:
        return f"{len(self.seeds)} ({', '.join(map(str, self.seeds))})"

    def by_seed(self, name: str) -> dict[int, float]:
        """The seeds that measured the readout, with their values (a readout newer than a seed's page: absent)."""
        values = self.values.get(name, [math.nan] * len(self.seeds))
        return {seed: value for seed, value in zip(self.seeds, values, strict=True) if not math.isnan(value)}

    def finite(self, name: str) -> list[float]:
        return list(self.by_seed(name).values())


def group_rows(label: str, seeds: dict[int, PageRun]) -> list[PooledRow]:
    rows = []
    for r in sorted({r for run in seeds.values() for r in run.rounds()}):
        at = [run for _, run in sorted(seeds.items()) if r in run.rounds()]
        values = {name: [run.value(f"healed {r}", key) for run in at] for name, key in READOUTS.items()}
        rows.append(
            PooledRow(label, str(r), tuple(run.config.seed for run in at), values | {GAIN: [run.gain(r) for run in at]})
        )
    return rows


def reference_rows(groups: dict[str, dict[int, PageRun]]) -> list[PooledRow]:
    """The untrained base and the prompting baseline per seed, from the anchor's run of that seed where there is one
    (trait and fluency are the same in every run of a seed; the keep-rate of the base's replies follows the arm's
    filter, so it is the anchor's filter's)."""
    by_seed = dict(groups.get(ANCHOR_LABEL, {}))
    for seeds in groups.values():
        for seed, run in seeds.items():
            by_seed.setdefault(seed, run)
    rows = []
    for stage in ("base", "prompt-baseline"):
        at = [run for _, run in sorted(by_seed.items()) if stage in run.rows]
        values = {name: [run.value(stage, key) for run in at] for name, key in READOUTS.items()}
        rows.append(PooledRow(stage, "-", tuple(run.config.seed for run in at), values))
    return rows


def table(rows: list[PooledRow]) -> list[str]:
    names = [*READOUTS, GAIN]
    lines = [f"| arm | round | seeds | {' | '.join(names)} |", "|---|---|---|" + "---|" * len(names)]
    for row in rows:
        cells = [band(row.finite(name), sign="+" if name == GAIN else "") + _coverage(row, name) for name in names]
        lines.append(f"| {row.arm} | {row.round} | {row.seeds_cell()} | {' | '.join(cells)} |")
    return lines


def _mean(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f}" if values else "-"


def _coverage(row: PooledRow, name: str) -> str:
    """Which seeds a cell averages when some of the row's seeds lack the readout (a readout added after them)."""
    measured = list(row.by_seed(name))
    if not measured or len(measured) == len(row.seeds):
        return ""
    return f" (seed{'s' if len(measured) > 1 else ''} {', '.join(map(str, measured))})"


def at_a_glance(rows: list[PooledRow], rounds: tuple[int, ...]) -> list[str]:
    """The arms that reached the last of `rounds` in some seed, one line each: trait / held-out trait / neutral
    fluency / adherence (seed means) and the gain over the base curve at each of those rounds."""
    arms = [arm for arm in dict.fromkeys(row.arm for row in rows)
            if any(row.arm == arm and row.round == str(max(rounds)) for row in rows)]  # fmt: skip
    header = " | ".join(f"round {r}" for r in rounds)
    lines = [f"| arm | {header} |", "|---|" + "---|" * len(rounds)]
    for arm in arms:
        cells = []
        for r in rounds:
            row = next((row for row in rows if row.arm == arm and row.round == str(r)), None)
            if row is None:
                cells.append("-")
                continue
            readouts = " / ".join(
                _mean(row.finite(name)) + _coverage(row, name)
                for name in ("trait", "held-out trait", "neutral fluency", "adherence")
            )
            gain = band(row.finite(GAIN), sign="+")
            cells.append(f"{readouts}; {gain} (seeds {', '.join(map(str, row.seeds))})")
        lines.append(f"| {arm} | {' | '.join(cells)} |")
    return lines


def _finite(values: list[float]) -> list[float]:
    return [value for value in values if not math.isnan(value)]


def source_lines(sources: dict[str, dict[int, list[PageRun]]]) -> list[str]:
    """Where each arm's seeds were read: the page, the run name there and the rounds it has."""
    lines = []
    for label, seeds in sources.items():
        read = [f"seed {seed} `{run.name}` of `{run.page}` (rounds {_span(run.rounds())})"
                for seed, runs in sorted(seeds.items()) for run in runs]  # fmt: skip
        lines.append(f"- {label}: {'; '.join(read)}")
    return lines


def _span(rounds: list[int]) -> str:
    return f"{rounds[0]}-{rounds[-1]}" if rounds else "none"


def repeat_lines(repeats: list[tuple[PageRun, PageRun]]) -> list[str]:
    """Each config and seed measured twice: the largest |difference| over the stages both have."""
    lines = []
    for first, second in repeats:
        stages = sorted(set(first.rows) & set(second.rows))
        diffs = {key: max(_finite([abs(first.value(s, key) - second.value(s, key)) for s in stages]), default=math.nan)
                 for key in REPEAT_READOUTS}  # fmt: skip
        measured = ", ".join(f"{key} {value:.4f}" for key, value in diffs.items())
        lines.append(f"- `{first.name}` of `{first.page}` and `{second.name}` of `{second.page}` (seed "
                     f"{first.config.seed}, stages {', '.join(stages)}): largest |difference| {measured}")  # fmt: skip
    return lines


def pooled_csv(rows: list[PooledRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["arm", "round", "seeds", "readout", "mean", "min", "max", "n"])
    for row in rows:
        for name in [*READOUTS, GAIN]:
            if values := row.finite(name):
                writer.writerow([row.arm, row.round, row.seeds_cell(), name, sum(values) / len(values), min(values),
                                 max(values), len(values)])  # fmt: skip
    return buffer.getvalue()


def _path(rows: list[PooledRow], name: str) -> tuple[list[float], list[float], list[float]]:
    """Per round: the seeds' mean and the whiskers up to their max and down to their min."""
    means, plus, minus = [], [], []
    for row in rows:
        values = row.finite(name)
        mean = sum(values) / len(values) if values else math.nan
        means.append(mean)
        plus.append(max(values) - mean if values else 0.0)
        minus.append(mean - min(values) if values else 0.0)
    return means, plus, minus


def _whiskers(plus: list[float], minus: list[float]) -> dict[str, object]:
    return {"type": "data", "symmetric": False, "array": plus, "arrayminus": minus}


def pooled_figure(rows: list[PooledRow], references: list[PooledRow]) -> go.Figure:
    """Trait against neutral fluency (left) and against task adherence (right): each multi-round arm's rounds as a
    path of seed means, whiskers from the seeds' min to max; the base and the prompting baseline as stars. Arms
    run for round 0 only (the subset arms) are in the tables, not here."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=("trait vs neutral fluency", "trait vs task adherence"),
                           shared_yaxes=True)  # fmt: skip
    arms = [arm for arm in dict.fromkeys(row.arm for row in rows) if any(r.arm == arm and r.round != "0" for r in rows)]
    for col, x_name in enumerate(("neutral fluency", "adherence"), start=1):
        for row in references:
            (x, _, _), (y, _, _) = _path([row], x_name), _path([row], "trait")
            star = {"symbol": "star", "size": 14, "color": "black"}
            figure.add_trace(go.Scatter(x=x, y=y, mode="markers+text", name=row.arm, text=[row.arm], marker=star,
                                        textposition="bottom center", showlegend=col == 1, legendgroup=row.arm),
                             row=1, col=col)  # fmt: skip
        for arm, colour in zip(arms, qualitative.Dark24 * 4, strict=False):
            at = [row for row in rows if row.arm == arm]
            (x, x_plus, x_minus), (y, y_plus, y_minus) = _path(at, x_name), _path(at, "trait")
            figure.add_trace(go.Scatter(
                x=x, y=y, mode="lines+markers+text", name=arm, line={"color": colour}, legendgroup=arm,
                showlegend=col == 1, text=[row.round for row in at], textposition="top center",
                error_x=_whiskers(x_plus, x_minus), error_y=_whiskers(y_plus, y_minus),
            ), row=1, col=col)  # fmt: skip
        figure.update_xaxes(title_text=x_name, row=1, col=col)
    figure.update_yaxes(title_text="trait (paired-response log-odds)", row=1, col=1)
    figure.update_layout(title="Every arm, seeds pooled: mean over seeds, whiskers min-max (label: round)",
                         width=1400, height=700, legend={"orientation": "h", "y": -0.15})  # fmt: skip
    return figure


def pooled_from(sweep_paths: list[Path]) -> Pooled:
    """Every arm's seeds from the committed pages of these sweep files (the first one's anchor names the arms)."""
    if not sweep_paths:
        raise DataError("pooled needs at least one sweep file (-c)")
    pages = [read_page(path) for path in sweep_paths]
    reference = sweep_configs(sweep_paths[0])[load_sweep(sweep_paths[0]).anchor]
    return pool(pages, reference)


def pooled_rows(pooled: Pooled) -> tuple[list[PooledRow], list[PooledRow]]:
    """(every arm at every round, the base and prompting-baseline rows)."""
    groups = pooled.groups()
    return [row for label, seeds in groups.items() for row in group_rows(label, seeds)], reference_rows(groups)


def write_pooled_report(sweep_paths: list[Path], out: Path, rounds: tuple[int, ...] = (0, 2, 5)) -> Path:
    pooled = pooled_from(sweep_paths)
    first = load_sweep(sweep_paths[0])
    rows, references = pooled_rows(pooled)
    rounds = tuple(sorted(rounds))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "pooled.csv", pooled_csv([*rows, *references]))
    save_figure(pooled_figure(rows, references), out / "pooled")
    sources = ", ".join(f"`{path}` (`{load_sweep(path).report_dir}`)" for path in sweep_paths)
    lines = [
        "# Every arm, seeds pooled across sweep pages",
        "",
        f"`python cli.py pooled {' '.join(f'-c {path}' for path in sweep_paths)} -o {out}`, from the committed "
        f"pages of {sources}: no run folder is read. Arms are named by how their config differs from "
        f"`{first.anchor}` of the first page (seed, rounds, run folder and MFV on/off left out). Each cell: mean "
        "[min, max] over the seeds that reached the round (one seed: its value). *vs base curve*: the healed "
        "trait minus its own seed's base steering curve at its fluency, where the page recorded it (`gains.csv`; "
        "'-': none recorded, as for the subset arms of the pages older than `gains.csv`, whose tables left them out). "
        "A seed run on two pages is read stage by stage from the first page that has the stage.",
        "",
        f"## At rounds {', '.join(map(str, rounds))}",
        "",
        f"Each arm that reached round {rounds[-1]} in some seed; per round the seed means of trait / held-out trait / "
        "neutral fluency / adherence (held-out trait: the state's own replies read by the base under the pos vs the "
        "neg persona, nats/token; the seeds named where only some have it), then the gain over the base curve: mean "
        "[min, max] over the seeds that recorded it.",
        "",
        *at_a_glance(rows, rounds),
        "",
        "## Every arm, every round",
        "",
        *table([*rows, *references]),
        "",
        "![pooled](pooled.png)",
        "",
        "## Measured twice",
        "",
        *(repeat_lines(pooled.repeats()) or ["No config and seed is on two pages."]),
        "",
        "## Where each seed was read",
        "",
        *source_lines(pooled.sources),
        "",
    ]
    path = out / "pooled.md"
    atomic_write_text(path, "\n".join(lines))
    return path
