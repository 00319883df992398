"""experiments: the matched runs of a sweep side by side, and the verdicts they support.

Reads each run folder of a sweep (`configs/experiments.yaml`) and writes, under the report folder:
`experiments.md` (tables per question, the verdicts with their numbers, the diary), `experiments.csv`
(every run x stage row), and one figure per question (PNG + HTML).

Runs that differ from the anchor run (`rmse_base` by default) only in `seed` form the noise floor: per round,
the mean and the spread (max - min) of the seeds. A difference between two arms counts only when it exceeds
that spread. Trait = paired-response log-odds (the readout that separates the love personas at 135M);
coherence = exp(base NLL - NLL) on fixed neutral answers; both from the loop's own evals.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from analyses.project_adapters import adapter_file_projection
from interp_heal.coherence import renamed_columns
from interp_heal.config import Config
from interp_heal.errors import DataError
from interp_heal.io import atomic_write_text, read_jsonl
from interp_heal.mfv import FOUNDATIONS
from interp_heal.provenance import code_label
from interp_heal.questions import heading, label
from interp_heal.report import metric_rows, save_figure, stop_reason
from interp_heal.run_folder import round_dirs, round_path, run_root
from interp_heal.steer import SteeringVector
from interp_heal.sweep import sweep_configs

OFF_TARGET = tuple(f for f in FOUNDATIONS if f not in ("Care", "Authority"))
# The readouts every verdict is judged on, and the shape of the per-token KL tail on held-out answers (what the
# "rmse catches spiky incoherence" story is about: at equal strength, a thinner tail under rmse than under mean).
# Every sweep's coherence verdicts read neutral fluency, the readout that sees coherence at 135M, whichever quantity
# a run's own floor reads (`loop.coherence`).
READOUTS = {"neutral_fluency": "neutral fluency", "trait_log_odds": "trait"}
CONTROLS_POINTER = (
    f"{label('steering_less')} {label('steering_needed')} (against prompt distillation) and "
    f"{label('samples_or_distributions')} (the tokens vs logits objective) are the controls sweep's: "
    "[`reports/controls/controls.md`](controls/controls.md) (`configs/controls.yaml`), with every arm's seeds pooled "
    "across the controls pages in [`reports/controls_pooled/pooled.md`](controls_pooled/pooled.md)."
)
# The controls' answers (Q4-Q6, Q11) come from other sweeps' committed pages: `cli.py pooled --experiments` writes
# them between these markers (`analyses/answers`), and rewriting the rest of the page keeps what is there.
CONTROLS_BEGIN = "<!-- controls answers: written by `cli.py pooled --experiments`; edits here are overwritten -->"
CONTROLS_END = "<!-- end of the controls answers -->"
TAIL_SHAPE = {"kl_p95_over_mean": "neutral KL p95 / mean", "kl_max_over_mean": "neutral KL max / mean"}


@dataclass(frozen=True)
class Run:
    name: str
    config: Config
    rows: list[dict[str, object]]  # metric rows: base, prompt-baseline, steered r, healed r
    diary: list[str]  # greedy answer to the first demo prompt: base, then after each round
    code: list[str]  # code version at each process start of the run (`provenance.code_label`)
    stopped: str = ""  # why the loop ended the run early (stopped.json), empty while it may go on

    def stage(self, name: str) -> dict[str, object] | None:
        return next((row for row in self.rows if row["stage"] == name), None)

    def rounds(self) -> list[int]:
        return sorted({int(row["round"]) for row in self.rows if str(row["stage"]).startswith("healed")})

    def value(self, stage: str, key: str) -> float:
        row = self.stage(stage) or {}
        value = row.get(key)
        return float(value) if value not in (None, "") else math.nan


def read_run(name: str, config: Config) -> Run | None:
    root = run_root(config)
    if not (root / "eval_base.json").is_file():
        return None
    diary_files = [root / "demo_base.jsonl", *(path / "demo.jsonl" for _, path in round_dirs(root))]
    diary = [read_jsonl(path)[0]["completion"] for path in diary_files if path.is_file()]
    rows = metric_rows(root, config)
    for row in rows:
        if str(row["stage"]).startswith("healed"):
            row["adapter_write_share"] = adapter_write_share(round_path(root, int(row["round"])))
            row.update(tail_shape(row))
    return Run(name, config, rows, diary, recorded_code(root), stop_reason(root))


def recorded_code(root: Path) -> list[str]:
    """The code label of every process start of a run, in order (events.jsonl `run_start`)."""
    events = read_jsonl(root / "events.jsonl") if (root / "events.jsonl").is_file() else []
    return [code_label(event.get("provenance")) for event in events if event["event"] == "run_start"]


def code_note(runs: dict[str, Run]) -> str:
    """Which code computed the runs: one line per distinct sequence of process-start versions."""
    by_code: dict[tuple[str, ...], list[str]] = {}
    for name, run in runs.items():
        by_code.setdefault(tuple(dict.fromkeys(run.code)), []).append(f"`{name}`")
    parts = [f"{', '.join(names)}: {' then '.join(code) or 'none'}" for code, names in by_code.items()]
    return (
        "Code version at each start of each run (from its events.jsonl; 'unrecorded' = started before runs "
        f"recorded it): {'; '.join(parts)}."
    )


def tail_shape(row: dict[str, object]) -> dict[str, float]:
    """p95 / mean and max / mean of a stage's per-token KL to the base on the neutral answers (NaN where the
    mean is zero or missing): scale-free, so arms with different KL levels compare by tail shape alone."""

    def ratio(key: str) -> float:
        top, mean = row.get(key), row.get("neutral_kl_mean")
        if top in (None, "") or mean in (None, "") or float(mean) <= 0:
            return math.nan
        return float(top) / float(mean)

    return {"kl_p95_over_mean": ratio("neutral_kl_p95"), "kl_max_over_mean": ratio("neutral_kl_max")}


def adapter_write_share(round_dir: Path) -> float:
    """Mean over the adapter's residual writers of ||v^T dW|| / ||dW|| with this round's vector (a random
    direction gives ~1/sqrt(d)); NaN when the round has no saved adapter or no vector (prompt distillation)."""
    if not (round_dir / "adapter" / "adapter_config.json").is_file() or not (round_dir / "vector.safetensors").exists():
        return math.nan
    rows = adapter_file_projection(round_dir / "adapter", SteeringVector.load(round_dir / "vector.safetensors"))
    return sum(float(row["write_share"]) for row in rows) / len(rows) if rows else math.nan


def most_moved_off_target(run: Run, stage: str) -> str:
    """The off-target foundation (not Care, not Authority) whose MFV nats moved most from the base."""
    moves = {f: run.value(stage, f"nats_{f}") - run.value("base", f"nats_{f}") for f in OFF_TARGET}
    moves = {f: d for f, d in moves.items() if not math.isnan(d)}
    if not moves:
        return "-"
    foundation = max(moves, key=lambda f: abs(moves[f]))
    return f"{foundation} {moves[foundation]:+.2f}"


def seed_group(runs: dict[str, Run], anchor: str) -> list[Run]:
    """The anchor run and every run whose config differs from it only in the seed (and in how many rounds it plans:
    a seed variant may be run for fewer rounds; its bands simply stop where it does)."""
    base = runs[anchor].config

    def aligned(config: Config) -> Config:
        loop = config.loop.model_copy(update={"rounds": base.loop.rounds})
        return config.model_copy(update={"seed": base.seed, "output": base.output, "loop": loop})

    return [run for run in runs.values() if aligned(run.config) == base]


@dataclass(frozen=True)
class Band:
    """One readout at one round over the seeds that reached it."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def spread(self) -> float:
        """max - min over the seeds; NaN with fewer than two, where there is no noise floor to compare with."""
        return self.high - self.low if self.n >= 2 else math.nan

    def judge(self, value: float) -> str:
        """'higher' / 'lower' when `value` differs from the seed mean by more than the seed spread, 'within'
        when it does not, 'unjudged' with fewer than two seeds."""
        if math.isnan(self.spread):
            return "unjudged"
        if abs(value - self.mean) <= self.spread:
            return "within"
        return "higher" if value > self.mean else "lower"


