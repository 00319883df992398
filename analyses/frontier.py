"""frontier: is healing more than steering less?

If the healed student sits on the trait-vs-fluency curve of the unhealed vector at a lower dose, healing only
bakes in a weaker steer. For each round r of a run: the student that round started from, steered with v_r at a
ladder of doses (trait, neutral fluency, KL to base per dose: the steering curve), against the healed student.

    healing gain = healed trait - the curve's trait at the healed student's neutral fluency
    fluency gain = healed fluency - the curve's fluency at the healed student's trait

Both are read on the dose-ordered curve where it first crosses the healed value (linear between the two doses
that bracket it), never extrapolated: a curve that does not reach the healed fluency gives NaN and says so.
The gain's 95% CI resamples readout items (same items for every dose and the healed model); fluency is read
on fixed neutral answers, so it is held fixed under the resampling. Files written before 2026-12-04 name the
fluency `coherence` (and its gain `coherence_gain`); `coherence.read_frontier` renames them on read.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import plotly.graph_objects as go
import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from interp_heal.bake import bake, finished_rounds, student_at
from interp_heal.coherence import read_frontier
from interp_heal.config import Config, load_config
from interp_heal.evaluate import neutral_coherence, neutral_fluency, trait_log_odds
from interp_heal.io import write_json
from interp_heal.models import load_configured_model
from interp_heal.paired_items import ReadoutItems, readout_items
from interp_heal.report import save_figure, write_report
from interp_heal.run_folder import RunFolder, round_path
from interp_heal.steer import Steering, SteeringVector

# Doses as multiples of the round's eval dose (the kept completions' mean coefficient): dense where fluency
# is still near 1, then doubling until the curve falls below the healed student's fluency.
DOSE_LADDER = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
MAX_EXTRA_DOSES = 3


@dataclass(frozen=True)
class CurvePoint:
    dose: float
    trait: float
    neutral_fluency: float
    kl_rmse: float
    per_item: list[float]


def crossing(xs: list[float], ys: list[float], target: float, falling: bool) -> tuple[int, float] | None:
    """The first segment i (between points i and i+1, in the given order) where xs crosses `target`, and the
    weight w of point i in the linear interpolation (value = w * ys[i] + (1 - w) * ys[i+1]); None if none does.
    `falling`: xs decreases through target (fluency along the dose ladder) rather than increasing (trait)."""
    for i in range(len(xs) - 1):
        a, b = xs[i], xs[i + 1]
        inside = (b <= target <= a) if falling else (a <= target <= b)
        if inside:
            w = 1.0 if a == b else (target - b) / (a - b)
            return i, w
    return None


def interpolate(xs: list[float], ys: list[float], target: float, falling: bool) -> float:
    found = crossing(xs, ys, target, falling)
    if found is None:
        return math.nan
    i, w = found
    return w * ys[i] + (1 - w) * ys[i + 1]


def healing_gain(curve: list[CurvePoint], healed: CurvePoint, n_bootstrap: int, seed: int = 0) -> dict[str, object]:
    """Healed trait minus the curve's trait at the healed fluency, with a CI over readout items; and the
    fluency gain at equal trait (point estimate)."""
    fluencies, traits = [p.neutral_fluency for p in curve], [p.trait for p in curve]
    found = crossing(fluencies, traits, healed.neutral_fluency, falling=True)
    fluency_gain = healed.neutral_fluency - interpolate(traits, fluencies, healed.trait, falling=False)
    if found is None:
        reason = f"the curve spans fluency {min(fluencies):.3f}-{max(fluencies):.3f}, not {healed.neutral_fluency:.3f}"
        return {"trait_gain": math.nan, "ci95": [math.nan, math.nan], "fluency_gain": fluency_gain, "note": reason}
    i, w = found
    items = torch.tensor([curve[i].per_item, curve[i + 1].per_item, healed.per_item])  # [3, n_items]
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(items.shape[1], (n_bootstrap, items.shape[1]), generator=generator)
    means = items[:, picks].mean(-1)  # [3, n_bootstrap]: the same resampled items for all three
    gains = means[2] - (w * means[0] + (1 - w) * means[1])
    low, high = torch.quantile(gains, torch.tensor([0.025, 0.975])).tolist()
    point = healed.trait - (w * traits[i] + (1 - w) * traits[i + 1])
    return {"trait_gain": point, "ci95": [low, high], "fluency_gain": fluency_gain, "note": ""}


def curve_point(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    readout: ReadoutItems,
    config: Config,
    base_nll: float,
    steering: Steering,
    dose: float,
) -> CurvePoint:
    trait = trait_log_odds(model, tokenizer, readout, config.eval, steering)
    neutral = neutral_coherence(model, tokenizer, config.eval, steering)
    return CurvePoint(
        dose=dose,
        trait=float(trait["log_odds"]),
        neutral_fluency=neutral_fluency(neutral["neutral_nll"], base_nll),
        kl_rmse=neutral["neutral_kl_rmse"],
        per_item=list(trait["per_item"]),
    )


def _eval_point(path: Path, base_nll: float) -> CurvePoint:
    result = json.loads(path.read_text())
    fluency = neutral_fluency(result["neutral_nll"], base_nll)
    trait = result["trait"]
    return CurvePoint(math.nan, trait["log_odds"], fluency, result["neutral_kl_rmse"], trait["per_item"])


def steering_curve(
    student: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    readout: ReadoutItems,
    config: Config,
    base_nll: float,
    vector: SteeringVector,
    eval_coeff: float,
    floor: float,
) -> list[CurvePoint]:
    """The student steered at DOSE_LADDER x eval_coeff, extended by doubling until fluency is below `floor`."""
    doses = [factor * eval_coeff for factor in DOSE_LADDER]
    curve: list[CurvePoint] = []
    for dose in tqdm(doses, desc="doses", leave=False):
        curve.append(curve_point(student, tokenizer, readout, config, base_nll, Steering(vector, dose), dose))
    for _ in range(MAX_EXTRA_DOSES):
        if curve[-1].neutral_fluency < floor:
            break
        dose = 2 * curve[-1].dose
        curve.append(curve_point(student, tokenizer, readout, config, base_nll, Steering(vector, dose), dose))
    return curve


def _same_round_zero(run: Path, other: Path) -> bool:
    """Round 0 of both runs starts from the same base model (same base neutral NLL, the fluency scale) with the
    same vector bytes at the same eval dose."""
    ours, theirs = round_path(run, 0), round_path(other, 0)

    def same(a: Path, b: Path, key: str) -> bool:
        return json.loads(a.read_text())[key] == json.loads(b.read_text())[key]

    return (
        load_config(run / "config.yaml").model == load_config(other / "config.yaml").model
        and same(run / "eval_base.json", other / "eval_base.json", "neutral_nll")
        and same(ours / "collect_summary.json", theirs / "collect_summary.json", "eval_coeff")
        and (ours / "vector.safetensors").read_bytes() == (theirs / "vector.safetensors").read_bytes()
    )


def shared_curve(run: Path, round_index: int, floor: float, others: list[Path]) -> tuple[list[CurvePoint], Path] | None:
    """The round-0 curve another run already measured from the same start with the same vector (a run that copied
    its round-0 stages from it, `run_folder.shared_stages`) on the same readout items: the points a fresh
    measurement for `floor` (this run's healed fluency) would give (`ladder_prefix`), or None where it would
    measure more. Later rounds start from each run's own student, so they are always measured."""
    if round_index != 0:
        return None
    items = readout_items(load_config(run / "config.yaml").persona).provenance()
    for other in others:
        path = other / "analysis" / "frontier_round_00.json"
        if other.resolve() == run.resolve() or not path.is_file() or not _same_round_zero(run, other):
            continue
        stored = read_frontier(path)
        curve = ladder_prefix([CurvePoint(**point) for point in stored["curve"]], floor)
        if stored["items"] == items and curve is not None:
            return curve, other
    return None


def ladder_prefix(curve: list[CurvePoint], floor: float) -> list[CurvePoint] | None:
    """The points `steering_curve` would measure for `floor` at the same doses, if `curve` holds them all: the
    ladder, then one more doubling while the last point is still at or above `floor` (at most MAX_EXTRA_DOSES)."""
    n, most = len(DOSE_LADDER), len(DOSE_LADDER) + MAX_EXTRA_DOSES
    while n < min(len(curve), most) and curve[n - 1].neutral_fluency >= floor:
        n += 1
    wants_more = curve[n - 1].neutral_fluency >= floor and n < most
    return None if len(curve) < n or wants_more else curve[:n]


def frontier_round(
    run: Path,
    student: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    round_index: int,
    n_rounds: int,
    others: list[Path] | None = None,
) -> dict[str, object]:
    """Round r's steering curve and healed point; `others`: run folders whose round-0 curve may be this one's."""
    config = load_config(run / "config.yaml")
    readout = readout_items(config.persona)
    base_nll = json.loads((run / "eval_base.json").read_text())["neutral_nll"]
    round_dir = round_path(run, round_index)
    healed = _eval_point(round_dir / "eval_healed.json", base_nll)
    prompt = _eval_point(run / "eval_prompt.json", base_nll)
    vector = SteeringVector.load(round_dir / "vector.safetensors")
    eval_coeff = json.loads((round_dir / "collect_summary.json").read_text())["eval_coeff"]
    floor = healed.neutral_fluency
    shared = shared_curve(run, round_index, floor, others or [])
    if shared is not None:
        curve, curve_from = shared[0], str(shared[1])
    else:
        with student_at(student, round_index - 1 if round_index > 0 else None, n_rounds) as start:
            curve = steering_curve(start, tokenizer, readout, config, base_nll, vector, eval_coeff, floor)
        curve_from = None
    gain = healing_gain(curve, healed, config.eval.n_bootstrap, seed=config.seed)
    return {
        "round": round_index,
        "eval_coeff": eval_coeff,
        "curve": [asdict(p) for p in curve],
        "curve_from": curve_from,
        "healed": asdict(healed),
        "prompt": asdict(prompt),
        "gain": gain,
        "items": readout.provenance(),
    }


def frontier_figure(results: list[dict[str, object]]) -> go.Figure:
    figure = go.Figure()
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
    for result, color in zip(results, palette * 4, strict=False):
        r, curve, healed = result["round"], result["curve"], result["healed"]
        figure.add_trace(go.Scatter(
            x=[p["neutral_fluency"] for p in curve], y=[p["trait"] for p in curve], mode="lines+markers",
            name=f"steering curve, round {r}", line={"color": color}, text=[f"dose {p['dose']:.2f}" for p in curve],
        ))  # fmt: skip
        figure.add_trace(go.Scatter(
            x=[healed["neutral_fluency"]], y=[healed["trait"]], mode="markers", name=f"healed {r}",
            marker={"color": color, "size": 14, "symbol": "star"},
        ))  # fmt: skip
    prompt = results[0]["prompt"]
    figure.add_trace(go.Scatter(
        x=[prompt["neutral_fluency"]], y=[prompt["trait"]], mode="markers", name="prompting baseline",
        marker={"color": "black", "size": 12, "symbol": "diamond"},
    ))  # fmt: skip
    figure.update_layout(
        title="Healing vs steering less: trait against neutral fluency (right = more fluent)",
        xaxis_title="neutral fluency exp(base NLL - NLL)", yaxis_title="trait log-odds (nats/token)",
        xaxis={"autorange": "reversed"}, width=950, height=600,
    )  # fmt: skip
    return figure


def run_frontier(
    run: Path, rounds: list[int] | None = None, out: Path | None = None, others: list[Path] | None = None
) -> list[dict[str, object]]:
    """analysis/frontier_round_XX.json per round (kept: a rerun skips finished rounds), frontier.json and figure.
    `others`: run folders (a sweep's) whose measured round-0 curve this run may share (`shared_curve`)."""
    config = load_config(run / "config.yaml")
    finished = finished_rounds(run)
    out = out or run / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, _ = load_configured_model(config.model)
    student = bake(model, [round_path(run, r) / "adapter" for r in finished])
    results = []
    for round_index in rounds or finished:
        path = out / f"frontier_round_{round_index:02d}.json"
        if not path.is_file():
            write_json(path, frontier_round(run, student, tokenizer, round_index, len(finished), others))
        results.append(read_frontier(path))
    write_json(out / "frontier.json", results)
    save_figure(frontier_figure(results), out / "frontier")
    if out == run / "analysis":  # summary.md reads it from there
        write_report(run, config, RunFolder(run).stage_seconds())
    return results


def format_frontier(results: list[dict[str, object]]) -> str:
    lines = ["round | doses | healed trait / fluency | healing gain [95% CI] at equal fluency | fluency gain"]
    for result in results:
        healed, gain = result["healed"], result["gain"]
        low, high = gain["ci95"]
        lines.append(
            f"{result['round']:>5} | {len(result['curve']):>5} | "
            f"{healed['trait']:.3f} / {healed['neutral_fluency']:.3f} | "
            f"{gain['trait_gain']:+.3f} [{low:+.3f}, {high:+.3f}] | {gain['fluency_gain']:+.3f} {gain['note']}"
        )
    return "\n".join(lines)
