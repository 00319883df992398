"""project-adapters: what direction did each round's adapter write, and is it the steering vector's?

For a loop run folder, per round r:
- activation space: on held-out context prompts (not used to extract any vector), the mean residual delta at
  the assistant tag per layer, dh = h(student_r) - h(student_{r-1}) and dh_base = h(student_r) - h(base); its
  cosine with v_r and v_0, its projection on the unit vector, and the share of ||dh||^2 along the vector;
- weight space: for the modules that write to the residual stream (o_proj, down_proj), the LoRA update
  dW = scaling * B A; how strongly it writes along the vector (||v^T dW|| / ||dW||, where a random direction
  gives about 1/sqrt(d)) and the cosine of dW's top left-singular (output) direction with v;
- cos(v_r, v_0) over the band: does the axis drift?
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
import torch
from peft.tuners.lora import LoraLayer
from plotly.subplots import make_subplots
from safetensors.torch import load_file
from torch import nn

from interp_heal.architecture import decoder_layers
from interp_heal.bake import adapter_name, bake, finished_rounds, student_at
from interp_heal.io import write_json
from interp_heal.models import load_configured_model
from interp_heal.personas import context_prompts, render_prompts
from interp_heal.report import save_figure
from interp_heal.run_folder import read_run, round_path
from interp_heal.steer import SteeringVector, last_token_states

RESIDUAL_WRITERS = ("o_proj", "down_proj")


def held_out_contexts(n: int, used: int, seed: int) -> list[str]:
    """Context prompts the loop's extraction never saw (it samples `used` of the pool with `seed`)."""
    seen = set(context_prompts(used, seed=seed))
    return [prompt for prompt in context_prompts() if prompt not in seen][:n]


def _unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm().clamp_min(1e-12)


def activation_projection(delta: torch.Tensor, vector: SteeringVector, layers: list[int]) -> dict[str, list[float]]:
    """Per layer: cosine with v, projection on v-hat, share of ||delta||^2 along v-hat."""
    cosines, projections, shares = [], [], []
    for layer in layers:
        d, v = delta[layer], _unit(vector.directions[layer])
        projection = float(d @ v)
        cosines.append(float(torch.nn.functional.cosine_similarity(d, v, dim=0)))
        projections.append(projection)
        shares.append(projection**2 / max(float(d @ d), 1e-12))
    return {"cos": cosines, "projection": projections, "share": shares}


def write_alignment(lora_b: torch.Tensor, lora_a: torch.Tensor, direction: torch.Tensor) -> dict[str, float]:
    """How much a low-rank update dW = B A ([d_out, r] x [r, d_in], scaling folded into B) writes along a residual
    direction: ||v^T dW|| / ||dW|| (a random unit direction gives about 1/sqrt(d)) and |cos| of dW's top output
    direction with v. Exact, from the factors: with B = Q R, dW's norm and left singular vectors are those of the
    [r, d_in] matrix R A mapped through Q, so no [d_out, d_in] SVD is taken."""
    lora_b, lora_a, v = lora_b.detach().float(), lora_a.detach().float(), _unit(direction.float())
    q, r = torch.linalg.qr(lora_b)
    small = r @ lora_a  # [r, d_in]: dW = q @ small, q with orthonormal columns
    norm = float(small.norm())
    top_output = q @ torch.linalg.svd(small, full_matrices=False).U[:, 0]
    return {
        "write_share": float(((v @ q) @ small).norm()) / norm if norm > 0 else 0.0,
        "top_direction_cos": abs(float(top_output @ v)),
    }


def weight_projection(model: nn.Module, name: str, vector: SteeringVector) -> list[dict[str, object]]:
    """For each residual-writing LoRA module of adapter `name` in a loaded model: `write_alignment` at its layer."""
    rows = []
    for layer_index, layer in enumerate(decoder_layers(model)):
        for module_name, module in layer.named_modules():
            if not (isinstance(module, LoraLayer) and module_name.split(".")[-1] in RESIDUAL_WRITERS):
                continue
            if name not in module.lora_A:
                continue
            lora_b = module.scaling[name] * module.lora_B[name].weight
            alignment = write_alignment(lora_b, module.lora_A[name].weight, vector.directions[layer_index])
            rows.append({"layer": layer_index, "module": module_name.split(".")[-1], **alignment})
    return rows


_LORA_KEY = re.compile(rf"layers\.(\d+)\..*\b({'|'.join(RESIDUAL_WRITERS)})\.lora_([AB])\.weight$")


def adapter_file_projection(adapter_dir: Path, vector: SteeringVector) -> list[dict[str, object]]:
    """`weight_projection` read from a saved peft adapter folder, without loading the model."""
    settings = json.loads((adapter_dir / "adapter_config.json").read_text())
    rank, alpha = settings["r"], settings["lora_alpha"]
    scaling = alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank
    factors: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        if match := _LORA_KEY.search(key):
            factors.setdefault((int(match[1]), match[2]), {})[match[3]] = tensor
    return [
        {"layer": layer, "module": module,
         **write_alignment(scaling * pair["B"], pair["A"], vector.directions[layer])}
        for (layer, module), pair in sorted(factors.items())
    ]  # fmt: skip