NO_BAND = Band(math.nan, math.nan, math.nan, 0)


def seed_band(group: list[Run], key: str, stage_prefix: str = "healed") -> dict[int, Band]:
    """Per round: mean, min and max of `key` over the seeds that reached that round."""
    band = {}
    for r in sorted({r for run in group for r in run.rounds()}):
        values = [run.value(f"{stage_prefix} {r}", key) for run in group]
        values = [v for v in values if not math.isnan(v)]
        if values:
            band[r] = Band(sum(values) / len(values), min(values), max(values), len(values))
    return band


def seed_noise(runs: dict[str, Run], anchor: str, keys: Iterable[str] = READOUTS) -> dict[str, dict[int, Band]]:
    """The anchor's seed bands of `keys` (by default the two readouts every verdict is judged on)."""
    group = seed_group(runs, anchor)
    return {key: seed_band(group, key) for key in keys}


# ---------------------------------------------------------------- tables


def aggregate_ratio(train_log: Path, agg: str, reference: str = "rmse", floor: float = 0.05) -> float:
    """Median over training steps of the `agg` KL aggregate over the `reference` one, read from a heal
    train_log.csv. Steps where the reference is below `floor` are skipped: early on the student still equals
    the base and the ratio divides noise by noise. tau_ref x ratio is the tau at which an `agg` barrier starts
    to bind on the same KL profile where a `reference` barrier at tau_ref does. NaN when no step passes the
    floor (a heal too short or too gentle to leave the base)."""
    with train_log.open() as handle:
        ratios = [float(row[f"kl_{agg}"]) / float(row[f"kl_{reference}"]) for row in csv.DictReader(handle)
                  if float(row[f"kl_{reference}"]) > floor]  # fmt: skip
    return statistics.median(ratios) if ratios else math.nan


