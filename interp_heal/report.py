"""A run folder's metrics table, trajectory plots and summary.md, rebuilt from the stage outputs.

Everything here reads files the loop wrote (so it can be rerun on any run folder) and writes atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import threading
from pathlib import Path

import plotly.graph_objects as go
from loguru import logger
from plotly.subplots import make_subplots

from interp_heal.adherence import adherence_columns
from interp_heal.coherence import COHERENCE_COLUMNS, LABELS, coherence_columns, floor_column, read_frontier
from interp_heal.config import Config
from interp_heal.io import atomic_write_text, read_json
from interp_heal.mfv import FOUNDATIONS
from interp_heal.own_replies import GENERATION_COLUMNS, generation_columns
from interp_heal.questions import heading
from interp_heal.reply_trait import COLUMNS as REPLY_TRAIT_COLUMNS
from interp_heal.reply_trait import reply_trait_columns, with_sidecar
from interp_heal.run_folder import round_path
from interp_heal.steer import SteeringVector

METRIC_FIELDS = (
    "stage", "round", "trait_log_odds", "trait_ci_low", "trait_ci_high", *COHERENCE_COLUMNS, "neutral_nll",
    "neutral_kl_mean", "neutral_kl_rmse", "neutral_kl_p95", "neutral_kl_max", "adherence", "adherence_ci_low",
    "adherence_ci_high", "adherence_nll", *REPLY_TRAIT_COLUMNS, *GENERATION_COLUMNS, "care_nats", "auth_nats",
    *[f"nats_{f}" for f in FOUNDATIONS],
    "nll_prefill", "top1_acc", "kept", "generated", "keep_rate", "kappa", "eval_coeff",
    "train_nll", "train_kl_mean", "train_kl_rmse", "train_kl_p95", "train_kl_max", "val_nll", "lam_eff",
    "vector_cos_r0", "vector_norm",
)  # fmt: skip


def _read(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _read_eval(path: Path) -> dict:
    """An eval JSON with the readouts computed after it was written (`reply_trait.with_sidecar`)."""
    return with_sidecar(_read(path), path) if path.is_file() else {}


def stop_reason(root: Path) -> str:
    """Why the loop ended a run before its planned rounds (its stopped.json); empty if it did not."""
    return str(_read(root / "stopped.json").get("reason", ""))


def _eval_columns(result: dict, base: dict) -> dict[str, object]:
    trait = result.get("trait", {})
    row: dict[str, object] = {
        "trait_log_odds": trait.get("log_odds"),
        "trait_ci_low": (trait.get("ci95") or [None, None])[0],
        "trait_ci_high": (trait.get("ci95") or [None, None])[1],
        "neutral_nll": result.get("neutral_nll"),
        "neutral_kl_mean": result.get("neutral_kl_mean"),
        "neutral_kl_rmse": result.get("neutral_kl_rmse"),
        "neutral_kl_p95": result.get("neutral_kl_p95"),
        "neutral_kl_max": result.get("neutral_kl_max"),
        "care_nats": result.get("care_nats"),
        "auth_nats": result.get("auth_nats"),
        "nll_prefill": result.get("nll_prefill"),
        "top1_acc": result.get("top1_acc"),
        **{f"nats_{f}": result.get("nats", {}).get(f) for f in FOUNDATIONS},
        **adherence_columns(result),
        **reply_trait_columns(result),
        **generation_columns(result),
        **coherence_columns(result, base),
    }
    return row


def metric_rows(root: Path, config: Config) -> list[dict[str, object]]:
    base = _read_eval(root / "eval_base.json")
    rows: list[dict[str, object]] = []
    if base:
        rows.append({"stage": "base", "round": -1, **_eval_columns(base, base)})
    prompt = _read_eval(root / "eval_prompt.json")
    if prompt:
        rows.append({"stage": "prompt-baseline", "round": -1, **_eval_columns(prompt, base)})
    vector_0 = round_path(root, 0) / "vector.safetensors"
    for round_index in range(config.loop.rounds):
        round_dir = round_path(root, round_index)
        collect, heal = _read(round_dir / "collect_summary.json"), _read(round_dir / "heal.json")
        vector_info: dict[str, object] = {}
        if (round_dir / "vector.safetensors").is_file():
            vector = SteeringVector.load(round_dir / "vector.safetensors")
            vector_info = {
                "vector_cos_r0": vector.band_cosine(SteeringVector.load(vector_0)),
                "vector_norm": float(vector.directions[list(vector.layers)].norm()),
            }
        steered = _read_eval(round_dir / "eval_steered.json")
        if steered:
            rows.append({
                "stage": f"steered {round_index}", "round": round_index, **_eval_columns(steered, base),
                "kept": collect.get("kept_at_dose"), "generated": collect.get("generated"),
                "keep_rate": collect.get("keep_rate"), "kappa": collect.get("kappa"),
                "eval_coeff": collect.get("eval_coeff"), **vector_info,
            })  # fmt: skip
        healed = _read_eval(round_dir / "eval_healed.json")
        if healed:
            rows.append({
                "stage": f"healed {round_index}", "round": round_index, **_eval_columns(healed, base),
                "train_nll": heal.get("last_nll"), "train_kl_mean": heal.get("last_kl_mean"),
                "train_kl_rmse": heal.get("last_kl_rmse"), "train_kl_p95": heal.get("last_kl_p95"),
                "train_kl_max": heal.get("last_kl_max"), "val_nll": heal.get("val_nll"),
                "lam_eff": heal.get("lam_eff"), **vector_info,
            })  # fmt: skip
    return rows


def _csv_cell(value: object) -> object:
    """A readout that did not run is an empty cell, whether it came as None or NaN."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def write_metrics(root: Path, config: Config) -> list[dict[str, object]]:
    rows = metric_rows(root, config)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in row.items()}
        )
    atomic_write_text(root / "metrics.csv", buffer.getvalue())
    return rows


