"""The controls' answers in `reports/experiments.md`: Q4 (more than steering less?), Q5 (is steering needed?),
Q6 (samples or distributions?) and Q11 (does the student still answer the question?), from every arm's seeds
pooled across the committed controls pages (`analyses/pooled`).

`python cli.py pooled -c ... --experiments reports/experiments.md` rewrites the block between the two markers of
that page (`analyses/experiments` keeps the block when it rewrites the rest), so the answers are regenerated from
the same committed files as the pooled page and need no run folder. Verdicts are over seeds: a difference is
called a direction only when every seed that measured it agrees in sign; otherwise it is "mixed", which with
three seeds is what "within noise" means here. Per-seed intervals over readout items are on the controls pages.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from analyses.controls import band
from analyses.experiments import CONTROLS_BEGIN as BEGIN
from analyses.experiments import CONTROLS_END as END
from analyses.pooled import ANCHOR_LABEL, GAIN, PooledRow, pooled_from, pooled_rows
from interp_heal.errors import DataError
from interp_heal.io import atomic_write_text
from interp_heal.questions import heading
from interp_heal.sweep import load_sweep, sweep_configs

SOURCE, TARGET, EXAMPLES = "loop.source=prompt", "heal.target=logits", "heal.max_examples="


def parts(arm: str) -> set[str]:
    """The config changes an arm's label names (the anchor: none). Split only before a `key=`, since a list
    value (`filter.dose_ignores=['a', 'b']`) has commas of its own."""
    return set() if arm == ANCHOR_LABEL else set(re.split(r", (?=[\w.]+=)", arm))


def join(names: set[str]) -> str:
    """The label of an arm with these changes, ordered by key as `pooled.arm_label` orders them."""
    return ", ".join(sorted(names, key=lambda name: name.split("=", 1)[0])) or ANCHOR_LABEL


def cell(arm: str) -> str:
    """`steer x tokens` ... `prompt x logits`, from the label."""
    names = parts(arm)
    return f"{'prompt' if SOURCE in names else 'steer'} x {'logits' if TARGET in names else 'tokens'}"


def variant(arm: str) -> set[str]:
    """What an arm changes beyond the 2 x 2's source and target (a filter, a barrier, a data subset)."""
    return parts(arm) - {SOURCE, TARGET}


def examples(arm: str) -> int | None:
    """The kept-completion subset an arm trains on (`heal.max_examples`), None for all of them."""
    found = [int(name.removeprefix(EXAMPLES)) for name in parts(arm) if name.startswith(EXAMPLES)]
    return found[0] if found else None


class Arms:
    """The pooled rows by arm and round, with per-seed values and paired differences."""

    def __init__(self, rows: list[PooledRow]):
        self.rows = {(row.arm, row.round): row for row in rows}
        self.names = list(dict.fromkeys(row.arm for row in rows if row.round != "-"))

    def rounds(self, arm: str) -> list[int]:
        return sorted(int(r) for a, r in self.rows if a == arm and r != "-")

    def seeds(self, arm: str, r: int | str, name: str) -> dict[int, float]:
        row = self.rows.get((arm, str(r)))
        return row.by_seed(name) if row is not None else {}

    def paired(self, arm: str, other: str, r: int | str, name: str, other_r: int | str | None = None) -> list[float]:
        """arm - other over the seeds both measured (other at `other_r`, default the same round)."""
        mine, theirs = self.seeds(arm, r, name), self.seeds(other, r if other_r is None else other_r, name)
        return [mine[s] - theirs[s] for s in sorted(mine.keys() & theirs.keys())]

    def twin(self, arm: str, **change: str) -> str | None:
        """The arm that differs from `arm` only in source and/or target (change: source=..., target=...)."""
        names = variant(arm)
        if change.get("source", "prompt" if SOURCE in parts(arm) else "steer") == "prompt":
            names.add(SOURCE)
        if change.get("target", "logits" if TARGET in parts(arm) else "tokens") == "logits":
            names.add(TARGET)
        label = join(names)
        return label if label in self.names else None


def sign_verdict(values: list[float]) -> str:
    if not values:
        return "not measured"
    n = f"{len(values)} seed{'s' if len(values) > 1 else ''}"
    if all(v > 0 for v in values):
        return f"above in every seed ({n})" if len(values) > 1 else "above (one seed)"
    if all(v < 0 for v in values):
        return f"below in every seed ({n})" if len(values) > 1 else "below (one seed)"
    return f"mixed ({n})"