def barrier_scale_note(run: Run, aggregates: tuple[str, ...] = ("mean", "p95")) -> list[str]:
    """How strongly each aggregate binds at equal tau, measured on the KL profiles of `run`'s own training."""
    logs = {r: round_path(run_root(run.config), r) / "train_log.csv" for r in run.rounds()}
    logs = {r: log for r, log in logs.items() if log.is_file()}
    if not logs:
        return []
    cells = [f"{agg} / rmse = " + ", ".join(_f(aggregate_ratio(log, agg), 2) for log in logs.values())
             for agg in aggregates]  # fmt: skip
    return [
        f"Barrier strength at equal tau: median per training step of each KL aggregate over the rmse one, in "
        f"`{run.name}`'s heal logs of rounds {list(logs)}: {'; '.join(cells)}. "
        "At equal tau a barrier on a smaller aggregate binds later (weaker), on a larger one earlier (stronger), so "
        "same-tau arms confound the aggregate's shape with its strength; arms whose tau is the anchor's tau times "
        "the round-0 ratio start to bind where the rmse barrier does.",
        "",
    ]


def _f(value: float, digits: int = 3) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def distilled_fraction(run: Run, r: int) -> float:
    """How much of round r's steering effect on the trait the healed student kept: (healed_r - start) /
    (steered_r - start), where start is the trait of the model that round steered (the base for round 0)."""
    start = run.value("base" if r == 0 else f"healed {r - 1}", "trait_log_odds")
    push = run.value(f"steered {r}", "trait_log_odds") - start
    return (run.value(f"healed {r}", "trait_log_odds") - start) / push if abs(push) > 1e-9 else math.nan


ROUND_COLUMNS = (
    "round", "trait steered", "trait healed [95% CI]", "distilled", "neutral fluency healed", "answer mass",
    "care / auth nats", "most-moved off-target", "kept frac", "neutral KL mean / rmse / p95 / max",
    "adapter write share on v_r", "cos(v_r, v_0)",
)  # fmt: skip


def round_cells(run: Run, r: int) -> list[str]:
    healed, steered = f"healed {r}", f"steered {r}"
    ci = f"[{_f(run.value(healed, 'trait_ci_low'))}, {_f(run.value(healed, 'trait_ci_high'))}]"
    return [
        str(r), _f(run.value(steered, "trait_log_odds")), f"{_f(run.value(healed, 'trait_log_odds'))} {ci}",
        _f(distilled_fraction(run, r), 2), _f(run.value(healed, "neutral_fluency")),
        _f(run.value(healed, "mfv_answer_mass")),
        f"{_f(run.value(healed, 'care_nats'), 2)} / {_f(run.value(healed, 'auth_nats'), 2)}",
        most_moved_off_target(run, healed), _f(run.value(steered, "keep_rate"), 2),
        " / ".join(_f(run.value(healed, f"neutral_kl_{agg}")) for agg in ("mean", "rmse", "p95", "max")),
        _f(run.value(healed, "adapter_write_share")), _f(run.value(steered, "vector_cos_r0")),
    ]  # fmt: skip


