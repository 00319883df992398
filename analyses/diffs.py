"""diffs: what did steering and healing change in the model, token by token and layer by layer?

For round r of a loop run, on that round's own completions. Three model states:
  base    = every adapter off;
  steered = the student before round r with v_r added at the round's eval coefficient (what the student imitates);
  healed  = the student after round r (this round's adapter on, no vector).

1. Model diffs, on the kept (training) completions: per-token KL(steered || base) and KL(healed || base) over
   the completion tokens (distribution and mean / rmse / p95 / max), and per layer the mean norm of the
   hidden-state delta of each against the base at those tokens.
2. Trait vs incoherence directions, per layer. The trait direction is v_r. Incoherence directions are
   estimated from the data: (a) the mean hidden state of the dropped completions minus that of the kept ones,
   each read by the generator (the student before round r, steered at the completion's own coefficient);
   (b) the top principal directions of the steered - base deltas with the trait direction projected out.
   Both are fitted on half of the kept completions and measured on the other half, where we report the
   signed projection of the steered and healed deltas on the trait direction and their energy in the
   incoherence subspace. `trait_retained` = healed / steered projection (1: the trait push survives healing)
   and `incoherence_retained` = healed / steered incoherence energy (0: the barrier removed it) answer
   "did the KL barrier remove incoherence and keep the trait?".
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from analyses.probes import linear_probe, pool_by_completion
from interp_heal.bake import bake, finished_rounds, student_at
from interp_heal.errors import DataError
from interp_heal.generate import Completion
from interp_heal.io import read_jsonl, write_json
from interp_heal.models import load_configured_model
from interp_heal.personas import render_prompts
from interp_heal.report import save_figure
from interp_heal.run_folder import read_run, round_path
from interp_heal.sequences import PaddedBatch, hidden_kl, kl_aggregates, pad_left
from interp_heal.steer import SteeringVector, steered_states


@dataclass(frozen=True)
class RoundData:
    """One round's inputs: its vector, the eval coefficient, kept (training) and dropped completions."""

    index: int
    vector: SteeringVector
    eval_coeff: float
    kept: list[Completion]
    dropped: list[Completion]


def read_round(run: Path, round_index: int, max_kept: int = 32, max_dropped: int = 32) -> RoundData:
    round_dir = round_path(run, round_index)
    paths = [round_dir / name for name in ("vector.safetensors", "completions.jsonl", "collect_summary.json")]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise DataError(f"{round_dir} is not a finished round (missing {', '.join(missing)})")
    collect = json.loads(paths[2].read_text())
    rows = read_jsonl(paths[1])
    kept = [Completion.from_record(r) for r in rows if r["kept"] and r["kappa"] == collect["kappa"]]
    # Dropped for being empty or too short carry too few tokens to say anything about the hidden states.
    dropped = [Completion.from_record(r) for r in rows if not r["kept"] and len(r["token_ids"]) >= 8]
    return RoundData(
        round_index, SteeringVector.load(paths[0]), float(collect["eval_coeff"]), kept[:max_kept], dropped[:max_dropped]
    )


# ---------------------------------------------------------------- forwards


def _batches(
    tokenizer: PreTrainedTokenizerBase, completions: list[Completion], batch_size: int, device: torch.device
) -> Iterator[tuple[int, PaddedBatch]]:
    prompt_ids = tokenizer(render_prompts(tokenizer, [c.prompt for c in completions]), add_special_tokens=False)
    for start in range(0, len(completions), batch_size):
        chunk = completions[start : start + batch_size]
        prompts = prompt_ids["input_ids"][start : start + batch_size]
        yield start, pad_left(prompts, [c.token_ids for c in chunk], tokenizer.pad_token_id, device)