@dataclass(frozen=True)
class Projection:
    rounds: list[dict[str, object]]
    layers: list[int]
    random_direction_share: float  # what write_share a random unit vector would give: 1/sqrt(d)


def project_adapters(run: Path, n_prompts: int = 32) -> Projection:
    config = read_run(run)
    rounds = finished_rounds(run)
    model, tokenizer, info = load_configured_model(config.model)
    student = bake(model, [round_path(run, r) / "adapter" for r in rounds])
    prompts = render_prompts(tokenizer, held_out_contexts(n_prompts, config.steer.n_contexts, config.seed))
    states: dict[int | None, torch.Tensor] = {}
    for state in [None, *rounds]:
        with torch.no_grad(), student_at(student, state, len(rounds)) as at_state:
            states[state] = last_token_states(at_state, tokenizer, prompts, config.steer.batch_size).mean(0)
    vectors = [SteeringVector.load(round_path(run, r) / "vector.safetensors") for r in rounds]
    layers = list(range(info.n_layers))
    results = []
    for r in rounds:
        delta_prev = states[r] - states[r - 1 if r > 0 else None]
        delta_base = states[r] - states[None]
        results.append({
            "round": r,
            "vs_prev_on_v_r": activation_projection(delta_prev, vectors[r], layers),
            "vs_prev_on_v_0": activation_projection(delta_prev, vectors[0], layers),
            "vs_base_on_v_0": activation_projection(delta_base, vectors[0], layers),
            "delta_norm": [float(delta_prev[layer].norm()) for layer in layers],
            "weights": weight_projection(student, adapter_name(r), vectors[r]),
            "vector_cos_r0": vectors[0].band_cosine(vectors[r]),
        })  # fmt: skip
    return Projection(results, layers, 1 / math.sqrt(info.d_model))


def projection_figure(projection: Projection) -> go.Figure:
    figure = make_subplots(rows=1, cols=3, subplot_titles=(
        "share of ||dh||^2 along v_r (vs previous student)", "LoRA write share along v (o_proj, down_proj)",
        "cos(v_r, v_0) over the band"))  # fmt: skip
    for result in projection.rounds:
        label = f"round {result['round']}"
        figure.add_trace(go.Scatter(x=projection.layers, y=result["vs_prev_on_v_r"]["share"], name=label), row=1, col=1)
        weights = result["weights"]
        figure.add_trace(go.Scatter(x=[w["layer"] for w in weights], y=[w["write_share"] for w in weights],
                                    mode="markers", name=f"{label} dW"), row=1, col=2)  # fmt: skip
    figure.add_hline(y=projection.random_direction_share, line_dash="dot", annotation_text="random direction",
                     row=1, col=2)  # fmt: skip
    figure.add_trace(go.Scatter(x=[r["round"] for r in projection.rounds],
                                y=[r["vector_cos_r0"] for r in projection.rounds], mode="lines+markers",
                                name="cos(v_r, v_0)"), row=1, col=3)  # fmt: skip
    figure.update_xaxes(title_text="layer", row=1, col=1)
    figure.update_xaxes(title_text="layer", row=1, col=2)
    figure.update_xaxes(title_text="round", row=1, col=3)
    figure.update_layout(width=1500, height=450)
    return figure


def run_project_adapters(run: Path, out: Path | None = None, n_prompts: int = 32) -> Projection:
    out = out or run / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    projection = project_adapters(run, n_prompts)
    write_json(out / "project_adapters.json", {
        "layers": projection.layers, "random_direction_share": projection.random_direction_share,
        "rounds": projection.rounds,
    })  # fmt: skip
    save_figure(projection_figure(projection), out / "project_adapters")
    return projection


def format_projection(projection: Projection, band: list[int]) -> str:
    lines = ["round | cos(v_r,v_0) | share of dh^2 along v_r (band mean) | dW write share (mean) | top-dir cos (mean)"]
    for result in projection.rounds:
        shares = [result["vs_prev_on_v_r"]["share"][layer] for layer in band]
        weights = result["weights"]
        write = sum(w["write_share"] for w in weights) / max(len(weights), 1)
        top = sum(w["top_direction_cos"] for w in weights) / max(len(weights), 1)
        lines.append(f"{result['round']:>5} | {result['vector_cos_r0']:>12.3f} | {sum(shares) / len(shares):>35.3f} "
                     f"| {write:>21.3f} | {top:>18.3f}")  # fmt: skip
    lines.append(f"(a random direction would give write share ~{projection.random_direction_share:.3f})")
    return "\n".join(lines)
