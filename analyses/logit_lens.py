"""logit-lens: which tokens does each layer's steering vector promote and suppress?

Each layer's vector v_l is read through the model's final norm and unembedding, W_U norm(v_l): the tokens
the direction pushes up and down if it reached the output unchanged. The readout comes from TransformerLens'
TransformerBridge booted on a private copy of the model (booting rewires the modules it wraps, so never the
loop's model); where the bridge does not support the architecture, from the model's own final norm and output
embedding, which computes the same map. Scores are z-scored over the vocabulary so layers compare.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import plotly.graph_objects as go
import torch
from loguru import logger
from torch import nn
from transformers import PreTrainedTokenizerBase

from interp_heal.architecture import final_norm, unwrap_peft
from interp_heal.errors import DataError
from interp_heal.io import write_json
from interp_heal.models import load_configured_model
from interp_heal.report import save_figure
from interp_heal.run_folder import read_run, round_dirs
from interp_heal.steer import SteeringVector

Readout = Callable[[torch.Tensor], torch.Tensor]


def hf_readout(model: nn.Module) -> Readout:
    """Residual directions [n, d] -> logits [n, V] with the model's own final norm and output embedding."""
    causal_lm, _ = unwrap_peft(model)
    norm, head = final_norm(causal_lm), causal_lm.get_output_embeddings()
    return lambda directions: head(norm(directions))


def bridge_readout(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> Readout:
    """The same map through TransformerLens' bridge (ln_final, unembed) on a private copy of the model."""
    from transformer_lens.model_bridge import TransformerBridge  # heavy import (wandb, datasets): only here

    private = copy.deepcopy(unwrap_peft(model)[0])
    label = getattr(private.config, "name_or_path", "") or type(private).__name__
    bridge = TransformerBridge.boot_transformers(label, hf_model=private, tokenizer=tokenizer)
    return lambda directions: bridge.unembed(bridge.ln_final(directions))


def lens_readout(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> tuple[Readout, str]:
    try:
        return bridge_readout(model, tokenizer), "transformer_lens"
    except Exception as err:  # the bridge raises assorted types for architectures it does not map
        logger.warning(f"TransformerBridge unavailable for this model ({type(err).__name__}: {err}); using HF modules")
        return hf_readout(model), "hf"


def vector_lens(
    vector: SteeringVector, readout: Readout, tokenizer: PreTrainedTokenizerBase, layers: list[int], top_k: int = 10
) -> list[dict[str, object]]:
    """Per layer: the top_k promoted and suppressed tokens of W_U norm(v_l), as z-scores over the vocabulary."""
    with torch.no_grad():
        logits = readout(vector.directions[layers].float()).float()
    z = (logits - logits.mean(-1, keepdim=True)) / logits.std(-1, keepdim=True).clamp_min(1e-12)
    rows = []
    for row, layer in enumerate(layers):
        top, bottom = z[row].topk(top_k).indices.tolist(), (-z[row]).topk(top_k).indices.tolist()
        rows.append({
            "layer": layer,
            "promoted": [[tokenizer.decode([i]), round(float(z[row, i]), 2)] for i in top],
            "suppressed": [[tokenizer.decode([i]), round(float(z[row, i]), 2)] for i in bottom],
        })  # fmt: skip
    return rows


def lens_figure(rounds: list[dict[str, object]]) -> go.Figure:
    """A table per round and band layer: promoted and suppressed tokens."""
    header = ["round", "layer", "promoted (z)", "suppressed (z)"]
    cells: list[list[str]] = [[], [], [], []]
    for result in rounds:
        for row in result["layers"]:
            cells[0].append(str(result["round"]))
            cells[1].append(str(row["layer"]))
            cells[2].append(", ".join(f"{token!r} {score}" for token, score in row["promoted"]))
            cells[3].append(", ".join(f"{token!r} {score}" for token, score in row["suppressed"]))
    figure = go.Figure(go.Table(header={"values": header}, cells={"values": cells, "align": "left"},
                                columnwidth=[1, 1, 8, 8]))  # fmt: skip
    figure.update_layout(width=1500, height=max(300, 40 * len(cells[0]) + 120), title="logit lens of v_r (band layers)")
    return figure


def round_vectors(run: Path) -> list[tuple[int, SteeringVector]]:
    paths = [(index, path / "vector.safetensors") for index, path in round_dirs(run)]
    paths = [(index, path) for index, path in paths if path.is_file()]
    if not paths:
        raise DataError(f"{run} has no round_XX/vector.safetensors")
    return [(index, SteeringVector.load(path)) for index, path in paths]


def run_logit_lens(run: Path, out: Path | None = None, top_k: int = 10) -> dict[str, object]:
    config = read_run(run)
    out = out or run / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, _ = load_configured_model(config.model)
    readout, source = lens_readout(model, tokenizer)
    rounds = [
        {"round": index, "layers": vector_lens(vector, readout, tokenizer, list(vector.layers), top_k)}
        for index, vector in round_vectors(run)
    ]
    result = {"readout": source, "top_k": top_k, "rounds": rounds}
    write_json(out / "logit_lens.json", result)
    save_figure(lens_figure(rounds), out / "logit_lens")
    return result