def _band(values: list[float], sign: str = "+") -> str:
    return f"{band(values, sign=sign)} (n={len(values)})" if values else "-"


def gain_table(arms: Arms, names: list[str]) -> list[str]:
    rounds = sorted({r for arm in names for r in arms.rounds(arm)})
    lines = [f"| arm | {' | '.join(f'round {r}' for r in rounds)} |", "|---|" + "---|" * len(rounds)]
    for arm in names:
        cells = [_band(list(arms.seeds(arm, r, GAIN).values())) for r in rounds]
        lines.append(f"| {arm} ({cell(arm)}) | {' | '.join(cells)} |")
    return lines


def direction_lines(arms: Arms, names: list[str], what: str) -> list[str]:
    lines = []
    for arm in names:
        by_verdict: dict[str, list[int]] = {}
        for r in arms.rounds(arm):
            by_verdict.setdefault(sign_verdict(list(arms.seeds(arm, r, GAIN).values())), []).append(r)
        said = "; ".join(f"{verdict} in {_rounds(rs)}" for verdict, rs in by_verdict.items())
        lines.append(f"- `{arm}` against {what}: {said}.")
    return lines


def _rounds(rounds: list[int]) -> str:
    return f"round{'s' if len(rounds) > 1 else ''} {', '.join(map(str, rounds))}"


def steering_less(arms: Arms) -> list[str]:
    steered = [a for a in arms.names if SOURCE not in parts(a) and examples(a) is None and arms.seeds(a, 0, GAIN)]
    return [
        heading("steering_less"),
        "",
        "Each healed student's trait minus its own seed's base steering curve (the round-0 vector on the base at a "
        "ladder of doses) at the student's neutral fluency: mean [min, max] over seeds (n = seeds). > 0: more trait "
        "than any dose of the plain vector gives at that fluency. 'above' / 'below' = every seed agrees; 'mixed' = "
        "they do not (within the seed noise).",
        "",
        *gain_table(arms, steered),
        "",
        *direction_lines(arms, steered, "the base steering curve"),
        "",
        "This is the base curve only. Whether a later round adds more than steering *that round's* student less "
        "would is the own-round frontier (the student the round started from, steered with the round's vector), on "
        "each seed's controls page where it was measured; it is not pooled here.",
        "",
    ]


def paired_table(arms: Arms, pairs: list[tuple[str, str]], names: tuple[str, ...], rounds: list[int]) -> list[str]:
    """Per pair (a, b): a - b per seed at each round, for each readout in `names`."""
    header = " | ".join(f"round {r}" for r in rounds)
    lines = [f"| difference | readout | {header} |", "|---|---|" + "---|" * len(rounds)]
    for a, b in pairs:
        for name in names:
            cells = [_band(arms.paired(a, b, r, name)) for r in rounds]
            lines.append(f"| {cell(a)} - {cell(b)} | {name} | {' | '.join(cells)} |")
    return lines


def steering_needed(arms: Arms) -> list[str]:
    prompted = [a for a in arms.names if SOURCE in parts(a) and examples(a) is None and not variant(a)]
    pairs = [(twin, a) for a in prompted if (twin := arms.twin(a, source="steer"))]
    rounds = sorted({r for a, _ in pairs for r in arms.rounds(a)})
    return [
        heading("steering_needed"),
        "",
        "Prompt distillation: the same loop, filter, barrier and objective with the pos persona in the teacher's "
        "prompt instead of the vector. Its healed students against the same base steering curve:",
        "",
        *gain_table(arms, prompted),
        "",
        *direction_lines(arms, prompted, "the base steering curve"),
        "",
        "The steered teacher minus the prompted one, same seed and objective (per seed, then mean [min, max]):",
        "",
        *paired_table(arms, pairs, ("trait", "neutral fluency", "adherence", GAIN), rounds),
        "",
    ]


def two_by_two_cells(arms: Arms) -> list[str]:
    return [a for a in arms.names if not variant(a)]


