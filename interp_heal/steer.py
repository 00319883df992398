"""Mean-difference steering vectors, read and injected through nnsight traces.

Extraction: for each context, a pos-persona chat and a neg-persona chat (generation prompt appended);
the residual stream (decoder block output) at the last prompt token, the assistant tag, is read for every
layer; the vector per layer is mean(pos) - mean(neg). All layers are stored; a depth band selects which
are injected. Injection adds coeff * v[l] to the output of every block in the band.

Every trace here takes `remote`: False runs it here; "local" runs nnsight's simulation of remote execution
(the trace is serialized as for NDIF, deserialized with this project's modules hidden, as on a server that
never installed them, then run); True ships it to NDIF (not tested here: no network, see docs/scaling.md).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nnsight
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import BatchEncoding, PreTrainedTokenizerBase

from interp_heal.architecture import band_to_layers, decoder_layer_path, decoder_layers, final_norm, unwrap_peft
from interp_heal.errors import DataError
from interp_heal.io import atomic_target, write_json
from interp_heal.personas import PersonaPair, render_prompts

Remote = bool | str  # nnsight's `remote=`: False, "local" (simulated server) or True (NDIF)


def _remote_kwargs(remote: Remote) -> dict[str, Remote]:
    # Nothing is passed for a local run, so it stays the exact call it was before remote execution existed.
    return {"remote": remote} if remote else {}


@dataclass(frozen=True)
class SteeringVector:
    """Per-layer mean-difference directions (all layers) and the band of layers that get injected."""

    directions: torch.Tensor  # [n_layers, d_model], float32 on CPU
    resid_norms: torch.Tensor  # [n_layers]: mean residual norm at the assistant tag (pos and neg)
    layers: tuple[int, ...]  # exact layer indices of the band
    band: tuple[float, float]
    model: str
    axis: str
    n_contexts: int
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def layer_norms(self) -> torch.Tensor:
        return self.directions.norm(dim=-1)

    def scaled(self, factor: float) -> SteeringVector:
        return _replace_directions(self, self.directions * factor)

    def __add__(self, other: SteeringVector) -> SteeringVector:
        if self.directions.shape != other.directions.shape or self.layers != other.layers:
            raise ValueError("can only add steering vectors of the same shape and layer band")
        return _replace_directions(self, self.directions + other.directions)

    def band_cosine(self, other: SteeringVector) -> float:
        """Cosine between the two vectors over this vector's band (layers concatenated)."""
        band = list(self.layers)
        return float(
            torch.nn.functional.cosine_similarity(
                self.directions[band].flatten(), other.directions[band].flatten(), dim=0
            )
        )

    def injection(self, coeff: float) -> dict[int, torch.Tensor]:
        """What gets added to each band layer's output: {layer: coeff * v[layer]}, in layer order."""
        return {layer: coeff * self.directions[layer] for layer in self.layers}

    def metadata(self) -> dict[str, object]:
        return {
            "model": self.model,
            "axis": self.axis,
            "band": list(self.band),
            "layers": list(self.layers),
            "n_contexts": self.n_contexts,
            "n_layers": int(self.directions.shape[0]),
            "d_model": int(self.directions.shape[1]),
            "layer_norms": [round(float(x), 6) for x in self.layer_norms],
            "resid_norms": [round(float(x), 6) for x in self.resid_norms],
            **self.extra,
        }

    def save(self, path: str | Path) -> None:
        """`path` is the .safetensors file; a readable .json with the same stem goes beside it."""
        path = Path(path)
        tensors = {"directions": self.directions.contiguous(), "resid_norms": self.resid_norms.contiguous()}
        with atomic_target(path) as tmp:
            save_file(tensors, str(tmp), metadata={"interp_heal": json.dumps(self.metadata())})
        write_json(path.with_suffix(".json"), self.metadata())

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
        path = Path(path)
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads(handle.metadata()["interp_heal"])
        except (OSError, KeyError, TypeError, ValueError, SafetensorError) as err:
            raise DataError(f"cannot read steering vector {path}: {err}") from err
        known = {"model", "axis", "band", "layers", "n_contexts", "n_layers", "d_model", "layer_norms", "resid_norms"}
        return cls(
            directions=tensors["directions"],
            resid_norms=tensors["resid_norms"],
            layers=tuple(meta["layers"]),
            band=(float(meta["band"][0]), float(meta["band"][1])),
            model=meta["model"],
            axis=meta["axis"],
            n_contexts=int(meta["n_contexts"]),
            extra={k: v for k, v in meta.items() if k not in known},
        )


@dataclass(frozen=True)
class Steering:
    """A steering vector at one dose, or none (`active` is False): what every readout takes to read a state."""

    vector: SteeringVector | None = None
    coeff: float = 0.0

    @property
    def active(self) -> bool:
        return self.vector is not None and self.coeff != 0