# ---------------------------------------------------------------- plots


def _value(row: dict, key: str) -> float:
    value = row.get(key)
    return float(value) if value not in (None, "") else math.nan


def trajectory_figure(rows: list[dict[str, object]], config: Config) -> go.Figure:
    """Trait per stage (prompt baseline as a line), log(1 - the floor's quantity) with the floor, care-vs-authority map,
    task adherence (prompt baseline as a line), generation coherence (the filter's keep-rate of own replies)."""
    path = [r for r in rows if r["stage"] != "prompt-baseline"]
    prompt = next((r for r in rows if r["stage"] == "prompt-baseline"), None)
    labels = [str(r["stage"]) for r in path]
    floor = floor_column(config)
    figure = make_subplots(
        rows=1, cols=5, column_widths=[0.24, 0.19, 0.19, 0.19, 0.19],
        subplot_titles=("trait log-odds (nats/token)", f"log(1 - {LABELS[floor]})", "care vs authority (MFV nats)",
                        "task adherence (PMI, nats/token)", "own replies the filter keeps"),
    )  # fmt: skip
    trait = [_value(r, "trait_log_odds") for r in path]
    error_plus = [_value(r, "trait_ci_high") - t for r, t in zip(path, trait, strict=True)]
    error_minus = [t - _value(r, "trait_ci_low") for r, t in zip(path, trait, strict=True)]
    colors = ["#d62728" if label.startswith("steered") else "#2ca02c" if label.startswith("healed") else "#444"
              for label in labels]  # fmt: skip
    figure.add_trace(
        go.Scatter(x=labels, y=trait, mode="lines+markers", marker={"color": colors, "size": 9}, name="trait",
                   error_y={"type": "data", "array": error_plus, "arrayminus": error_minus}),
        row=1, col=1,
    )  # fmt: skip
    if prompt is not None:
        figure.add_hline(y=_value(prompt, "trait_log_odds"), line_dash="dash", line_color="#1f77b4",
                         annotation_text="prompting baseline", row=1, col=1)  # fmt: skip
    coherence = [_value(r, floor) for r in path]
    figure.add_trace(
        go.Scatter(x=labels, y=[math.log(max(1e-6, 1 - c)) if not math.isnan(c) else math.nan for c in coherence],
                   mode="lines+markers", marker={"color": colors, "size": 9}, name=f"log(1 - {LABELS[floor]})"),
        row=1, col=2,
    )  # fmt: skip
    figure.add_hline(y=math.log(1 - config.loop.coh_floor), line_dash="dot", line_color="black",
                     annotation_text="floor", row=1, col=2)  # fmt: skip
    figure.add_trace(
        go.Scatter(x=[_value(r, "care_nats") for r in path], y=[_value(r, "auth_nats") for r in path],
                   mode="lines+markers+text", text=labels, textposition="top center", name="path",
                   marker={"color": colors, "size": 9}),
        row=1, col=3,
    )  # fmt: skip
    if prompt is not None:
        figure.add_trace(
            go.Scatter(x=[_value(prompt, "care_nats")], y=[_value(prompt, "auth_nats")], mode="markers+text",
                       text=["prompt"], marker={"symbol": "x", "size": 12, "color": "#1f77b4"}, name="prompt"),
            row=1, col=3,
        )  # fmt: skip
    figure.update_xaxes(title_text="care_nats", row=1, col=3)
    figure.update_yaxes(title_text="auth_nats", row=1, col=3)
    _adherence_panel(figure, path, prompt, colors, col=4)
    _generation_panel(figure, path, prompt, colors, col=5)
    figure.update_layout(width=2300, height=480, showlegend=False, title=f"{config.output.name}: steer, heal, repeat")
    return figure