def glance_table(arms: Arms, names: list[str], rounds: tuple[int, ...], readouts: tuple[str, ...]) -> list[str]:
    lines = [f"| arm | round | {' | '.join(readouts)} |", "|---|---|" + "---|" * len(readouts)]
    for arm in names:
        for r in rounds:
            if r in arms.rounds(arm):
                cells = [
                    _band(list(arms.seeds(arm, r, name).values()), "+" if name == GAIN else "") for name in readouts
                ]
                lines.append(f"| {cell(arm)} | {r} | {' | '.join(cells)} |")
    return lines


def winner_lines(arms: Arms, names: list[str], rounds: tuple[int, ...]) -> list[str]:
    """Per round: the arm with the largest mean gain over the base curve, and whether every seed of it beats
    every seed of the runner-up (separated) or not (within the seed spread)."""
    lines = []
    for r in rounds:
        gains = {a: list(arms.seeds(a, r, GAIN).values()) for a in names}
        ranked = sorted((a for a in gains if gains[a]), key=lambda a: -sum(gains[a]) / len(gains[a]))
        if len(ranked) < 2:
            continue
        best, second = ranked[:2]
        separated = min(gains[best]) > max(gains[second])
        lines.append(
            f"- Round {r}: {cell(best)} leads at equal fluency, {_band(gains[best])} over the base curve, against "
            f"{cell(second)} {_band(gains[second])}: "
            f"{'every seed of it above every seed of the runner-up' if separated else 'within the seed spread'}."
        )
    return lines


def sample_efficiency(arms: Arms) -> list[str]:
    subsets = sorted({n for a in arms.names if (n := examples(a)) is not None})
    full = {cell(a): a for a in two_by_two_cells(arms)}
    lines = [
        "Sample efficiency: the healed student's trait after round 0 trained on a seeded subset of the round's kept "
        "completions (same epochs, so fewer steps): mean [min, max] over the seeds named, then the difference from "
        "the same seeds' student trained on every kept completion:",
        "",
        f"| arm | {' | '.join(f'{n} examples' for n in subsets)} | all kept |",
        "|---|" + "---|" * (len(subsets) + 1),
    ]
    for kind, arm in full.items():
        cells = []
        for n in subsets:
            subset = next((a for a in arms.names if examples(a) == n and cell(a) == kind and len(variant(a)) == 1), "")
            cells.append(_subset_cell(arms, subset, arm) if subset else "-")
        everything = arms.seeds(arm, 0, "trait")
        lines.append(f"| {kind} | {' | '.join(cells)} | {band(list(everything.values()))} {_seed_list(everything)} |")
    return lines


def _subset_cell(arms: Arms, subset: str, full: str) -> str:
    values = arms.seeds(subset, 0, "trait")
    return (
        f"{band(list(values.values()))}, {band(arms.paired(subset, full, 0, 'trait'), sign='+')} {_seed_list(values)}"
    )


def _seed_list(values: dict[int, float]) -> str:
    return f"(seed{'s' if len(values) > 1 else ''} {', '.join(map(str, sorted(values)))})"


def samples_or_distributions(arms: Arms, rounds: tuple[int, ...]) -> list[str]:
    cells = two_by_two_cells(arms)
    pairs = [(a, twin) for a in cells if TARGET in parts(a) and (twin := arms.twin(a, target="tokens"))]
    all_rounds = sorted({r for a, _ in pairs for r in arms.rounds(a)})
    return [
        heading("samples_or_distributions"),
        "",
        "The 2 x 2: teacher (steered or persona-prompted) x objective (NLL on the teacher's sampled tokens, or "
        "cross-entropy from its top-K distribution at every position, `heal.teacher_topk`); one teacher's two "
        "objectives train on the same kept completions, with the same steps and barrier. Mean [min, max] over seeds "
        "(n = seeds); held-out trait = the state's own replies to held-out prompts read by the base under the pos vs "
        "the neg persona (nats/token; n = the seeds whose pages have it, '-' = none).",
        "",
        *glance_table(arms, cells, rounds, ("trait", "held-out trait", "neutral fluency", "adherence", GAIN)),
        "",
        *winner_lines(arms, cells, rounds),
        "",
        "Distributions minus samples, same teacher and seed:",
        "",
        *paired_table(arms, pairs, ("trait", "neutral fluency", GAIN), all_rounds),
        "",
        *sample_efficiency(arms),
        "",
    ]