def _forward(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batch: PaddedBatch,
    vector: SteeringVector | None = None,
    coeff: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The final norm's output [n_tok, d] (unembedded a chunk at a time by `hidden_kl`: no [n_tok, vocab]
    logits) and block outputs [L, n_tok, d] at the positions that predict completion tokens."""
    with torch.inference_mode():
        final, states = steered_states(model, tokenizer, batch.model_inputs(), vector, coeff)
    mask = batch.target_mask
    return final[mask], states[:, mask].float().cpu()


@dataclass(frozen=True)
class TokenDiffs:
    """Per completion token of the kept completions: KL and hidden deltas of steered and healed vs base."""

    kl_steered: torch.Tensor  # [n_tok]
    kl_healed: torch.Tensor  # [n_tok]
    delta_steered: torch.Tensor  # [L, n_tok, d]
    delta_healed: torch.Tensor  # [L, n_tok, d]
    base_norm: torch.Tensor  # [L]: mean ||h_base|| over the tokens
    completion: torch.Tensor  # [n_tok]: index of the completion each token belongs to
    base_pooled: torch.Tensor  # [L, n_completions, d]: h_base averaged over each completion's tokens


def token_diffs(
    student: nn.Module, tokenizer: PreTrainedTokenizerBase, data: RoundData, n_rounds: int, batch_size: int
) -> TokenDiffs:
    device = next(student.parameters()).device
    before = data.index - 1 if data.index > 0 else None
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    for start, batch in tqdm(list(_batches(tokenizer, data.kept, batch_size, device)), desc="diffs", leave=False):
        with student_at(student, None, n_rounds) as base:
            base_final, base_h = _forward(base, tokenizer, batch)
        with student_at(student, before, n_rounds) as generator:
            steered_final, steered_h = _forward(generator, tokenizer, batch, data.vector, data.eval_coeff)
        with student_at(student, data.index, n_rounds) as healed:
            healed_final, healed_h = _forward(healed, tokenizer, batch)
        # The head is not adapted (LoRA sits in the decoder blocks), so one unembedding serves all three states.
        with torch.inference_mode():
            parts["kl_steered"].append(hidden_kl(student, steered_final, base_final).cpu())
            parts["kl_healed"].append(hidden_kl(student, healed_final, base_final).cpu())
        parts["delta_steered"].append(steered_h - base_h)
        parts["delta_healed"].append(healed_h - base_h)
        parts["base_norm"].append(base_h.norm(dim=-1))
        local = batch.target_mask.nonzero()[:, 0].cpu()
        parts["completion"].append(local + start)
        parts["base_pooled"].append(pool_by_completion(base_h, local, int(batch.target_mask.shape[0])))
    return TokenDiffs(
        kl_steered=torch.cat(parts["kl_steered"]),
        kl_healed=torch.cat(parts["kl_healed"]),
        delta_steered=torch.cat(parts["delta_steered"], dim=1),
        delta_healed=torch.cat(parts["delta_healed"], dim=1),
        base_norm=torch.cat(parts["base_norm"], dim=1).mean(1),
        completion=torch.cat(parts["completion"]),
        base_pooled=torch.cat(parts["base_pooled"], dim=1),
    )


def generator_means(
    student: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    completions: list[Completion],
    data: RoundData,
    n_rounds: int,
    batch_size: int,
) -> torch.Tensor:
    """Per completion, the mean block output over its tokens as the generator read them: [n, L, d]."""
    device = next(student.parameters()).device
    before = data.index - 1 if data.index > 0 else None
    means: dict[int, torch.Tensor] = {}
    for coeff in sorted({c.coeff for c in completions}):
        indices = [i for i, c in enumerate(completions) if c.coeff == coeff]
        group = [completions[i] for i in indices]
        for start, batch in _batches(tokenizer, group, batch_size, device):
            with student_at(student, before, n_rounds) as generator:
                _, states = _forward(generator, tokenizer, batch, data.vector, coeff)
            rows = batch.target_mask.nonzero()[:, 0].cpu()
            for row in rows.unique().tolist():
                means[indices[start + row]] = states[:, rows == row].mean(1)
    return torch.stack([means[i] for i in range(len(completions))])


# ---------------------------------------------------------------- directions


def _unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm().clamp_min(1e-12)


def incoherence_basis(
    mean_difference: torch.Tensor | None, steered_deltas: torch.Tensor, trait: torch.Tensor, n_components: int
) -> torch.Tensor:
    """Orthonormal rows spanning the incoherence directions at one layer, all orthogonal to the trait.

    `mean_difference` (dropped - kept, may be None) and the top `n_components` right-singular vectors of the
    steered deltas [n, d] after the trait component is removed (uncentred: the directions of largest energy).
    """
    v = _unit(trait)
    residual = steered_deltas - (steered_deltas @ v)[:, None] * v
    candidates = list(torch.linalg.svd(residual, full_matrices=False).Vh[:n_components])
    if mean_difference is not None:
        candidates.insert(0, mean_difference - (mean_difference @ v) * v)
    basis, _ = torch.linalg.qr(torch.stack(candidates).T)
    return basis.T


def direction_shares(delta_steered: torch.Tensor, delta_healed: torch.Tensor, trait: torch.Tensor,
                     basis: torch.Tensor) -> dict[str, float | None]:  # fmt: skip
    """How much of the steered and healed deltas [n, d] lies along the trait and in the incoherence basis."""
    v = _unit(trait)
    out: dict[str, float | None] = {}
    for name, delta in (("steered", delta_steered), ("healed", delta_healed)):
        energy = float(delta.square().sum(-1).mean())
        along = delta @ v
        incoherence = float((delta @ basis.T).square().sum(-1).mean())
        out[f"trait_projection_{name}"] = float(along.mean())
        out[f"trait_share_{name}"] = float(along.square().mean()) / max(energy, 1e-12)
        out[f"incoherence_energy_{name}"] = incoherence
        out[f"incoherence_share_{name}"] = incoherence / max(energy, 1e-12)
    # Where steering left the layer untouched (before the band in round 0) a ratio means nothing: None.
    moved = float(delta_steered.square().sum(-1).mean()) > 1e-10
    out["trait_retained"] = out["trait_projection_healed"] / out["trait_projection_steered"] if moved else None
    out["incoherence_retained"] = (
        out["incoherence_energy_healed"] / out["incoherence_energy_steered"] if moved else None
    )
    return out


# ---------------------------------------------------------------- one round


def diff_round(
    student: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: RoundData,
    n_rounds: int,
    batch_size: int = 8,
    n_components: int = 3,
) -> dict[str, object]:
    if len(data.kept) < 4:
        raise DataError(f"round {data.index} has {len(data.kept)} kept completions; the diff needs at least 4")
    diffs = token_diffs(student, tokenizer, data, n_rounds, batch_size)
    fit_tokens, eval_tokens = diffs.completion % 2 == 0, diffs.completion % 2 == 1
    fit_kept = [c for i, c in enumerate(data.kept) if i % 2 == 0]
    mean_difference = None
    if data.dropped:
        dropped = generator_means(student, tokenizer, data.dropped, data, n_rounds, batch_size).mean(0)
        kept = generator_means(student, tokenizer, fit_kept, data, n_rounds, batch_size).mean(0)
        mean_difference = dropped - kept
    n_layers, _, d_model = diffs.delta_steered.shape
    layers = []
    for layer in range(n_layers):
        trait = data.vector.directions[layer].float()
        basis = incoherence_basis(
            None if mean_difference is None else mean_difference[layer],
            diffs.delta_steered[layer][fit_tokens],
            trait,
            n_components,
        )
        shares = direction_shares(diffs.delta_steered[layer][eval_tokens], diffs.delta_healed[layer][eval_tokens],
                                  trait, basis)  # fmt: skip
        layers.append({
            "layer": layer,
            "delta_norm_steered": float(diffs.delta_steered[layer].norm(dim=-1).mean()),
            "delta_norm_healed": float(diffs.delta_healed[layer].norm(dim=-1).mean()),
            "base_norm": float(diffs.base_norm[layer]),
            "incoherence_dims": int(basis.shape[0]),
            **shares,
        })  # fmt: skip
    return {
        "round": data.index,
        "eval_coeff": data.eval_coeff,
        "n_kept": len(data.kept),
        "n_dropped": len(data.dropped),
        "n_tokens": int(diffs.kl_steered.numel()),
        "band_layers": list(data.vector.layers),
        "kl_steered": kl_aggregates(diffs.kl_steered),
        "kl_healed": kl_aggregates(diffs.kl_healed),
        "kl_steered_tokens": [round(float(x), 5) for x in diffs.kl_steered],
        "kl_healed_tokens": [round(float(x), 5) for x in diffs.kl_healed],
        "random_share": layers[0]["incoherence_dims"] / d_model,
        "layers": layers,
        "probes": band_probes(diffs, data),
    }


def band_probes(diffs: TokenDiffs, data: RoundData) -> list[dict[str, object]]:
    """Per band layer, a linear probe base vs steered and base vs healed (`probes.linear_probe`)."""
    n = diffs.base_pooled.shape[1]
    rows = []
    for layer in data.vector.layers:
        base = diffs.base_pooled[layer]
        trait = data.vector.directions[layer].float()
        row: dict[str, object] = {"layer": layer}
        for state, delta in (("steered", diffs.delta_steered), ("healed", diffs.delta_healed)):
            changed = base + pool_by_completion(delta[layer][None], diffs.completion, n)[0]
            row[state] = linear_probe(base, changed, trait)
        rows.append(row)
    return rows


def diff_figure(result: dict[str, object]) -> go.Figure:
    layers: list[dict] = result["layers"]
    index = [row["layer"] for row in layers]
    figure = make_subplots(rows=1, cols=3, subplot_titles=(
        "per-token KL to base (kept completions)", "hidden delta vs base, relative to |h_base|",
        "healed / steered: trait projection and incoherence energy"))  # fmt: skip
    for name, color in (("steered", "#d62728"), ("healed", "#2ca02c")):
        kl = result[f"kl_{name}_tokens"]
        figure.add_trace(go.Histogram(x=kl, name=f"KL({name} || base)", marker_color=color, opacity=0.6,
                                      nbinsx=60), row=1, col=1)  # fmt: skip
        relative = [row[f"delta_norm_{name}"] / row["base_norm"] for row in layers]
        figure.add_trace(go.Scatter(x=index, y=relative, name=f"|dh {name}|", line_color=color), row=1, col=2)
    figure.add_trace(go.Scatter(x=index, y=[row["trait_retained"] for row in layers], name="trait retained",
                                line_color="#1f77b4"), row=1, col=3)  # fmt: skip
    figure.add_trace(go.Scatter(x=index, y=[row["incoherence_retained"] for row in layers],
                                name="incoherence retained", line_color="#ff7f0e"), row=1, col=3)  # fmt: skip
    band = result["band_layers"]
    for col in (2, 3):
        figure.add_vrect(x0=min(band) - 0.5, x1=max(band) + 0.5, fillcolor="grey", opacity=0.15, line_width=0,
                         row=1, col=col)  # fmt: skip
    figure.update_yaxes(type="log", row=1, col=1)
    figure.update_xaxes(title_text="nats", row=1, col=1)
    figure.update_xaxes(title_text="layer (grey: steered band)", row=1, col=2)
    figure.update_xaxes(title_text="layer (grey: steered band)", row=1, col=3)
    figure.update_layout(width=1500, height=450, barmode="overlay", title=f"round {result['round']}: model diffs")
    return figure


def run_diffs(run: Path, rounds: list[int] | None = None, out: Path | None = None, max_kept: int = 32,
              max_dropped: int = 32) -> list[dict[str, object]]:  # fmt: skip
    """diffs_round_XX.json + figure for each finished round (or the ones asked for) under run/analysis/."""
    config = read_run(run)
    finished = finished_rounds(run)
    unknown = sorted(set(rounds or []) - set(finished))
    if unknown:
        raise DataError(f"round(s) {unknown} not finished in {run}; finished: {finished}")
    out = out or run / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, _ = load_configured_model(config.model)
    student = bake(model, [round_path(run, r) / "adapter" for r in finished])
    results = []
    for round_index in rounds or finished:
        data = read_round(run, round_index, max_kept, max_dropped)
        result = diff_round(student, tokenizer, data, len(finished), config.steer.batch_size)
        write_json(out / f"diffs_round_{round_index:02d}.json", result)
        save_figure(diff_figure(result), out / f"diffs_round_{round_index:02d}")
        results.append(result)
    return results


def _mean(values: list[float | None]) -> float:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else float("nan")


def format_diffs(result: dict[str, object]) -> str:
    band = set(result["band_layers"])
    in_band = [row for row in result["layers"] if row["layer"] in band]
    trait = _mean([row["trait_retained"] for row in in_band])
    incoherence = _mean([row["incoherence_retained"] for row in in_band])
    steered, healed = result["kl_steered"], result["kl_healed"]
    return (
        f"round {result['round']}: KL to base steered mean/rmse/p95/max "
        f"{steered['mean']:.3f}/{steered['rmse']:.3f}/{steered['p95']:.3f}/{steered['max']:.2f}, healed "
        f"{healed['mean']:.3f}/{healed['rmse']:.3f}/{healed['p95']:.3f}/{healed['max']:.2f}; in the band: "
        f"trait retained {trait:.2f}, incoherence retained {incoherence:.2f} "
        f"({result['n_kept']} kept, {result['n_dropped']} dropped completions)"
    )