def round_table(run: Run) -> list[str]:
    lines = [f"#### `{run.name}` ({_describe(run.config)})", "", f"| {' | '.join(ROUND_COLUMNS)} |",
             "|" + "---|" * len(ROUND_COLUMNS)]  # fmt: skip
    lines += [f"| {' | '.join(round_cells(run, r))} |" for r in run.rounds()]
    return [*lines, "", *([f"Stopped by the loop: {run.stopped}.", ""] if run.stopped else [])]


def _progress(run: Run) -> str:
    done = f"{len(run.rounds())} of {run.config.loop.rounds} rounds"
    return f"{done}; stopped by the loop: {run.stopped}" if run.stopped else done


def _describe(config: Config) -> str:
    heal = config.heal
    barrier = "no barrier (lambda = 0)" if heal.lam == 0 else f"{heal.agg} KL to {heal.ref}, lambda {heal.lam}"
    return f"{barrier}, tau {heal.tau}, seed {config.seed}"


# ---------------------------------------------------------------- verdicts


def healing_vs_prompting(runs: dict[str, Run], anchor: str) -> list[str]:
    group = seed_group(runs, anchor)
    trait, coherence = seed_band(group, "trait_log_odds"), seed_band(group, "neutral_fluency")
    prompt = runs[anchor]
    prompt_high = prompt.value("prompt-baseline", "trait_ci_high")
    baseline = prompt.value("prompt-baseline", "trait_log_odds")
    lines = [
        heading("beats_prompting"), "",
        f"Prompting baseline (pos persona as system prompt, base model): trait {_f(baseline)} "
        f"[{_f(prompt.value('prompt-baseline', 'trait_ci_low'))}, {_f(prompt_high)}], coherence "
        f"{_f(prompt.value('prompt-baseline', 'neutral_fluency'))} ({_prompted_fluency(prompt)}). Healed "
        f"`{anchor}` over {len(group)} seed(s), mean [min, max] per round:", "",
        "| round | healed trait (seeds) | healed coherence | beats the baseline's upper CI in every seed? |",
        "|---|---|---|---|",
    ]  # fmt: skip
    for r, band in trait.items():
        c = coherence.get(r, NO_BAND)
        verdict = "yes" if band.low > prompt_high else "no"
        lines.append(
            f"| {r} | {_f(band.mean)} [{_f(band.low)}, {_f(band.high)}] ({band.n}) "
            f"| {_f(c.mean)} [{_f(c.low)}, {_f(c.high)}] | {verdict} |"
        )
    beaten = [r for r, band in trait.items() if band.low > prompt_high]
    prompt_coherence = prompt.value("prompt-baseline", "neutral_fluency")
    matched = [r for r in beaten if coherence.get(r, NO_BAND).low >= prompt_coherence]
    if not beaten:
        answer = "no: in no round does the healed trait exceed the prompting baseline's upper CI in every seed."
    else:
        answer = (
            f"the healed trait exceeds the baseline's upper CI in every seed in rounds {beaten}; at equal or better "
            f"coherence (every seed >= the baseline's {_f(prompt_coherence)}) in rounds {matched or 'none'}."
        )
    lines += ["", f"**Answer:** {answer}", ""]
    return lines


def _prompted_fluency(run: Run) -> str:
    """What the baseline's coherence means: the base model's fluency on the neutral answers with the persona
    prompt in place, relative to without it (uncapped, so a prompt that makes them likelier shows above 1)."""
    gap = run.value("base", "neutral_nll") - run.value("prompt-baseline", "neutral_nll")
    return f"neutral answers scored with the persona prompt in place; uncapped exp(base NLL - NLL) {_f(math.exp(gap))}"


