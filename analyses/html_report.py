"""report: self-contained HTML pages for a loop run, an index and one page per round.

`python cli.py report --run DIR` first computes whatever analysis the pages show and the run folder lacks
(project-adapters, diffs, logit lens, greedy steered generations; each is cached under DIR/analysis), then
writes DIR/report/index.html and DIR/report/round_XX.html. Pages carry everything they need: plotly.js is
inlined once per page (interactive), or with `static=True` every figure is an inlined PNG (no JavaScript,
small enough to commit).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import plotly.graph_objects as go

from analyses.diffs import diff_figure, run_diffs
from analyses.frontier import frontier_figure
from analyses.logit_lens import run_logit_lens
from analyses.project_adapters import Projection, projection_figure, run_project_adapters
from interp_heal.bake import bake, finished_rounds, student_at
from interp_heal.coherence import LABELS, floor_column, read_frontier
from interp_heal.config import Config
from interp_heal.generate import generate_completions
from interp_heal.io import atomic_write_text, read_json, read_jsonl, write_json
from interp_heal.loop import DEMO_PROMPTS
from interp_heal.models import load_configured_model
from interp_heal.questions import label
from interp_heal.report import metric_rows, stop_reason, trajectory_figure
from interp_heal.run_folder import read_run, round_path
from interp_heal.steer import SteeringVector

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1560px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.text { max-width: 480px; white-space: pre-wrap; }
nav a { margin-right: 1em; }
.note { color: #555; font-size: 14px; }
"""
# "{floor}": the label of the quantity the run's coherence floor reads (`coherence.floor_column`).
STAGE_HEADER = ["stage", "trait log-odds", "95% CI", "{floor}", "neutral NLL", "neutral KL rmse", "adherence",
                "adherence 95% CI", "own replies kept", "own replies tail ppl", "care nats", "auth nats", "kept",
                "kappa"]  # fmt: skip
ROUND_HEADER = ["round", "kappa", "trait steered", "trait healed", "{floor} steered", "{floor} healed",
                "KL rmse steered", "KL rmse healed", "trait retained", "incoherence retained"]  # fmt: skip
DIRECTION_HEADER = ["layer", "trait proj. steered", "trait proj. healed", "trait retained",
                    "incoherence share steered", "incoherence share healed", "incoherence retained"]  # fmt: skip


# ---------------------------------------------------------------- analyses the pages need


def steered_generations(run: Path, config: Config, rounds: list[int]) -> dict[str, object]:
    """Greedy answers to the demo prompts of each round's steered model (the student before round r plus
    v_r at the round's eval coefficient); the loop itself records base and healed answers."""
    model, tokenizer, _ = load_configured_model(config.model)
    student = bake(model, [round_path(run, r) / "adapter" for r in rounds])
    greedy = config.generate.model_copy(update={"temperature": 0.0})
    answers: dict[str, list[str]] = {}
    for r in rounds:
        vector = SteeringVector.load(round_path(run, r) / "vector.safetensors")
        coeff = read_json(round_path(run, r) / "collect_summary.json")["eval_coeff"]
        with student_at(student, r - 1 if r > 0 else None, len(rounds)) as generator:
            records = generate_completions(generator, tokenizer, list(DEMO_PROMPTS), vector, [coeff], greedy, 0)
        answers[str(r)] = [record.completion for record in records]
    return {"prompts": list(DEMO_PROMPTS), "steered": answers}


def ensure_analyses(run: Path) -> None:
    """Compute each analysis the report shows unless its output already sits in run/analysis."""
    config = read_run(run)
    rounds = finished_rounds(run)
    analysis = run / "analysis"
    if not (analysis / "project_adapters.json").is_file():
        run_project_adapters(run)
    if not (analysis / "logit_lens.json").is_file():
        run_logit_lens(run)
    missing = [r for r in rounds if not (analysis / f"diffs_round_{r:02d}.json").is_file()]
    if missing:
        run_diffs(run, missing)
    path = analysis / "generations.json"
    if not path.is_file() or set(read_json(path)["steered"]) != {str(r) for r in rounds}:
        write_json(path, steered_generations(run, config, rounds))