def adherence(arms: Arms, references: list[PooledRow], rounds: tuple[int, ...]) -> list[str]:
    names = [a for a in arms.names if examples(a) is None and max(arms.rounds(a), default=0) >= max(rounds)]
    readouts = ("adherence", "held-out trait", "trait")
    header = " | ".join(f"{name} r{r}" for name in readouts for r in rounds)
    lines = [
        heading("adherence"),
        "",
        "Task adherence: the base-scored PMI of the state's own replies with their held-out prompts (nats/token; 0 = "
        "the replies ignore their prompts), beside the trait on the readout and the held-out trait of those same "
        "replies. Seed means (n: seeds that have the readout; '-': none).",
        "",
        f"| arm | {header} |",
        "|---|" + "---|" * (len(readouts) * len(rounds)),
    ]
    for arm in names:
        cells = [_mean_cell(list(arms.seeds(arm, r, name).values())) for name in readouts for r in rounds]
        lines.append(f"| {arm} ({cell(arm)}) | {' | '.join(cells)} |")
    for row in references:
        values = {name: [v for v in row.values.get(name, []) if not math.isnan(v)] for name in readouts}
        cells = [_mean_cell(values[name]) if r == rounds[0] else "" for name in readouts for r in rounds]
        lines.append(f"| {row.arm} (no rounds) | {' | '.join(cells)} |")
    lines.append("")
    for arm in names:
        filters = {name for name in variant(arm) if name.startswith("filter.")}
        unfiltered = join(parts(arm) - filters)
        if not filters or unfiltered not in arms.names:
            continue
        names = ("adherence", "trait", "held-out trait", GAIN)
        diffs = {name: _band(arms.paired(arm, unfiltered, max(rounds), name)) for name in names}
        lines.append(
            f"- `{arm}` minus `{unfiltered}` (the same arm without {', '.join(sorted(filters))}), same seeds, round "
            f"{max(rounds)}: adherence {diffs['adherence']}, trait {diffs['trait']}, held-out trait "
            f"{diffs['held-out trait']}, gain over the base curve {diffs[GAIN]}."
        )
    return [*lines, ""]


def _mean_cell(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} (n={len(values)})" if values else "-"


def answers(
    rows: list[PooledRow], references: list[PooledRow], figures: list[tuple[str, str]], rounds: tuple[int, ...]
) -> list[str]:
    """The four sections, then the figures: (caption, path relative to the page)."""
    arms = Arms(rows)
    return [
        BEGIN,
        "The controls sweeps' answers, every arm's seeds pooled across their committed pages: "
        "[`controls_pooled/pooled.md`](controls_pooled/pooled.md) has every round of every arm, and each seed's "
        "page (`controls*/controls.md`, linked from there) the intervals over readout items and the own-round "
        "frontiers.",
        "",
        *steering_less(arms),
        *steering_needed(arms),
        *samples_or_distributions(arms, rounds),
        *adherence(arms, references, rounds),
        *[line for caption, link in figures for line in (f"{caption}:", "", f"![{caption}]({link})", "")],
        END,
    ]


def splice(page: Path, block: list[str]) -> None:
    """Replace the marked block of `page` with `block` (which carries the markers)."""
    text = page.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise DataError(f"{page}: no controls block to rewrite (the lines {BEGIN!r} ... {END!r})")
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    atomic_write_text(page, before + "\n".join(block) + after)


def write_answers(sweep_paths: list[Path], page: Path, figure: Path, rounds: tuple[int, ...] = (0, 2, 5)) -> Path:
    """Rewrite the controls block of `page` from the committed pages of `sweep_paths`; `figure`: the pooled
    figure. The first page's own Pareto figure follows it: the seeds have different base steering curves, so
    the trajectories are drawn over one curve only there."""
    rows, references = pooled_rows(pooled_from(sweep_paths))
    rounds = tuple(sorted(rounds))
    figures = [("Every arm, seeds pooled: trait vs neutral fluency and vs adherence", _link(figure, page))]
    first = load_sweep(sweep_paths[0])
    curve = Path(first.report_dir) / "pareto.png"
    if curve.is_file():
        caption = f"Seed {sweep_configs(sweep_paths[0])[first.anchor].seed}'s arms over its base steering curve"
        figures.append((f"{caption} and the prompting baseline (`{first.report_dir}`)", _link(curve, page)))
    splice(page, answers(rows, references, figures, rounds))
    return page


def _link(path: Path, page: Path) -> str:
    return Path(os.path.relpath(path.resolve(), page.resolve().parent)).as_posix()