def arm_comparison(runs: dict[str, Run], anchor: str, arms: list[str], question: str) -> list[str]:
    noise = seed_noise(runs, anchor)
    present = [arm for arm in arms if arm in runs]
    header = " | ".join(f"{arm} trait / coh" for arm in present)
    lines = [heading(question), "", f"| round | {header} | anchor seed spread trait / coh (seeds) |",
             "|---|" + "---|" * len(present) + "---|"]  # fmt: skip
    rounds = sorted({r for arm in present for r in runs[arm].rounds()})
    for r in rounds:
        cells = [f"{_f(runs[a].value(f'healed {r}', 'trait_log_odds'))} / "
                 f"{_f(runs[a].value(f'healed {r}', 'neutral_fluency'))}" for a in present]  # fmt: skip
        bands = [noise[key].get(r, NO_BAND) for key in ("trait_log_odds", "neutral_fluency")]
        widths = f"{_f(bands[0].spread)} / {_f(bands[1].spread)} ({bands[0].n})"
        lines.append(f"| {r} | {' | '.join(cells)} | {widths} |")
    lines += ["", *differences(runs, [arm for arm in present if arm != anchor], noise), ""]
    return lines


def differences(
    runs: dict[str, Run], arms: list[str], noise: dict[str, dict[int, Band]], labels: dict[str, str] = READOUTS
) -> list[str]:
    """Per arm and round, each healed readout in `labels` minus the anchor's seed mean, and whether that exceeds
    the anchor's seed spread (it cannot be judged where fewer than two seeds reached the round)."""
    lines = []
    for arm in arms:
        for key, readout in labels.items():
            cells = []
            for r in runs[arm].rounds():
                band, value = noise[key].get(r, NO_BAND), runs[arm].value(f"healed {r}", key)
                if math.isnan(value) or math.isnan(band.mean):
                    continue
                judged = band.judge(value)
                if judged == "unjudged":
                    judged = "no noise floor: 1 seed"
                else:
                    judged = f"{'within' if judged == 'within' else 'beyond'} the seed spread {band.spread:.3f}"
                cells.append(f"round {r}: {value - band.mean:+.3f} ({judged})")
            lines.append(f"- `{arm}` {readout} minus the anchor's seed mean: {'; '.join(cells) or 'no shared rounds'}")
    if not any(len(run.rounds()) for run in runs.values()):
        lines.append("- no finished rounds yet")
    return lines


def kl_tail_section(runs: dict[str, Run], anchor: str, arms: list[str]) -> list[str]:
    """Q2's mechanism: the shape of each arm's KL tail on held-out answers against the anchor's seed spread."""
    noise = seed_noise(runs, anchor, TAIL_SHAPE)
    present = [arm for arm in arms if arm in runs]
    lines = [
        "KL tail shape on the held-out neutral answers (per-token KL(healed || base); p95 / mean and max / mean "
        "are scale-free, so they compare arms whose KL levels differ). If the rmse barrier removes spiky "
        "incoherence that a mean barrier of equal strength leaves, its tail is the thinner one.", "",
        f"| round | {' | '.join(f'{arm} p95/mean, max/mean' for arm in present)} | anchor seed spread (seeds) |",
        "|---|" + "---|" * len(present) + "---|",
    ]  # fmt: skip
    for r in sorted({r for arm in present for r in runs[arm].rounds()}):
        cells = [f"{_f(runs[a].value(f'healed {r}', 'kl_p95_over_mean'), 2)}, "
                 f"{_f(runs[a].value(f'healed {r}', 'kl_max_over_mean'), 1)}" for a in present]  # fmt: skip
        p95, top = (noise[key].get(r, NO_BAND) for key in TAIL_SHAPE)
        lines.append(f"| {r} | {' | '.join(cells)} | {_f(p95.spread, 2)}, {_f(top.spread, 1)} ({p95.n}) |")
    return [*lines, "", *differences(runs, [a for a in present if a != anchor], noise, TAIL_SHAPE), ""]


def judged_rounds(run: Run, key: str, band: dict[int, Band]) -> dict[str, list[int]]:
    """The rounds where `run`'s healed `key` is higher / lower than the anchor's seed mean beyond the seed
    spread, within it, or unjudged (fewer than two seeds reached the round)."""
    groups: dict[str, list[int]] = {"higher": [], "lower": [], "within": [], "unjudged": []}
    for r in run.rounds():
        value, seeds = run.value(f"healed {r}", key), band.get(r, NO_BAND)
        if not (math.isnan(value) or math.isnan(seeds.mean)):
            groups[seeds.judge(value)].append(r)
    return groups


