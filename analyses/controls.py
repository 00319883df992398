"""controls: the decisive controls of a sweep (`configs/controls.yaml`): is healing more than steering less (Q4),
is steering needed at all (Q5), and samples or distributions (Q6: the {steer, prompt} x {tokens, logits} table)?

Every arm is read on one common yardstick, the **base steering curve**: the base model steered with the anchor
run's round-0 vector at a ladder of doses (`analyses/frontier.py`, the anchor's `frontier_round_00.json`),
trait against neutral fluency. A student above that curve at its own fluency has more trait than any dose of
the plain vector gives at that fluency; on or below it, the student is "the vector, less of it". The gain's
95% CI resamples readout items (`frontier.healing_gain`). Steer arms also have their own per-round frontier
(the student that round started from, steered with that round's vector), reported beside it.

Q5 compares each arm with the anchor at the same round on the same items (paired difference with a CI over
items), next to both arms' fluency, generation coherence and task adherence: fluent text that does not answer
its prompt is not a win. With one seed per arm there is no seed band; every interval here is over readout
items within a run, and the page says so.

Writes `controls.md`, `controls.csv` (every run x stage row), `gains.csv` (every healed student against its
seed's base curve) and `pareto.png/html` under the report folder.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from analyses.experiments import Run, code_note, diary_section, experiments_csv, read_run, seed_group
from analyses.frontier import CurvePoint, healing_gain
from interp_heal.adherence import adherence_prompts
from interp_heal.coherence import read_frontier
from interp_heal.collect import read_kept_completions
from interp_heal.config import Config
from interp_heal.errors import DataError
from interp_heal.evaluate import paired_difference
from interp_heal.io import atomic_write_text, read_json
from interp_heal.questions import heading
from interp_heal.report import save_figure
from interp_heal.run_folder import round_path, run_root
from interp_heal.sweep import sweep_configs

N_BOOTSTRAP = 2000


def arm_kind(run: Run) -> str:
    """'steer x tokens' etc.: the two settings the controls vary."""
    return f"{run.config.loop.source} x {run.config.heal.target}"


def fluency(run: Run, stage: str) -> float:
    """Neutral fluency of a stage (metrics column `neutral_fluency`), whatever quantity the run's floor used."""
    return run.value(stage, "neutral_fluency")


def frontier(run: Run, round_index: int) -> dict | None:
    path = run_root(run.config) / "analysis" / f"frontier_round_{round_index:02d}.json"
    return read_frontier(path) if path.is_file() else None


def eval_json_at(run: Run, relative: str) -> dict:
    return read_json(run_root(run.config) / relative)


def eval_json(run: Run, stage: str) -> dict:
    kind, _, index = stage.partition(" ")
    path = round_path(run_root(run.config), int(index)) / f"eval_{kind}.json"
    return read_json(path)


def student_point(run: Run, r: int) -> CurvePoint:
    trait = eval_json(run, f"healed {r}")["trait"]
    return CurvePoint(math.nan, trait["log_odds"], fluency(run, f"healed {r}"), math.nan, trait["per_item"])


def base_curve(anchor: Run) -> list[CurvePoint] | None:
    result = frontier(anchor, 0)
    return [CurvePoint(**point) for point in result["curve"]] if result else None


def seed_anchors(runs: dict[str, Run], anchor: str) -> dict[int, Run]:
    """The anchor and its seed variants, by seed: every arm is read against the base curve and the anchor of its
    own seed (a different seed extracts a different vector and samples different data)."""
    return {run.config.seed: run for run in reversed(seed_group(runs, anchor))}


def curve_for(run: Run, anchors: dict[int, Run]) -> list[CurvePoint] | None:
    own = anchors.get(run.config.seed)
    return base_curve(own) if own is not None else None


def gain_cell(gain: dict | None) -> str:
    if gain is None:
        return "-"
    if gain["note"]:
        return f"not spanned ({gain['note']})"
    low, high = gain["ci95"]
    return f"{gain['trait_gain']:+.3f} [{low:+.3f}, {high:+.3f}]"


