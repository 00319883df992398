"""Filter calibration: score distributions of sampled completions at a ladder of coefficients.

`python cli.py calibrate-filter -c configs/demo.yaml --out reports/filter_calibration` samples the task
prompts unsteered (coeff 0) and steered at each coefficient, scores every completion with the filter, and
writes `scores.jsonl`, `calibration.json` and `calibration.md`: per coefficient, the 10/50/90th percentiles
of each score, the keep-rate under the configured thresholds and the drop-reason counts. The filter's
defaults are chosen from these numbers (the unsteered model's completions should nearly all pass).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch

from interp_heal.config import Config, save_config
from interp_heal.filter import filter_completions, summarise
from interp_heal.generate import generate_completions
from interp_heal.io import atomic_write_text, write_json, write_jsonl
from interp_heal.models import load_configured_model
from interp_heal.personas import context_prompts, persona_pair, task_prompts
from interp_heal.steer import extract_steering_vector

SCORE_FIELDS = ("tail_ppl", "max_token_nll", "nll_mean", "repetition", "compression", "distinct_tokens", "n_tokens")


def _quantiles(values: list[float]) -> list[float]:
    finite = torch.tensor([v for v in values if math.isfinite(v)], dtype=torch.float64)
    if finite.numel() == 0:
        return [math.nan] * 3
    return [float(torch.quantile(finite, q)) for q in (0.1, 0.5, 0.9)]


def run_filter_calibration(config: Config, out: Path, coeffs: list[float], n_prompts: int) -> dict[str, object]:
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    pair = persona_pair(config.persona)
    model, tokenizer, info = load_configured_model(config.model)
    contexts = context_prompts(config.steer.n_contexts, seed=config.seed)
    vector = extract_steering_vector(model, tokenizer, pair, contexts, config.steer.band, config.steer.batch_size)
    completions = generate_completions(
        model, tokenizer, task_prompts(n_prompts), vector, coeffs, config.generate, seed=config.seed
    )
    records = filter_completions(model, tokenizer, completions, pair, config.filter, kappa=1.0, batch=0)
    write_jsonl(out / "scores.jsonl", (record.as_dict() for record in records))
    table: dict[str, object] = {}
    for coeff in coeffs:
        group = [record for record in records if record.completion.coeff == coeff]
        quantiles = {name: _quantiles([float(asdict(r.scores)[name]) for r in group]) for name in SCORE_FIELDS}
        table[f"{coeff:g}"] = {**summarise(group), "quantiles_p10_p50_p90": quantiles}
    result = {"model": info.name, "axis": pair.axis, "layers": list(vector.layers), "by_coeff": table}
    write_json(out / "calibration.json", result)
    atomic_write_text(out / "calibration.md", _markdown(result, config))
    return result


def _markdown(result: dict[str, object], config: Config) -> str:
    by_coeff = result["by_coeff"]
    assert isinstance(by_coeff, dict)
    lines = [
        f"# Filter calibration: {result['model']}, {result['axis']} axis, layers {result['layers']}",
        "",
        f"Sampling: temperature {config.generate.temperature}, top_p {config.generate.top_p}, "
        f"{config.generate.max_new_tokens} new tokens. Cells are p10 / p50 / p90 over completions.",
        "",
        "| coeff | keep-rate | " + " | ".join(SCORE_FIELDS) + " | drop reasons |",
        "|---" * (len(SCORE_FIELDS) + 3) + "|",
    ]
    for coeff, row in by_coeff.items():
        cells = [" / ".join(f"{v:.3g}" for v in row["quantiles_p10_p50_p90"][name]) for name in SCORE_FIELDS]
        lines.append(
            f"| {coeff} | {row['keep_rate']:.2f} ({row['generated']}) | "
            + " | ".join(cells)
            + f" | {row['drop_reasons']} |"
        )
    return "\n".join(lines) + "\n"