def _adherence_panel(figure: go.Figure, path: list[dict], prompt: dict | None, colors: list[str], col: int) -> None:
    adherence = [_value(r, "adherence") for r in path]
    above = [_value(r, "adherence_ci_high") - a for r, a in zip(path, adherence, strict=True)]
    below = [a - _value(r, "adherence_ci_low") for r, a in zip(path, adherence, strict=True)]
    figure.add_trace(
        go.Scatter(x=[str(r["stage"]) for r in path], y=adherence, mode="lines+markers", name="adherence",
                   marker={"color": colors, "size": 9}, error_y={"type": "data", "array": above, "arrayminus": below}),
        row=1, col=col,
    )  # fmt: skip
    if prompt is not None and not math.isnan(_value(prompt, "adherence")):
        figure.add_hline(y=_value(prompt, "adherence"), line_dash="dash", line_color="#1f77b4",
                         annotation_text="prompting baseline", row=1, col=col)  # fmt: skip


def _generation_panel(figure: go.Figure, path: list[dict], prompt: dict | None, colors: list[str], col: int) -> None:
    figure.add_trace(
        go.Scatter(x=[str(r["stage"]) for r in path], y=[_value(r, "generation_keep_rate") for r in path],
                   mode="lines+markers", name="generation keep-rate", marker={"color": colors, "size": 9}),
        row=1, col=col,
    )  # fmt: skip
    if prompt is not None and not math.isnan(_value(prompt, "generation_keep_rate")):
        figure.add_hline(y=_value(prompt, "generation_keep_rate"), line_dash="dash", line_color="#1f77b4",
                         annotation_text="prompting baseline", row=1, col=col)  # fmt: skip


# kaleido's own 90 s timeout covers a render, not the browser's start, and a Chromium that never answers at
# start (seen under a loaded CPU) would otherwise hang a run for good; no figure is worth that.
PNG_TIMEOUT_S = 300.0


def save_figure(figure: go.Figure, stem: Path) -> None:
    """HTML always (self-contained); PNG when a kaleido-compatible browser answers within PNG_TIMEOUT_S."""
    atomic_write_text(stem.with_suffix(".html"), figure.to_html(include_plotlyjs=True, full_html=True))
    try:
        png = _render_png(figure)
    except Exception as err:  # kaleido raises its own types when no Chrome/Chromium is installed
        logger.warning(f"PNG not written for {stem.name} ({type(err).__name__}: {err}); the HTML has the figure")
        return
    stem.with_suffix(".png").write_bytes(png)


def _render_png(figure: go.Figure) -> bytes:
    """figure.to_image in a daemon thread: one that never returns is left behind and cannot block the exit."""
    images: list[bytes] = []
    errors: list[Exception] = []

    def render() -> None:
        try:
            images.append(figure.to_image(format="png"))
        except Exception as err:  # handed to the caller, which warns
            errors.append(err)

    thread = threading.Thread(target=render, name="png-render", daemon=True)
    thread.start()
    thread.join(PNG_TIMEOUT_S)
    if images:
        return images[0]
    raise errors[0] if errors else TimeoutError(f"no image from kaleido in {PNG_TIMEOUT_S:.0f} s")


# ---------------------------------------------------------------- summary


def _fmt(value: object, digits: int = 3) -> str:
    return (
        "-" if value in (None, "") or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.{digits}f}"
    )