def _replace_directions(vector: SteeringVector, directions: torch.Tensor) -> SteeringVector:
    return SteeringVector(
        directions=directions,
        resid_norms=vector.resid_norms,
        layers=vector.layers,
        band=vector.band,
        model=vector.model,
        axis=vector.axis,
        n_contexts=vector.n_contexts,
        extra=dict(vector.extra),
    )


# ---------------------------------------------------------------- nnsight plumbing


def wrap(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> tuple[nnsight.TransformersModel, Any]:
    """An nnsight view of the causal LM and the envoy of its decoder-block list.

    The view is of the causal LM inside any peft wrapper: its LoRA layers stay active and the wrapper's
    `disable_adapter()` still turns them off. nnsight makes no copy of the weights.
    """
    causal_lm, _ = unwrap_peft(model)
    nn_model = nnsight.TransformersModel(causal_lm, tokenizer=tokenizer, task="text-generation")
    layers: Any = nn_model
    for part in decoder_layer_path(causal_lm).split("."):
        layers = getattr(layers, part)
    return nn_model, layers


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], device: torch.device) -> BatchEncoding:
    """Left-padded batch of already chat-templated strings (the template carries its own BOS)."""
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return encoded.to(device)


def add_steering(layers: Any, injection: dict[int, torch.Tensor]) -> None:
    """Inside a trace: add each layer's delta to that block's output (layers ascending = execution order)."""
    for layer in sorted(injection):
        layers[layer].output[:] += injection[layer]


def check_fits(vector: SteeringVector, model: nn.Module) -> None:
    """A vector read from another model (other depth or width, or band layers past the end) is a user error."""
    n_layers = len(decoder_layers(model))
    d_model = unwrap_peft(model)[0].get_input_embeddings().embedding_dim
    shape = tuple(vector.directions.shape)
    if shape != (n_layers, d_model) or any(not 0 <= layer < n_layers for layer in vector.layers):
        raise DataError(
            f"steering vector from {vector.model or 'an unknown model'} ({shape[0]} layers x d={shape[1]}, band "
            f"layers {list(vector.layers)}) does not fit this model ({n_layers} layers x d={d_model})"
        )


def _to_model(injection: dict[int, torch.Tensor], model: nn.Module) -> dict[int, torch.Tensor]:
    param = next(model.parameters())
    return {layer: delta.to(device=param.device, dtype=param.dtype) for layer, delta in injection.items()}


# ---------------------------------------------------------------- extraction


def last_token_states(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    batch_size: int,
    desc: str = "read",
    remote: Remote = False,
) -> torch.Tensor:
    """Residual stream (every decoder block's output) at each prompt's last token: [n_prompts, n_layers, d]."""
    nn_model, layers = wrap(model, tokenizer)
    n_layers = len(decoder_layers(model))
    device = next(model.parameters()).device
    rows: list[torch.Tensor] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        batch = tokenize_prompts(tokenizer, prompts[start : start + batch_size], device)
        with torch.inference_mode(), nn_model.trace(dict(batch), **_remote_kwargs(remote)):
            states = nnsight.save([layers[layer].output[:, -1, :] for layer in range(n_layers)])
        rows.append(torch.stack([s.float().cpu() for s in states], dim=1))
    return torch.cat(rows, dim=0)


def extract_steering_vector(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pair: PersonaPair,
    contexts: list[str],
    band: tuple[float, float],
    batch_size: int = 16,
    model_name: str = "",
    remote: Remote = False,
) -> SteeringVector:
    """mean(h | pos persona) - mean(h | neg persona) at the assistant tag, per layer, over `contexts`."""
    pos_prompts, neg_prompts = (render_prompts(tokenizer, contexts, persona) for persona in (pair.pos, pair.neg))
    pos_states = last_token_states(model, tokenizer, pos_prompts, batch_size, "pos", remote)
    neg_states = last_token_states(model, tokenizer, neg_prompts, batch_size, "neg", remote)
    both = torch.cat([pos_states, neg_states], dim=0)
    n_layers = pos_states.shape[1]
    return SteeringVector(
        directions=pos_states.mean(0) - neg_states.mean(0),
        resid_norms=both.norm(dim=-1).mean(0),
        layers=tuple(band_to_layers(band, n_layers)),
        band=band,
        model=model_name,
        axis=pair.axis,
        n_contexts=len(contexts),
    )


# ---------------------------------------------------------------- injection


def steered_logits(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    inputs: dict[str, torch.Tensor],
    vector: SteeringVector | None,
    coeff: float | list[float],
    remote: Remote = False,
    **forward_kwargs: object,
) -> torch.Tensor:
    """Logits of one forward with coeff * v added to every band layer's output at every position of `inputs`;
    `coeff` is one coefficient for the batch or one per row.

    `forward_kwargs` go to the model's forward: `logits_to_keep=k` (logits of the last k positions only), or
    `past_key_values` (then only the new positions are steered: the cached ones were when they were computed).
    """
    nn_model, layers = wrap(model, tokenizer)
    if vector is not None:
        check_fits(vector, model)
    injection = _injection(model, vector, coeff)
    with nn_model.trace(inputs, **_remote_kwargs(remote), **forward_kwargs):
        add_steering(layers, injection)
        logits = nn_model.lm_head.output.save()
    return logits