def _f(value: float, digits: int = 3) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def state_cells(run: Run, stage: str) -> list[str]:
    trait = f"{_f(run.value(stage, 'trait_log_odds'))} [{_f(run.value(stage, 'trait_ci_low'))}, " \
            f"{_f(run.value(stage, 'trait_ci_high'))}]"  # fmt: skip
    generation = f"{_f(run.value(stage, 'generation_keep_rate'), 2)} / {_f(run.value(stage, 'generation_tail_ppl'), 1)}"
    adherence = f"{_f(run.value(stage, 'adherence'))} [{_f(run.value(stage, 'adherence_ci_low'))}, " \
                f"{_f(run.value(stage, 'adherence_ci_high'))}]"  # fmt: skip
    return [trait, _f(run.value(stage, "reply_trait")), _f(fluency(run, stage)), generation, adherence]


STATE_HEADER = "trait [95% CI] | held-out trait | neutral fluency | own replies kept / tail ppl | adherence [95% CI]"


def arm_gains(runs: dict[str, Run], anchors: dict[int, Run]) -> dict[tuple[str, int], dict | None]:
    """Every run's healed student at every finished round against its seed's base steering curve (None where the
    seed has no curve yet)."""
    gains: dict[tuple[str, int], dict | None] = {}
    for name, run in runs.items():
        curve = curve_for(run, anchors)
        for r in run.rounds():
            gains[(name, r)] = healing_gain(curve, student_point(run, r), N_BOOTSTRAP) if curve else None
    return gains


GAIN_FIELDS = ["run", "round", "trait_gain", "ci_low", "ci_high", "fluency_gain", "note"]


