"""diag-axis: which foundation does this vector actually move?

Base vs steered (at the calibrated dose) vs the prompting baseline: all seven MFV foundation profiles side by
side, sorted by |steered - base|, plus the answer-token mass (MFV's own coherence) and the trait log-odds.
With `--run DIR` the three evaluations are read from a loop run folder (round 0's steered eval, no compute);
otherwise they are computed from the config (vector extracted, steered at `--coeff`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from interp_heal.coherence import mfv_answer_mass
from interp_heal.config import Config
from interp_heal.errors import DataError
from interp_heal.evaluate import evaluate
from interp_heal.io import read_json, write_json
from interp_heal.mfv import FOUNDATIONS
from interp_heal.models import load_configured_model
from interp_heal.paired_items import readout_items
from interp_heal.personas import context_prompts, persona_pair
from interp_heal.report import save_figure
from interp_heal.run_folder import read_run, round_path
from interp_heal.steer import Steering, extract_steering_vector

STATES = ("base", "steered", "prompt")


def evaluations_from_run(run: Path, round_index: int = 0) -> dict[str, dict]:
    read_run(run)  # checks the files below against their recorded sha256
    paths = {
        "base": run / "eval_base.json",
        "steered": round_path(run, round_index) / "eval_steered.json",
        "prompt": run / "eval_prompt.json",
    }
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise DataError(f"{run} lacks the evaluations diag-axis reads: {missing}")
    return {state: read_json(path, "evaluation") for state, path in paths.items()}


def evaluations_from_config(config: Config, coeff: float) -> dict[str, dict]:
    model, tokenizer, _ = load_configured_model(config.model)
    pair = persona_pair(config.persona)
    readout = readout_items(config.persona)
    contexts = context_prompts(config.steer.n_contexts, seed=config.seed)
    vector = extract_steering_vector(model, tokenizer, pair, contexts, config.steer.band, config.steer.batch_size)
    return {
        "base": evaluate(model, tokenizer, readout, config.eval, seed=config.seed),
        "steered": evaluate(model, tokenizer, readout, config.eval, Steering(vector, coeff), seed=config.seed),
        "prompt": evaluate(model, tokenizer, readout, config.eval, persona=pair.pos, seed=config.seed),
    }


@dataclass(frozen=True)
class AxisTable:
    rows: list[dict[str, Any]]  # per foundation: profile per state and deltas, sorted by |steered - base|
    mfv_answer_mass: dict[str, float]  # per state
    trait_log_odds: dict[str, float]
    most_moved_by_vector: str
    most_moved_by_prompt: str


def axis_table(evaluations: dict[str, dict]) -> AxisTable:
    if any("profile" not in result for result in evaluations.values()):
        raise DataError("diag-axis needs MFV profiles; these evaluations were run with eval.mfv = false")
    rows = []
    for foundation in FOUNDATIONS:
        values = {state: evaluations[state]["profile"][foundation] for state in STATES}
        rows.append({
            "foundation": foundation, **values,
            "delta_steered": values["steered"] - values["base"], "delta_prompt": values["prompt"] - values["base"],
        })  # fmt: skip
    rows.sort(key=lambda row: abs(row["delta_steered"]), reverse=True)
    return AxisTable(
        rows=rows,
        mfv_answer_mass={state: mfv_answer_mass(evaluations[state]) for state in STATES},
        trait_log_odds={state: evaluations[state]["trait"]["log_odds"] for state in STATES},
        most_moved_by_vector=rows[0]["foundation"],
        most_moved_by_prompt=max(rows, key=lambda row: abs(row["delta_prompt"]))["foundation"],
    )


def format_table(table: AxisTable) -> str:
    lines = [f"{'foundation':<12} {'base':>7} {'steered':>8} {'delta':>8} {'prompt':>7} {'delta':>8}"]
    for row in table.rows:
        lines.append(
            f"{row['foundation']:<12} {row['base']:>7.3f} {row['steered']:>8.3f} {row['delta_steered']:>+8.3f} "
            f"{row['prompt']:>7.3f} {row['delta_prompt']:>+8.3f}"
        )
    lines.append("answer mass  " + "  ".join(f"{state} {table.mfv_answer_mass[state]:.3f}" for state in STATES))
    lines.append("trait        " + "  ".join(f"{state} {table.trait_log_odds[state]:+.3f}" for state in STATES))
    lines.append(f"most moved: by the vector {table.most_moved_by_vector}, by the prompt {table.most_moved_by_prompt}")
    return "\n".join(lines)


def axis_figure(table: AxisTable) -> go.Figure:
    figure = go.Figure()
    foundations = [row["foundation"] for row in table.rows]
    for state, color in zip(STATES, ("#444", "#d62728", "#1f77b4"), strict=True):
        figure.add_trace(go.Bar(name=state, x=foundations, y=[row[state] for row in table.rows], marker_color=color))
    figure.update_layout(
        barmode="group",
        title="MFV profile: base vs steered vs prompting baseline (sorted by |steered - base|)",
        yaxis_title="profile (mean p over rows)",
        width=900,
        height=450,
    )
    return figure


def run_diag_axis(evaluations: dict[str, dict], out: Path) -> AxisTable:
    out.mkdir(parents=True, exist_ok=True)
    table = axis_table(evaluations)
    write_json(out / "diag_axis.json", asdict(table))
    save_figure(axis_figure(table), out / "diag_axis")
    return table