# ---------------------------------------------------------------- html pieces


def _figure(figure: go.Figure, static: bool, first: bool) -> str:
    if static:
        png = base64.b64encode(figure.to_image(format="png")).decode()
        return f'<img alt="{html.escape(figure.layout.title.text or "figure")}" src="data:image/png;base64,{png}">'
    return figure.to_html(full_html=False, include_plotlyjs=first)


def _headers(header: list[str], floor: str) -> list[str]:
    return [name.format(floor=LABELS[floor]) for name in header]


def _table(header: list[str], rows: list[list[object]], text_columns: tuple[int, ...] = ()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for index, value in enumerate(row):
            css = ' class="text"' if index in text_columns else ""
            cells.append(f"<td{css}>{html.escape(_cell(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _page(title: str, nav: str, sections: list[str]) -> str:
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><nav>{nav}</nav><h1>{html.escape(title)}</h1>"
        + "\n".join(sections)
        + "</body></html>"
    )


def _read(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _ci(row: dict) -> str:
    return f"[{_cell(row.get('trait_ci_low'))}, {_cell(row.get('trait_ci_high'))}]"


def _answers(path: Path, n: int) -> list[str]:
    """The loop's greedy demo answers, or placeholders while that stage has not run yet."""
    return [record["completion"] for record in read_jsonl(path)] if path.is_file() else ["(not generated yet)"] * n


def _band_mean(diffs: dict, key: str) -> float | None:
    band = set(diffs.get("band_layers", []))
    values = [row[key] for row in diffs.get("layers", []) if row["layer"] in band and row[key] is not None]
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------- pages


def index_page(run: Path, config: Config, rounds: list[int], static: bool) -> str:
    rows = metric_rows(run, config)
    analysis = run / "analysis"
    floor = floor_column(config)
    stage_rows = [
        [row["stage"], row.get("trait_log_odds"), _ci(row),
         row.get(floor), row.get("neutral_nll"), row.get("neutral_kl_rmse"), row.get("adherence"),
         f"[{_cell(row.get('adherence_ci_low'))}, {_cell(row.get('adherence_ci_high'))}]",
         row.get("generation_keep_rate"), row.get("generation_tail_ppl"), row.get("care_nats"),
         row.get("auth_nats"), row.get("kept"), row.get("kappa")]
        for row in rows
    ]  # fmt: skip
    round_rows = []
    for r in rounds:
        diffs = _read(analysis / f"diffs_round_{r:02d}.json")
        by_stage = {row["stage"]: row for row in rows}
        steered, healed = by_stage.get(f"steered {r}", {}), by_stage.get(f"healed {r}", {})
        round_rows.append([
            f"round {r}", steered.get("kappa"), steered.get("trait_log_odds"), healed.get("trait_log_odds"),
            steered.get(floor), healed.get(floor),
            diffs.get("kl_steered", {}).get("rmse"), diffs.get("kl_healed", {}).get("rmse"),
            _band_mean(diffs, "trait_retained"), _band_mean(diffs, "incoherence_retained"),
        ])  # fmt: skip
    links = " ".join(f'<a href="round_{r:02d}.html">round {r}</a>' for r in rounds)
    stopped = stop_reason(run)
    heal = config.heal
    sections = [
        f"<p class='note'>{html.escape(config.model.spec)}, {html.escape(config.persona.axis)} axis; barrier "
        f"{heal.agg} KL to {heal.ref}, tau={heal.tau}, lambda={heal.lam}; {config.loop.rounds} rounds planned, "
        f"{len(rounds)} finished.{' Stopped early: ' + html.escape(stopped) if stopped else ''}</p>",
        f"<p>Rounds: {links}</p>",
        "<h2>Trajectory</h2>",
        _figure(trajectory_figure(rows, config), static, first=True),
        "<h2>Every stage</h2>",
        _table(_headers(STAGE_HEADER, floor), stage_rows),
        "<h2>Per round: did healing keep the trait and remove the incoherence?</h2>",
        "<p class='note'>KL to base on the round's kept completions; trait / incoherence retained = healed / "
        "steered, mean over the steered band (1 = kept, 0 = removed); see the round pages.</p>",
        _table(_headers(ROUND_HEADER, floor), round_rows),
        "<h2>Adapters projected on the steering vector</h2>",
        _figure(projection_figure_from_json(analysis / "project_adapters.json"), static, first=False),
        *_frontier_section(analysis / "frontier.json", static),
    ]
    return _page(f"Run {config.output.name}: steer, heal, repeat", "", sections)


def _frontier_section(path: Path, static: bool) -> list[str]:
    """Healing vs steering less, when `cli.py frontier` has run (it is not part of the default analyses: it
    evaluates the student at many doses, minutes per round)."""
    if not path.is_file():
        return []
    results = read_frontier(path)
    rows = [
        [f"round {r['round']}", len(r["curve"]), r["healed"]["trait"], r["healed"]["neutral_fluency"],
         r["gain"]["trait_gain"], f"[{_cell(r['gain']['ci95'][0])}, {_cell(r['gain']['ci95'][1])}]",
         r["gain"]["fluency_gain"], r["gain"]["note"]]
        for r in results
    ]  # fmt: skip
    header = ["round", "doses", "healed trait", "healed neutral fluency", "healing gain at equal fluency", "95% CI",
              "fluency gain at equal trait", "note"]  # fmt: skip
    return [
        f"<h2>{label('steering_less')}</h2>",
        "<p class='note'>The student each round started from, steered with that round's vector at a ladder of doses, "
        "against the healed student; gain = healed trait - the curve's trait at the healed coherence.</p>",
        _figure(frontier_figure(results), static, first=False),
        _table(header, rows, text_columns=(0, 5, 7)),
    ]


def projection_figure_from_json(path: Path) -> go.Figure:
    data = read_json(path)
    return projection_figure(Projection(data["rounds"], data["layers"], data["random_direction_share"]))


def round_page(run: Path, config: Config, r: int, rounds: list[int], static: bool) -> str:
    round_dir, analysis = round_path(run, r), run / "analysis"
    collect = _read(round_dir / "collect_summary.json")
    diffs = _read(analysis / f"diffs_round_{r:02d}.json")
    lens = next(x for x in _read(analysis / "logit_lens.json")["rounds"] if x["round"] == r)
    generations = _read(analysis / "generations.json")
    steered_eval, healed_eval = _read(round_dir / "eval_steered.json"), _read(round_dir / "eval_healed.json")
    nav = '<a href="index.html">index</a>' + "".join(
        f'<a href="round_{other:02d}.html">round {other}</a>' for other in rounds if other != r
    )
    readouts = [
        ["trait log-odds", steered_eval.get("trait", {}).get("log_odds"), healed_eval.get("trait", {}).get("log_odds")],
        ["neutral NLL", steered_eval.get("neutral_nll"), healed_eval.get("neutral_nll")],
        *[[label, (steered_eval.get("adherence") or {}).get(key), (healed_eval.get("adherence") or {}).get(key)]
          for label, key in (("task adherence (PMI, nats/token)", "pmi"), ("base NLL of own replies", "nll"))],
        *[[f"own replies: {label}", (steered_eval.get("generation") or {}).get(key),
           (healed_eval.get("generation") or {}).get(key)]
          for label, key in (("filter keep-rate", "keep_rate"), ("tail perplexity", "tail_ppl"),
                             ("repetition", "repetition"))],
        *[[f"neutral KL {agg}", steered_eval.get(f"neutral_kl_{agg}"), healed_eval.get(f"neutral_kl_{agg}")]
          for agg in ("mean", "rmse", "p95", "max")],
        *[[f"KL to base on kept completions, {agg}", diffs["kl_steered"][agg], diffs["kl_healed"][agg]]
          for agg in ("mean", "rmse", "p95", "max")],
        ["MFV care nats", steered_eval.get("care_nats"), healed_eval.get("care_nats")],
        ["MFV auth nats", steered_eval.get("auth_nats"), healed_eval.get("auth_nats")],
    ]  # fmt: skip
    band = set(diffs["band_layers"])
    direction_rows = [
        [row["layer"], row["trait_projection_steered"], row["trait_projection_healed"], row["trait_retained"],
         row["incoherence_share_steered"], row["incoherence_share_healed"], row["incoherence_retained"]]
        for row in diffs["layers"] if row["layer"] in band
    ]  # fmt: skip
    probe_rows = [
        [row["layer"], row["steered"]["accuracy"], row["steered"]["cos_vector"], row["healed"]["accuracy"],
         row["healed"]["cos_vector"]]
        for row in diffs.get("probes", [])
    ]  # fmt: skip
    lens_rows = [
        [row["layer"], ", ".join(t for t, _ in row["promoted"]), ", ".join(t for t, _ in row["suppressed"])]
        for row in lens["layers"]
    ]
    base_answers = _answers(run / "demo_base.jsonl", len(generations["prompts"]))
    healed_answers = _answers(round_dir / "demo.jsonl", len(generations["prompts"]))
    steered_answers = generations["steered"][str(r)]
    generation_rows = [
        [prompt, base, steered, healed]
        for prompt, base, steered, healed in zip(
            generations["prompts"], base_answers, steered_answers, healed_answers, strict=True
        )
    ]
    sections = [
        "<h2>Data: dose and filter</h2>",
        f"<p>dose kappa = {_cell(collect.get('kappa'))} (passed: {collect.get('dose_passed')}); probes "
        f"(kappa, keep-rate) {html.escape(str(collect.get('probes')))}; {collect.get('kept_at_dose')} kept at that "
        f"dose, {collect.get('kept')}/{collect.get('generated')} overall; drop reasons "
        f"{html.escape(str(collect.get('drop_reasons')))}; steered eval coefficient "
        f"{_cell(collect.get('eval_coeff'))}.</p>",
        "<h2>Readouts: steered vs healed</h2>",
        _table(["readout", "steered", "healed"], readouts),
        "<h2>Model diffs</h2>",
        _figure(diff_figure(diffs), static, first=True),
        f"<p class='note'>Directions fitted on half of the {diffs['n_kept']} kept completions (and "
        f"{diffs['n_dropped']} dropped ones), measured on the other half. A random "
        f"{diffs['layers'][0]['incoherence_dims']}-dimensional subspace would hold a share of "
        f"{_cell(diffs['random_share'])}.</p>",
        _table(DIRECTION_HEADER, direction_rows),
        *_probe_section(probe_rows),
        "<h2>Logit lens of v_r</h2>",
        _table(["layer", "promoted", "suppressed"], lens_rows, text_columns=(1, 2)),
        "<h2>Greedy generations: base / steered / healed</h2>",
        _table(["prompt", "base", f"steered (round {r})", f"healed (round {r})"], generation_rows, (0, 1, 2, 3)),
    ]
    return _page(f"Run {config.output.name}: round {r}", nav, sections)


def _probe_section(rows: list[list[object]]) -> list[str]:
    """Nothing for diffs computed before the probes existed."""
    if not rows:
        return []
    note = (
        "<p class='note'>A logistic-regression probe per band layer separates the base's states from the "
        "steered / healed model's on the same kept completions (mean-pooled per completion, folds grouped by "
        "completion): held-out accuracy (0.5 = no linear trace) and the cosine of its weight with v_r.</p>"
    )
    header = ["layer", "accuracy base vs steered", "cos(probe, v) steered", "accuracy base vs healed",
              "cos(probe, v) healed"]  # fmt: skip
    return ["<h3>Linear probes: is the change still visible, and along v?</h3>", note, _table(header, rows)]


def write_html_report(run: Path, out: Path | None = None, static: bool = False, compute: bool = True) -> Path:
    """index.html + round_XX.html under `out` (default run/report); returns the index path."""
    if compute:
        ensure_analyses(run)
    config = read_run(run)
    rounds = finished_rounds(run)
    out = out or run / "report"
    out.mkdir(parents=True, exist_ok=True)
    for r in rounds:
        atomic_write_text(out / f"round_{r:02d}.html", round_page(run, config, r, rounds, static))
    index = out / "index.html"
    atomic_write_text(index, index_page(run, config, rounds, static))
    return index