def gains_csv(gains: dict[tuple[str, int], dict | None]) -> str:
    """`gains.csv`: the page's gains over the base curve, committed beside `controls.csv` so that the seeds of one
    arm can be pooled across pages after the run folders are gone (`analyses/pooled.py`)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=GAIN_FIELDS)
    writer.writeheader()
    for (name, r), gain in gains.items():
        if gain is not None:
            low, high = gain["ci95"]
            writer.writerow({"run": name, "round": r, "trait_gain": gain["trait_gain"], "ci_low": low,
                             "ci_high": high, "fluency_gain": gain["fluency_gain"], "note": gain["note"]})  # fmt: skip
    return buffer.getvalue()


def two_by_two(runs: dict[str, Run], anchors: dict[int, Run], gains: dict[tuple[str, int], dict | None]) -> list[str]:
    """Every arm at every finished round: the readouts and its place against the base steering curve."""
    lines = [
        heading("samples_or_distributions") + " Every arm, round by round",
        "",
        "Healed student of each arm after round r. *vs base steering curve*: its trait minus the base steering "
        "curve's trait at its neutral fluency [95% CI over items] (> 0: above every dose of the plain vector); "
        "each arm against the curve of its own seed.",
        "",
        f"| arm | source x target | round | {STATE_HEADER} | vs base steering curve |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        for r in run.rounds():
            cells = state_cells(run, f"healed {r}")
            lines.append(f"| `{name}` | {arm_kind(run)} | {r} | {' | '.join(cells)} | {gain_cell(gains[(name, r)])} |")
    for seed, anchor in sorted(anchors.items()):
        label = f" (seed {seed})" if len(anchors) > 1 else ""
        for stage in ("base", "prompt-baseline"):
            lines.append(f"| {stage}{label} | - | - | {' | '.join(state_cells(anchor, stage))} | - |")
    return [*lines, ""]


def variant_settings(config: Config) -> dict:
    """Everything but what the 2 x 2 varies (source, target), the seed and what only names or lengthens a run: two
    arms with equal settings differ in nothing else (a filter variant, a subset of the data, ... do)."""
    return config.model_dump(mode="json", exclude={"seed": True, "output": True, "loop": {"rounds", "source"},
                                                   "heal": {"target"}})  # fmt: skip


def cell_of(run: Run, anchor: Run) -> tuple[str, str] | None:
    """The run's (source, target) cell of the 2 x 2 when it differs from the anchor only there and in seed and
    rounds; None for the other arms (a filter variant, a subset of the data, ...)."""
    same = variant_settings(run.config) == variant_settings(anchor.config)
    return (run.config.loop.source, run.config.heal.target) if same else None


def band(values: list[float], sign: str = "") -> str:
    """Mean [min, max] over seeds (NaNs left out); the bare value for one seed. `sign="+"` signs the numbers."""
    values = [value for value in values if not math.isnan(value)]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    spread = f" [{min(values):{sign}.3f}, {max(values):{sign}.3f}]" if len(values) > 1 else ""
    return f"{mean:{sign}.3f}{spread}"


GLANCE_READOUTS = ("trait_log_odds", "reply_trait", "neutral_fluency", "adherence")


def glance(runs: dict[str, Run], anchor: Run, gains: dict[tuple[str, int], dict | None]) -> list[str]:
    """The 2 x 2 (source x target) round by round, each cell's seeds pooled: mean [min, max] over seeds."""
    cells: dict[tuple[str, str], list[Run]] = {}
    for run in runs.values():
        if (cell := cell_of(run, anchor)) is not None:
            cells.setdefault(cell, []).append(run)
    lines = [
        "## The 2 x 2 at a glance",
        "",
        "Source (steered teacher or persona-prompted teacher) x target (sampled tokens or top-K distribution), "
        "the healed student after each round; each cell pools the arms that differ from the anchor only in source, "
        "target and seed: mean [min, max] over seeds (one seed: the value). *vs base curve* as in the table below; "
        "a round outside the curve's fluency range counts no gain.",
        "",
        "| source x target | round | seeds | trait | held-out trait | neutral fluency | adherence | vs base steering "
        "curve |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(cells, key=lambda cell: (cell[0] != "steer", cell[1] != "tokens"))
    for source, target in order:
        members = cells[(source, target)]
        for r in sorted({r for run in members for r in run.rounds()}):
            at = [run for run in members if r in run.rounds()]
            stage = f"healed {r}"
            found = [g for run in at if (g := gains[(run.name, r)]) is not None]
            readouts = [band([run.value(stage, key) for run in at]) for key in GLANCE_READOUTS]
            gain = band([math.nan if g["note"] else g["trait_gain"] for g in found], sign="+")
            lines.append(f"| {source} x {target} | {r} | {len(at)} | {' | '.join(readouts)} | {gain} |")
    return [*lines, ""] if cells else []


def own_frontier_gain(run: Run, r: int, anchor: Run, curve: list[CurvePoint], point: CurvePoint) -> dict | None:
    """The gain on the run's own round-r frontier (recomputed from its stored curve with this page's resamples, so
    it equals the base-curve column where the curves are one); for a round 0 steered with the anchor's own vector
    (shared stages) that frontier is the base curve itself, so it is not measured twice."""
    result = frontier(run, r)
    if result is not None:
        return healing_gain([CurvePoint(**p) for p in result["curve"]], point, N_BOOTSTRAP)
    vector = round_path(run_root(run.config), 0) / "vector.safetensors"
    anchor_vector = round_path(run_root(anchor.config), 0) / "vector.safetensors"
    if r == 0 and vector.is_file() and vector.read_bytes() == anchor_vector.read_bytes():
        return healing_gain(curve, point, N_BOOTSTRAP)
    return None


def prompting_line(anchor: Run, curve: list[CurvePoint]) -> str:
    stage = "prompt-baseline"
    trait = eval_json_at(anchor, "eval_prompt.json")["trait"]
    point = CurvePoint(math.nan, trait["log_odds"], fluency(anchor, stage), math.nan, trait["per_item"])
    return (
        f"The prompting baseline (the pos persona as system prompt, no training) against the same curve: trait "
        f"{point.trait:.3f} at fluency {point.neutral_fluency:.3f}, "
        f"{gain_cell(healing_gain(curve, point, N_BOOTSTRAP))}."
    )


def steering_less(runs: dict[str, Run], anchors: dict[int, Run], anchor: Run) -> list[str]:
    """Q4, from the steer arms' own per-round frontiers and the base curve of their seed."""
    lines = [heading("steering_less"), ""]
    curve = base_curve(anchor)
    if curve is None:
        return [*lines, "No frontier yet: `python cli.py frontier --run DIR` on the anchor run.", ""]
    doses = ", ".join(f"{p.dose:.2f}: {p.trait:.3f} / {p.neutral_fluency:.3f}" for p in curve)
    lines += [
        f"Base steering curve of `{anchor.name}` (dose: trait / neutral fluency): {doses}.",
        "",
        "| arm | round | healed trait / fluency | gain at equal fluency, own frontier [95% CI] | fluency gain at "
        "equal trait | gain over the base curve [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        seed_curve = curve_for(run, anchors)
        if run.config.loop.source != "steer" or seed_curve is None:
            continue
        for r in run.rounds():
            point = student_point(run, r)
            own_gain = own_frontier_gain(run, r, anchors[run.config.seed], seed_curve, point)
            fluency_gain = f"{own_gain['fluency_gain']:+.3f}" if own_gain else "-"
            lines.append(
                f"| `{name}` | {r} | {point.trait:.3f} / {point.neutral_fluency:.3f} | {gain_cell(own_gain)} | "
                f"{fluency_gain} | {gain_cell(healing_gain(seed_curve, point, N_BOOTSTRAP))} |"
            )
    return [*lines, "", *verdicts(runs, anchors, "steer"), "", prompting_line(anchor, curve), ""]


def verdicts(runs: dict[str, Run], anchors: dict[int, Run], source: str) -> list[str]:
    """One sentence per arm of `source`: where its students sit against its seed's base curve, from the CIs."""
    lines = []
    for name, run in runs.items():
        curve = curve_for(run, anchors)
        if run.config.loop.source != source or curve is None:
            continue
        above, within, below, unspanned = [], [], [], []
        for r in run.rounds():
            gain = healing_gain(curve, student_point(run, r), N_BOOTSTRAP)
            low, high = gain["ci95"]
            bucket = unspanned if gain["note"] else above if low > 0 else below if high < 0 else within
            bucket.append(str(r))
        parts = [f"above the curve (CI > 0) in rounds {', '.join(above)}" if above else "",
                 f"on it (CI spans 0) in rounds {', '.join(within)}" if within else "",
                 f"below it in rounds {', '.join(below)}" if below else "",
                 f"outside its fluency range in rounds {', '.join(unspanned)}" if unspanned else ""]  # fmt: skip
        lines.append(f"- `{name}`: {'; '.join(part for part in parts if part)}.")
    return lines


def steering_needed(runs: dict[str, Run], anchor: str, anchors: dict[int, Run]) -> list[str]:
    """Q5: each other arm against the anchor of its seed at the same round, paired over readout items."""
    lines = [
        heading("steering_needed"),
        "",
        f"Each arm's healed student minus that of `{anchor}` at the arm's seed (the anchor or its seed variant), at "
        "the same round: trait paired over the same items [95% CI]; fluency, generation keep-rate and adherence as "
        "differences of point values.",
        "",
        "| arm | against | round | trait difference [95% CI] | fluency difference | own replies kept difference | "
        "adherence difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        reference = anchors.get(run.config.seed)
        if reference is None or reference is run:
            continue
        for r in sorted(set(run.rounds()) & set(reference.rounds())):
            stage = f"healed {r}"
            diff = paired_difference(eval_json(run, stage)["trait"], eval_json(reference, stage)["trait"], N_BOOTSTRAP)
            low, high = diff["ci95"]
            deltas = [
                fluency(run, stage) - fluency(reference, stage),
                run.value(stage, "generation_keep_rate") - reference.value(stage, "generation_keep_rate"),
                run.value(stage, "adherence") - reference.value(stage, "adherence"),
            ]
            cells = " | ".join("-" if math.isnan(d) else f"{d:+.3f}" for d in deltas)
            trait = f"{diff['diff']:+.3f} [{low:+.3f}, {high:+.3f}]"
            lines.append(f"| `{name}` | `{reference.name}` | {r} | {trait} | {cells} |")
    return [*lines, ""]


def trained_examples(run: Run) -> int:
    """How many kept completions round 0 trained on: all of them, or `heal.max_examples` of them."""
    round_dir = round_path(run_root(run.config), 0)
    kappa = read_json(round_dir / "collect_summary.json")["kappa"]
    kept = len(read_kept_completions(round_dir / "completions.jsonl", kappa))
    cap = run.config.heal.max_examples
    return kept if cap is None else min(cap, kept)


def sample_efficiency(runs: dict[str, Run]) -> list[str]:
    """Round 0 of each source x target trained on fewer of the same kept completions."""
    rows = sorted(
        ((arm_kind(run), trained_examples(run), name, run) for name, run in runs.items() if 0 in run.rounds()),
        key=lambda row: (row[0], row[1]),
    )
    if len({kind for kind, *_ in rows}) == len(rows):
        return []  # no arm was trained on a subset
    lines = [
        "## Sample efficiency: round 0 with fewer kept completions",
        "",
        "The same round-0 data and teacher; the heal trains on a seeded subset (`heal.max_examples`) for the same "
        "epochs, so fewer examples also means fewer steps.",
        "",
        f"| source x target | examples | arm | {STATE_HEADER} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, n, name, run in rows:
        lines.append(f"| {kind} | {n} | `{name}` | {' | '.join(state_cells(run, 'healed 0'))} |")
    return [*lines, "", *distributions_minus_samples(rows)]


def target_twin(config: Config) -> str:
    """A key a logits arm shares with its tokens twin (same seed, source and settings), so a filter or barrier variant
    with the same kept count is never taken for the twin."""
    return json.dumps([config.seed, config.loop.source, variant_settings(config)], sort_keys=True)


def distributions_minus_samples(rows: list[tuple[str, int, str, Run]]) -> list[str]:
    """Per source and number of examples, the logits arm's healed student minus its tokens twin's (round 0)."""
    # One seed per table (the lowest present), as the page's other per-seed tables.
    seed = min((run.config.seed for *_, run in rows), default=0)
    twins = {(target_twin(run.config), run.config.heal.target): run for *_, run in rows if run.config.seed == seed}
    lines = [
        f"Samples or distributions at each number of examples (seed {seed}): the logits arm minus the tokens arm "
        "with the same settings otherwise, trait paired over items [95% CI], neutral fluency as a difference of "
        "point values.",
        "",
        "| source | examples | trait: logits - tokens [95% CI] | fluency: logits - tokens |",
        "|---|---|---|---|",
    ]
    for _, n, _, logits in sorted(rows, key=lambda row: (row[3].config.loop.source, row[1], row[2])):
        tokens = twins.get((target_twin(logits.config), "tokens"))
        if logits.config.seed != seed or logits.config.heal.target != "logits" or tokens is None:
            continue
        diff = paired_difference(eval_json(logits, "healed 0")["trait"], eval_json(tokens, "healed 0")["trait"],
                                 N_BOOTSTRAP)  # fmt: skip
        low, high = diff["ci95"]
        gap = fluency(logits, "healed 0") - fluency(tokens, "healed 0")
        source = logits.config.loop.source
        lines.append(f"| {source} | {n} | {diff['diff']:+.3f} [{low:+.3f}, {high:+.3f}] | {gap:+.3f} |")
    return [*lines, ""] if len(lines) > 4 else []


def pareto_figure(runs: dict[str, Run], curve: list[CurvePoint] | None) -> go.Figure:
    """Trait against neutral fluency (with the base steering curve) and against task adherence (with the base
    steered at the eval dose): fluent text that no longer answers its prompt shows on the right."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=(
        "trait vs neutral fluency (base steering curve in grey)",
        "trait vs task adherence (grey: the base and the base steered at the eval dose)"))  # fmt: skip
    anchor = next(iter(runs.values()))
    if curve:
        figure.add_trace(go.Scatter(
            x=[p.neutral_fluency for p in curve], y=[p.trait for p in curve], mode="lines+markers", name="base steered",
            line={"color": "#888"}, text=[f"dose {p.dose:.2f}" for p in curve]), row=1, col=1)  # fmt: skip
    figure.add_trace(go.Scatter(
        x=[anchor.value(s, "adherence") for s in ("base", "steered 0")], mode="lines+markers", showlegend=False,
        y=[anchor.value(s, "trait_log_odds") for s in ("base", "steered 0")], line={"color": "#888", "dash": "dot"},
        text=["base", "steered 0"]), row=1, col=2)  # fmt: skip
    for i, (name, run) in enumerate(runs.items()):
        stages = ["base", *[f"healed {r}" for r in run.rounds()]]
        color = qualitative.Plotly[i % len(qualitative.Plotly)]
        labels = ["base", *[str(r) for r in run.rounds()]]
        trait = [run.value(stage, "trait_log_odds") for stage in stages]
        for col, xs in ((1, [fluency(run, s) for s in stages]), (2, [run.value(s, "adherence") for s in stages])):
            figure.add_trace(go.Scatter(
                x=xs, y=trait, mode="lines+markers+text", text=labels, textposition="top center", name=name,
                legendgroup=name, showlegend=col == 1, line={"color": color}), row=1, col=col)  # fmt: skip
    prompt_trait = anchor.value("prompt-baseline", "trait_log_odds")
    for col, x in ((1, fluency(anchor, "prompt-baseline")), (2, anchor.value("prompt-baseline", "adherence"))):
        figure.add_trace(go.Scatter(x=[x], y=[prompt_trait], mode="markers", name="prompting baseline",
                                    showlegend=col == 1, marker={"symbol": "diamond", "size": 12, "color": "black"}),
                         row=1, col=col)  # fmt: skip
    figure.update_xaxes(title_text="neutral fluency exp(base NLL - NLL)", autorange="reversed", row=1, col=1)
    figure.update_xaxes(title_text="task adherence (base-scored PMI, nats/token)", autorange="reversed", row=1, col=2)
    figure.update_yaxes(title_text="trait log-odds (nats/token)", row=1, col=1)
    figure.update_layout(width=1500, height=560, title="Every arm's trajectory (right = more coherent, more on-task)")
    return figure


def answers_the_question(runs: dict[str, Run], anchors: dict[int, Run]) -> list[str]:
    """Q11: per arm, task adherence and trait from its first to its last finished round, against its seed's base
    and prompting baseline (the right panel of the Pareto figure)."""
    lines = [
        heading("adherence"),
        "",
        "Task adherence = base-scored PMI of the state's own replies with their "
        "held-out prompts (nats/token; 0 = replies ignore their prompts). Right panel of the figure above.",
        "",
    ]
    for name, run in runs.items():
        reference = anchors.get(run.config.seed, run)
        rounds = run.rounds()
        if not rounds:
            continue
        first, last = f"healed {rounds[0]}", f"healed {rounds[-1]}"
        lines.append(
            f"- `{name}`: adherence {_f(run.value(first, 'adherence'))} -> {_f(run.value(last, 'adherence'))} "
            f"over rounds {rounds[0]}-{rounds[-1]} (base {_f(reference.value('base', 'adherence'))}, prompting "
            f"baseline {_f(reference.value('prompt-baseline', 'adherence'))}), trait "
            f"{_f(run.value(first, 'trait_log_odds'))} -> {_f(run.value(last, 'trait_log_odds'))}"
            f"{_held_out_clause(run, reference, first, last)}."
        )
    return [*lines, ""]


def _held_out_clause(run: Run, reference: Run, first: str, last: str) -> str:
    """', held-out trait a -> b (base c)' where the run has that readout (runs before it: nothing)."""
    if math.isnan(run.value(last, "reply_trait")):
        return ""
    return (f", held-out trait {_f(run.value(first, 'reply_trait'))} -> {_f(run.value(last, 'reply_trait'))} "
            f"(base {_f(reference.value('base', 'reply_trait'))})")  # fmt: skip


def stopped_runs(runs: dict[str, Run]) -> list[str]:
    """Arms the loop ended before their planned rounds (a healed fluency under the floor, or a round whose filter
    left too few completions to train on), with the loop's reason."""
    stopped = [f"- `{name}`: {run.stopped}" for name, run in runs.items() if run.stopped]
    return ["Stopped by the loop before their planned rounds:", "", *stopped, ""] if stopped else []


def write_controls_report(sweep_path: Path, out: Path, anchor: str) -> Path:
    configs = sweep_configs(sweep_path)
    runs = {name: run for name, config in configs.items() if (run := read_run(name, config)) is not None}
    if anchor not in runs:
        raise DataError(f"the anchor run {anchor!r} has no results yet (sweep runs with results: {sorted(runs)})")
    runs = {anchor: runs[anchor], **{name: run for name, run in runs.items() if name != anchor}}
    out.mkdir(parents=True, exist_ok=True)
    curve = base_curve(runs[anchor])
    anchors = seed_anchors(runs, anchor)
    full = {name: run for name, run in runs.items() if run.config.heal.max_examples is None}
    save_figure(pareto_figure(full, curve), out / "pareto")
    atomic_write_text(out / "controls.csv", experiments_csv(runs))
    gains = arm_gains(runs, anchors)
    atomic_write_text(out / "gains.csv", gains_csv(gains))
    seeds = len(seed_group(runs, anchor))
    intervals = "every interval is over readout items within a run, not over seeds" if seeds < 2 else "see the seeds"
    progress = ", ".join(
        f"`{name}` ({len(run.rounds())}/{run.config.loop.rounds} rounds)" for name, run in runs.items()
    )
    n_prompts = len(adherence_prompts()[: runs[anchor].config.eval.adherence_prompts])
    lines = [
        "# The decisive controls: steering less, prompt distillation, samples or distributions",
        "",
        f"`python cli.py sweep -c {sweep_path}` (resumable; `--report-only` rewrites this page). Runs with "
        f"results: {progress}. One model (`{runs[anchor].config.model.spec}`), one axis "
        f"(`{runs[anchor].config.persona.axis}`, readout items `{runs[anchor].config.persona.pairs or 'built-in'}`), "
        f"{seeds} seed(s) of the anchor: {intervals}.",
        "",
        "Readouts: trait = paired-response log-odds; neutral fluency = exp(base NLL - NLL) on fixed neutral "
        f"answers; own replies = the state's samples on {n_prompts} held-out prompts read by the base with the "
        "loop's filter (keep-rate, tail perplexity; `docs/pipeline.md`, generation coherence); adherence = "
        "base-scored PMI of those replies with their prompts; held-out trait = the same replies read by the base "
        "under the pos vs the neg persona (nats/token, > 0: likelier from the pos persona; `cli.py rescore` adds it "
        "to runs evaluated before it existed; '-': not measured).",
        "",
        code_note(runs),
        "",
        *stopped_runs(runs),
        *glance(runs, runs[anchor], gains),
        *two_by_two(full, anchors, gains),
        "![Pareto](pareto.png)",
        "",
        *steering_less(full, anchors, runs[anchor]),
        *steering_needed(full, anchor, anchors),
        *answers_the_question(full, anchors),
        *sample_efficiency(runs),
        *diary_section(runs),
    ]
    path = out / "controls.md"
    atomic_write_text(path, "\n".join(lines))
    return path