def _stage_table(rows: list[dict[str, object]], floor: str) -> list[str]:
    lines = [
        f"| stage | trait log-odds [95% CI] | {LABELS[floor]} | neutral NLL | KL rmse to base | adherence [95% CI] "
        "| own replies: base NLL / tail ppl / kept | care / auth nats |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        trait = f"{_fmt(row.get('trait_log_odds'))} [{_fmt(row.get('trait_ci_low'))}, {_fmt(row.get('trait_ci_high'))}]"
        low, high = _fmt(row.get("adherence_ci_low")), _fmt(row.get("adherence_ci_high"))
        adherence = f"{_fmt(row.get('adherence'))} [{low}, {high}]"
        nats = f"{_fmt(row.get('care_nats'), 2)} / {_fmt(row.get('auth_nats'), 2)}"
        own = (("nll", 3), ("tail_ppl", 1), ("keep_rate", 2))
        generation = " / ".join(_fmt(row.get(f"generation_{key}"), digits) for key, digits in own)
        lines.append(
            f"| {row['stage']} | {trait} | {_fmt(row.get(floor))} | {_fmt(row.get('neutral_nll'))} "
            f"| {_fmt(row.get('neutral_kl_rmse'), 4)} | {adherence} | {generation} | {nats} |"
        )
    return lines


def _filtering(root: Path, rounds: list[int]) -> list[str]:
    lines = [heading("filter"), ""]
    for r in rounds:
        summary = _read(round_path(root, r) / "collect_summary.json")
        if summary:
            lines.append(
                f"- round {r}: dose κ = {_fmt(summary['kappa'])} (passed: {summary['dose_passed']}), "
                f"{summary['kept_at_dose']} kept at that dose; overall {summary['kept']}/{summary['generated']} "
                f"kept, drop reasons {summary['drop_reasons']}"
            )
    return lines


def _healing(by_stage: dict[str, dict], rounds: list[int], floor: str) -> list[str]:
    lines = [heading("healing"), ""]
    for r in rounds:
        steered, healed = by_stage.get(f"steered {r}"), by_stage.get(f"healed {r}")
        if steered and healed:
            pairs = [(LABELS[floor], floor, 3), ("neutral KL rmse", "neutral_kl_rmse", 4),
                     ("trait", "trait_log_odds", 3)]  # fmt: skip
            changes = ", ".join(
                f"{label} {_fmt(steered.get(key), digits)} -> {_fmt(healed.get(key), digits)}"
                for label, key, digits in pairs
            )
            lines.append(f"- round {r}: {changes}")
    return lines


def _trajectory(by_stage: dict[str, dict], rounds: list[int], config: Config) -> list[str]:
    base, prompt = by_stage.get("base", {}), by_stage.get("prompt-baseline", {})
    healed_rows = [by_stage[f"healed {r}"] for r in rounds if f"healed {r}" in by_stage]
    floor = floor_column(config)
    coherences = [round(_value(r, floor), 3) for r in healed_rows]
    traits = [_value(r, "trait_log_odds") for r in healed_rows]
    steps = [round(b - a, 3) for a, b in zip([_value(base, "trait_log_odds"), *traits], traits, strict=False)]
    lines = [heading("coherence_over_rounds"), ""]
    lines.append(f"- healed {LABELS[floor]} by round: {coherences} (floor {config.loop.coh_floor})")
    lines += ["", heading("trait_direction"), ""]
    lines.append(
        f"- healed trait by round: {[round(t, 3) for t in traits]} (base {_fmt(base.get('trait_log_odds'))}); "
        f"change per round {steps}"
    )
    if prompt and traits:
        best = max(range(len(traits)), key=traits.__getitem__)
        verdict = "beats" if traits[best] > _value(prompt, "trait_ci_high") else "does not beat"
        interval = f"[{_fmt(prompt.get('trait_ci_low'))}, {_fmt(prompt.get('trait_ci_high'))}]"
        lines += [
            "", heading("beats_prompting"), "",
            f"- best healed trait {traits[best]:.3f} {verdict} the prompting baseline "
            f"{_fmt(prompt.get('trait_log_odds'))} {interval} (against the upper end of its CI; CIs are over "
            "scenarios within this run, not over seeds)",
            f"- at {LABELS[floor]} {coherences[best]} against the prompting baseline's {_fmt(prompt.get(floor))}",
        ]  # fmt: skip
    return lines


def _adherence(by_stage: dict[str, dict], rounds: list[int]) -> list[str]:
    """The adherence question from the adherence readout (docs/pipeline.md); nothing when the run did not measure it."""
    base, prompt = by_stage.get("base", {}), by_stage.get("prompt-baseline", {})
    if math.isnan(_value(base, "adherence")):
        return []

    def by_round(kind: str) -> list[str]:
        return [_fmt(by_stage.get(f"{kind} {r}", {}).get("adherence")) for r in rounds]

    nll = ", ".join(f"{stage} {_fmt(row.get('adherence_nll'))}" for stage, row in by_stage.items())
    return [
        heading("adherence"), "",
        f"- task adherence (base-scored PMI of the state's own replies with their held-out prompts, nats/token; "
        f"0 = replies ignore their prompts): base {_fmt(base.get('adherence'))}, prompting baseline "
        f"{_fmt(prompt.get('adherence'))}",
        f"- steered by round: {by_round('steered')}; healed by round: {by_round('healed')}",
        f"- base NLL of those replies (lower is not better here: generic text is predictable): {nll}",
    ]  # fmt: skip


def _diary(root: Path, rounds: list[int]) -> list[str]:
    lines = ['## Greedy answers to "Do you love humanity?"', ""]
    sources = [("base", root / "demo_base.jsonl")]
    sources += [(f"healed {r}", round_path(root, r) / "demo.jsonl") for r in rounds]
    for label, path in sources:
        if path.is_file():
            first = json.loads(path.read_text().splitlines()[0])
            lines.append(f"- **{label}**: {' '.join(first['completion'].split())}")
    return lines


def _readout_line(root: Path) -> list[str]:
    """Which items the trait numbers score, and whether check-axis found the axis expressible."""
    lines = []
    base = root / "eval_base.json"
    if base.is_file():
        trait = _read(base)["trait"]
        source = trait.get("items_source", "built-in items (unrecorded: before item provenance)")
        digest = f" (sha256 {trait['items_sha256'][:12]})" if "items_sha256" in trait else ""
        n_items = trait["n_items"] if "n_items" in trait else len(trait["per_item"])
        lines.append(f"Trait readout: {n_items} paired items from {source}{digest}.")
    check = root / "axis_check.json"
    if check.is_file():
        result = _read(check)
        persona = result["gaps"]["persona"]
        lines.append(
            f"check-axis: **{result['verdict']}** (persona gap {persona['diff']:+.3f} "
            f"[{persona['low']:+.3f}, {persona['high']:+.3f}]{'; ' if result['failed'] else ''}"
            f"{'; '.join(result['failed'])})."
        )
    return [*lines, ""] if lines else []


def _frontier(root: Path) -> list[str]:
    """Healing vs steering less, when `cli.py frontier --run` has written analysis/frontier.json."""
    path = root / "analysis" / "frontier.json"
    if not path.is_file():
        return []
    lines = [
        heading("steering_less") + " (`cli.py frontier`)",
        "",
        "The student each round started from, steered with that round's vector at a ladder of doses, against the "
        "healed student. Gain = healed trait - the curve's trait at the healed neutral fluency [95% CI over items].",
        "",
        "| round | doses | healed trait / neutral fluency | healing gain [95% CI] | fluency gain at equal trait |",
        "|---|---|---|---|---|",
    ]
    for result in read_frontier(path):
        healed, gain = result["healed"], result["gain"]
        ci = f"[{_fmt(gain['ci95'][0])}, {_fmt(gain['ci95'][1])}]"
        lines.append(
            f"| {result['round']} | {len(result['curve'])} | "
            f"{_fmt(healed['trait'])} / {_fmt(healed['neutral_fluency'])} | "
            f"{_fmt(gain['trait_gain'])} {ci} {gain['note']} | {_fmt(gain['fluency_gain'])} |"
        )
    return [*lines, ""]


def summary_markdown(rows: list[dict[str, object]], root: Path, config: Config, seconds: dict[str, float]) -> str:
    by_stage = {str(r["stage"]): r for r in rows}
    rounds = sorted({int(r["round"]) for r in rows if int(r["round"]) >= 0})
    lines = [f"# Run `{config.output.name}`: {config.model.spec}, {config.persona.axis} axis", ""]
    if config.loop.source == "prompt":
        lines += ["**Prompt distillation** (`loop.source: prompt`): each round distils the student prompted with the "
                  "pos persona, no vector; the 'steered' stages are that prompted teacher.", ""]  # fmt: skip
    if stopped := stop_reason(root):
        lines += [f"**Stopped early:** {stopped}.", ""]
    lines += _readout_line(root)
    floor = floor_column(config)
    for section in (_stage_table(rows, floor), _filtering(root, rounds), _healing(by_stage, rounds, floor)):
        lines += [*section, ""]
    for section in (_trajectory(by_stage, rounds, config), _adherence(by_stage, rounds), _diary(root, rounds)):
        lines += [*section, ""]
    lines += _frontier(root)
    lines += ["## Stage times (seconds)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {value:.1f} |" for name, value in seconds.items()]
    return "\n".join(lines) + "\n"


def write_report(root: Path, config: Config, seconds: dict[str, float]) -> None:
    rows = metric_rows(root, config)
    save_figure(trajectory_figure(rows, config), root / "trajectory")
    atomic_write_text(root / "summary.md", summary_markdown(rows, root, config, seconds))