def steered_final_hidden(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    inputs: dict[str, torch.Tensor],
    vector: SteeringVector | None,
    coeff: float | list[float],
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """The final norm's output (the unembedding's input) of one steered forward, [B, T, d]: the caller unembeds
    the positions it needs a chunk at a time instead of holding [B, T, vocab] logits (Gemma: 262k per position).
    `positions` ([B, T] bool) steers only those positions, e.g. the completion tokens of a `generated_only` run."""
    nn_model, layers = wrap(model, tokenizer)
    norm = _final_norm_envoy(nn_model, model)
    injection = _injection(model, vector, coeff)
    if positions is not None:
        mask = positions[..., None].to(next(model.parameters()).dtype)  # [B, T, 1]
        injection = {layer: delta * mask for layer, delta in injection.items()}
    with nn_model.trace(inputs, logits_to_keep=1):
        add_steering(layers, injection)
        hidden = norm.output.save()
    return hidden


def steered_states(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    inputs: dict[str, torch.Tensor],
    vector: SteeringVector | None,
    coeff: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `steered_final_hidden` ([B, T, d], no [B, T, vocab] logits), plus every decoder block's output after
    any injection: [n_layers, B, T, d]."""
    nn_model, layers = wrap(model, tokenizer)
    norm = _final_norm_envoy(nn_model, model)
    injection = _injection(model, vector, coeff)
    n_layers = len(decoder_layers(model))
    with nn_model.trace(inputs, logits_to_keep=1):
        states = nnsight.save([])
        for layer in range(n_layers):
            if layer in injection:
                layers[layer].output[:] += injection[layer]
            states.append(layers[layer].output.clone())
        hidden = norm.output.save()
    return hidden, torch.stack(list(states))


def _final_norm_envoy(nn_model: Any, model: nn.Module) -> Any:
    """The nnsight envoy of the model's final norm (the unembedding's input), found by module identity so that
    peft-wrapped and plain models resolve alike."""
    causal_lm, _ = unwrap_peft(model)
    norm_name = next(name for name, module in causal_lm.named_modules() if module is final_norm(causal_lm))
    norm: Any = nn_model
    for part in norm_name.split("."):
        norm = getattr(norm, part)
    return norm


def _injection(model: nn.Module, vector: SteeringVector | None, coeff: float | list[float]) -> dict[int, torch.Tensor]:
    """Per band layer, the delta to add ([B, 1, d] for per-row coefficients); empty when nothing is steered
    (no vector, or only zero coefficients)."""
    row_coeffs = coeff if isinstance(coeff, list) else [coeff]
    if vector is None or not any(row_coeffs):
        return {}
    check_fits(vector, model)
    if isinstance(coeff, list):
        per_row = torch.tensor(coeff)[:, None, None]  # [B, 1, 1]: broadcasts over positions and features
        return _to_model({layer: per_row * delta for layer, delta in vector.injection(1.0).items()}, model)
    return _to_model(vector.injection(coeff), model)


def steered_generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    inputs: dict[str, torch.Tensor],
    vector: SteeringVector | None,
    coeff: float | list[float],
    generated_only: bool = False,
    remote: Remote = False,
    **generate_kwargs: object,
) -> Any:
    """`generate` with coeff * v added at the band layers: prompt and generated tokens, or generated only.

    `coeff` is one coefficient for the batch or one per row, so several doses share one batch. Returns the
    full sequences (prompt + new tokens), as `model.generate` does. With no vector or only zero coefficients
    this is plain `generate` (no trace), so its output is exactly HF's (the sequences tensor, or the output
    object with its KV cache when `return_dict_in_generate=True`); run remotely it is an unsteered trace.
    """
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    injection = _injection(model, vector, coeff)
    if not injection and not remote:
        with torch.inference_mode():
            return model.generate(**inputs, **generate_kwargs)
    nn_model, layers = wrap(model, tokenizer)
    # Step 0 runs the whole prompt; each later step is one generated token. Code after the step loop never
    # runs inside its invoke, so the result is read in a second, empty invoke.
    with warnings.catch_warnings():
        # An open step loop always ends with nnsight's "was never reached" warning; it is expected here.
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with torch.inference_mode(), nn_model.generate(**_remote_kwargs(remote), **generate_kwargs) as tracer:
            with tracer.invoke(inputs):
                if injection:  # (an unsteered remote run) a step loop that touches no module would never end
                    for _ in tracer.iter[1:] if generated_only else tracer.all():
                        add_steering(layers, injection)
            with tracer.invoke():
                sequences = tracer.result.save()
    return sequences