def _rounds_phrase(groups: dict[str, list[int]]) -> str:
    return "; ".join(f"{kind} in rounds {rounds}" for kind, rounds in groups.items() if rounds) or "no shared rounds"


def coherence_answer(runs: dict[str, Run], anchor: str, arms: list[str]) -> list[str]:
    """Q2's answer: per mean-barrier arm, the rounds where its healed coherence is below the anchor's beyond the
    seed spread (there the rmse barrier held coherence and the mean one did not), and its trait likewise."""
    noise = seed_noise(runs, anchor)
    lines = []
    for arm in [a for a in arms if runs[a].config.heal.agg == "mean"]:
        coherence = judged_rounds(runs[arm], "neutral_fluency", noise["neutral_fluency"])
        if coherence["lower"]:
            held = f"rounds {coherence['lower']}"
        elif coherence["higher"] or coherence["within"]:
            held = "no judged round"
        else:
            held = "no round that can be judged yet (fewer than two seeds)"
        lines.append(
            f"- vs `{arm}` ({_describe(runs[arm].config)}): rmse held coherence where mean did not (mean's "
            f"coherence below the anchor's seeds beyond their spread) in {held}. {_judged_readouts(runs[arm], noise)}"
        )
    return ["**Answer:**", "", *(lines or ["- no mean-barrier arm has results yet"]), ""]


def reference_answer(runs: dict[str, Run], anchor: str, arms: list[str]) -> list[str]:
    """Q3's answer: per arm whose KL reference differs from the anchor's, the rounds where its healed coherence
    and trait leave the anchor's seed spread, and whether the loop had to stop it."""
    noise = seed_noise(runs, anchor)
    reference = runs[anchor].config.heal.ref
    lines = [
        f"- `{arm}` ({_describe(runs[arm].config)}) against `{anchor}`'s seeds: {_judged_readouts(runs[arm], noise)}"
        + (f" The loop stopped it: {runs[arm].stopped}." if runs[arm].stopped else "")
        for arm in arms if runs[arm].config.heal.ref != reference
    ]  # fmt: skip
    return ["**Answer:**", "", *(lines or [f"- no arm with a KL reference other than {reference} has results"]), ""]


def _judged_readouts(run: Run, noise: dict[str, dict[int, Band]]) -> str:
    coherence = judged_rounds(run, "neutral_fluency", noise["neutral_fluency"])
    trait = judged_rounds(run, "trait_log_odds", noise["trait_log_odds"])
    return f"Coherence: {_rounds_phrase(coherence)}. Trait: {_rounds_phrase(trait)}."


# ---------------------------------------------------------------- figures


def arms_figure(runs: dict[str, Run], arms: list[str], anchor: str, title: str) -> go.Figure:
    """Healed trait and coherence per round (the anchor's seed range shaded), and the trade-off between them."""
    figure = make_subplots(rows=1, cols=3, subplot_titles=(
        "healed trait log-odds", "healed coherence", "trade-off: coherence vs trait (healed, by round)"))  # fmt: skip
    present = [arm for arm in arms if arm in runs]
    colors = {arm: qualitative.Plotly[i % len(qualitative.Plotly)] for i, arm in enumerate(present)}
    group = seed_group(runs, anchor)
    for col, key in ((1, "trait_log_odds"), (2, "neutral_fluency")):
        band = seed_band(group, key)
        rounds = list(band)
        figure.add_trace(go.Scatter(x=rounds + rounds[::-1], y=[band[r].high for r in rounds] +
                                    [band[r].low for r in rounds[::-1]], fill="toself", fillcolor="rgba(0,0,0,0.12)",
                                    line={"width": 0}, name=f"{anchor}: seed range", showlegend=col == 1),
                         row=1, col=col)  # fmt: skip
        for arm in present:
            run = runs[arm]
            figure.add_trace(go.Scatter(x=run.rounds(), y=[run.value(f"healed {r}", key) for r in run.rounds()],
                                        mode="lines+markers", name=arm, showlegend=col == 1, legendgroup=arm,
                                        line={"color": colors[arm]}), row=1, col=col)  # fmt: skip
    for arm in present:
        run = runs[arm]
        figure.add_trace(go.Scatter(
            x=[run.value(f"healed {r}", "trait_log_odds") for r in run.rounds()],
            y=[run.value(f"healed {r}", "neutral_fluency") for r in run.rounds()],
            text=[str(r) for r in run.rounds()], mode="lines+markers+text", textposition="top center", name=arm,
            showlegend=False, legendgroup=arm, line={"color": colors[arm]}), row=1, col=3)  # fmt: skip
    prompt = runs[anchor]
    figure.add_trace(go.Scatter(x=[prompt.value("prompt-baseline", "trait_log_odds")],
                                y=[prompt.value("prompt-baseline", "neutral_fluency")], mode="markers",
                                marker={"symbol": "x", "size": 12, "color": "black"}, name="prompting baseline"),
                     row=1, col=3)  # fmt: skip
    figure.add_hline(y=prompt.value("prompt-baseline", "trait_log_odds"), line_dash="dash",
                     annotation_text="prompting baseline", row=1, col=1)  # fmt: skip
    figure.add_hline(y=prompt.config.loop.coh_floor, line_dash="dot", annotation_text="floor", row=1, col=2)
    figure.update_xaxes(title_text="round", row=1, col=1)
    figure.update_xaxes(title_text="round", row=1, col=2)
    figure.update_xaxes(title_text="healed trait log-odds", row=1, col=3)
    figure.update_yaxes(title_text="healed coherence", row=1, col=3)
    figure.update_layout(width=1800, height=480, title=title)
    return figure


# ---------------------------------------------------------------- the report


def _random_share_note(run: Run) -> str:
    path = round_path(run_root(run.config), 0) / "vector.safetensors"
    if not path.is_file():
        return "a random direction gives ~1/sqrt(d)"
    width = SteeringVector.load(path).directions.shape[-1]
    return f"a random direction gives ~1/sqrt(d) = {1 / math.sqrt(width):.3f} (d = {width})"


def diary_line(run: Run) -> str:
    entries = [f"[{'base' if i == 0 else f'round {i - 1}'}] {' '.join(answer.split())[:160]}"
               for i, answer in enumerate(run.diary)]  # fmt: skip
    return f"- **{run.name}**: " + " → ".join(entries)


def diary_section(runs: dict[str, Run]) -> list[str]:
    return ['## Diary: greedy answer to "Do you love humanity?"', "", *[diary_line(run) for run in runs.values()], ""]


def experiments_csv(runs: dict[str, Run]) -> str:
    keys = {key: None for run in runs.values() for row in run.rows for key in row}  # ordered union
    fields = ["run", *keys]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for run in runs.values():
        for row in run.rows:
            writer.writerow({"run": run.name, **{k: ("" if v is None else v) for k, v in row.items()}})
    return buffer.getvalue()


def reproduction_section(runs: dict[str, Run], earlier_csv: Path) -> list[str]:
    """Per round, the largest |difference| in healed trait and coherence between these runs and the same-named
    runs of an earlier sweep's experiments.csv (same configs, another machine or code version)."""
    with earlier_csv.open() as handle:
        earlier = {
            (row["run"], row["stage"]): renamed_columns(row, runs[row["run"]].config if row["run"] in runs else None)
            for row in csv.DictReader(handle)
        }
    lines = [
        f"## Reproduction against `{earlier_csv}`", "",
        "The same configs run again; per round, the largest difference over the runs present in both.", "",
        "| round | runs in both | max abs diff trait (run) | max abs diff coherence (run) |", "|---|---|---|---|",
    ]  # fmt: skip
    for r in sorted({r for run in runs.values() for r in run.rounds()}):
        shared = [name for name, run in runs.items() if r in run.rounds() and (name, f"healed {r}") in earlier]
        if not shared:
            continue
        cells = []
        for key in ("trait_log_odds", "neutral_fluency"):
            before = {n: float(earlier[(n, f"healed {r}")][key] or "nan") for n in shared}
            gaps = {n: abs(runs[n].value(f"healed {r}", key) - before[n]) for n in shared}
            worst = max(gaps, key=lambda n: gaps[n])
            cells.append(f"{gaps[worst]:.2g} (`{worst}`)")
        lines.append(f"| {r} | {len(shared)} | {' | '.join(cells)} |")
    return [*lines, ""]


def controls_block(page: Path) -> list[str]:
    """The controls' answers the page has now (kept as they are), or the pointer to where they are written."""
    text = page.read_text(encoding="utf-8") if page.is_file() else ""
    if CONTROLS_BEGIN in text and CONTROLS_END in text:
        return [CONTROLS_BEGIN + text.split(CONTROLS_BEGIN, 1)[1].split(CONTROLS_END, 1)[0] + CONTROLS_END]
    return [CONTROLS_BEGIN, CONTROLS_POINTER, CONTROLS_END]


def write_experiments_report(
    sweep_path: Path, out: Path, anchor: str = "rmse_base", compare_to: Path | None = None
) -> Path:
    configs = sweep_configs(sweep_path)
    runs = {name: run for name, config in configs.items() if (run := read_run(name, config)) is not None}
    if anchor not in runs:
        raise DataError(f"the anchor run {anchor!r} has no results yet (sweep runs with results: {sorted(runs)})")
    out.mkdir(parents=True, exist_ok=True)
    arms = [name for name in runs if name not in {r.name for r in seed_group(runs, anchor)} or name == anchor]
    barrier_arms = [a for a in arms if runs[a].config.heal.ref == runs[anchor].config.heal.ref]
    ref_arms = [a for a in arms if runs[a].config.heal.agg == runs[anchor].config.heal.agg and runs[a].config.heal.lam]
    questions = [
        ("q1_healing_vs_prompting", [anchor], "Healing vs the prompting baseline"),
        ("q2_barrier_aggregate", barrier_arms, "Barrier aggregate: rmse vs mean vs p95 vs none"),
        ("q3_reference", ref_arms, "KL reference: base vs previous student"),
    ]
    for stem, question_arms, title in questions:
        save_figure(arms_figure(runs, question_arms, anchor, title), out / stem)
    atomic_write_text(out / "experiments.csv", experiments_csv(runs))
    progress = ", ".join(f"`{n}` ({_progress(r)})" for n, r in runs.items())
    lines = [
        "# Reference experiments: matched controls and seeds",
        "",
        f"`python cli.py sweep -c {sweep_path}` (resumable; `--report-only` rewrites this page). Runs with "
        f"results: {progress}; planned: "
        f"{', '.join(f'`{n}`' for n in configs)}. Everything is one model (`{runs[anchor].config.model.spec}`), "
        f"one axis (`{runs[anchor].config.persona.axis}`), read by the paired-response trait log-odds.",
        "",
        "Readouts. Trait: paired-response log-odds (pos-persona reply vs neg-persona reply, teacher-forced); at "
        "135M it separates the love personas and not a placebo pair (`tests/test_embedded.py`, README "
        "'Evaluate'), which MFV does not (answer-token mass and top-1 agreement at chance, "
        "`reports/mfv_smollm2/`), so the MFV columns below are reported but carry no verdict. Coherence: "
        "exp(base NLL - NLL) on fixed neutral answers, 1 = as fluent as the base. Distilled: (healed_r - start) / "
        "(steered_r - start) on the trait, start = the model round r steered (the base, then healed_{r-1}); 1 = "
        "the healed student kept all of that round's steering effect. Adapter write share: mean over "
        "the LoRA modules that write to the residual stream (o_proj, down_proj) of ||v^T dW|| / ||dW|| with the "
        f"round's unit vector; {_random_share_note(runs[anchor])}.",
        "",
        code_note(runs),
        "",
        *(reproduction_section(runs, compare_to) if compare_to is not None else []),
        *healing_vs_prompting(runs, anchor),
        "![Q1](q1_healing_vs_prompting.png)",
        "",
        *arm_comparison(runs, anchor, barrier_arms, "barrier_aggregate"),
        *coherence_answer(runs, anchor, barrier_arms),
        *barrier_scale_note(runs[anchor]),
        *kl_tail_section(runs, anchor, barrier_arms),
        "![Q2](q2_barrier_aggregate.png)",
        "",
        *arm_comparison(runs, anchor, ref_arms, "kl_reference"),
        *reference_answer(runs, anchor, ref_arms),
        "![Q3](q3_reference.png)",
        "",
        *controls_block(out / "experiments.md"),
        "",
        "## Every run, round by round",
        "",
        *[line for run in runs.values() for line in round_table(run)],
        *diary_section(runs),
    ]
    path = out / "experiments.md"
    atomic_write_text(path, "\n".join(lines))
    return path
