"""Single-stage jobs behind the CLI: `steer` (vector + greedy samples), `collect` (dose-controlled
generation + filter) and `heal` (one adapter from a collect folder). The loop composes the same library
calls round after round."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from interp_heal.bake import bake
from interp_heal.config import Config, PersonaConfig, save_config
from interp_heal.errors import DataError
from interp_heal.evaluate import evaluate, write_eval
from interp_heal.filter import Collection, StarvedDataError, collect_kept_completions, read_kept_completions
from interp_heal.generate import Completion, generate_completions, write_completions
from interp_heal.heal import HealResult, heal
from interp_heal.mfv import Steering
from interp_heal.models import load_model
from interp_heal.parallel import data_parallel
from interp_heal.personas import context_prompts, persona_pair, task_prompts
from interp_heal.steer import SteeringVector, extract_steering_vector


@dataclass(frozen=True)
class SteerResult:
    vector: SteeringVector
    vector_path: Path
    samples: list[Completion]
    samples_path: Path


def _load_and_extract(config: Config, out: Path):
    pair = persona_pair(config.persona)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    if config.model.threads is not None:
        torch.set_num_threads(config.model.threads)
    model, tokenizer, info = load_model(config.model.spec, dtype=config.model.dtype, device=config.model.device)
    logger.info(f"model {info.name}: {info.n_layers} layers, d={info.d_model}, {info.dtype} on {info.device}")
    contexts = context_prompts(config.steer.n_contexts, seed=config.seed)
    vector = extract_steering_vector(
        model, tokenizer, pair, contexts, config.steer.band, config.steer.batch_size, model_name=info.name
    )
    vector.save(out / "vector.safetensors")
    norms = ", ".join(f"L{layer}: {float(vector.layer_norms[layer]):.2f}" for layer in vector.layers)
    logger.info(f"axis {pair.axis}: band {config.steer.band} -> layers {list(vector.layers)}; |v| {norms}")
    return model, tokenizer, pair, vector


def run_steer(config: Config, out: Path, n_samples: int = 4) -> SteerResult:
    model, tokenizer, _, vector = _load_and_extract(config, out)
    greedy = config.generate.model_copy(update={"temperature": 0.0})
    samples = generate_completions(
        model,
        tokenizer,
        task_prompts(n_samples),
        vector,
        [0.0, *config.steer.coeffs],
        greedy,
        seed=config.seed,
        generated_only=config.steer.generated_only,
    )
    samples_path = out / "samples.jsonl"
    write_completions(samples_path, samples)
    return SteerResult(vector, out / "vector.safetensors", samples, samples_path)


def kept_completions(collect_dir: Path) -> list[Completion]:
    """The training set a `collect` folder chose: kept completions at the dose in its summary.json."""
    summary_path, rows_path = collect_dir / "summary.json", collect_dir / "completions.jsonl"
    if not summary_path.is_file() or not rows_path.is_file():
        raise DataError(f"{collect_dir} is not a collect folder (needs summary.json and completions.jsonl)")
    return read_kept_completions(rows_path, json.loads(summary_path.read_text())["kappa"])


def run_heal(config: Config, collect_dir: Path, out: Path, round_index: int = 0) -> HealResult:
    """Train one round's adapter on a collect folder's kept completions, on top of the base model."""
    completions = kept_completions(collect_dir)
    if len(completions) < config.filter.min_train:
        raise StarvedDataError(
            f"{collect_dir} holds {len(completions)} kept completions, fewer than min_train={config.filter.min_train}",
            None,
        )
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    parallel = data_parallel()  # several processes only under `accelerate launch` / `torchrun`
    device = parallel.device or config.model.device
    model, tokenizer, _ = load_model(config.model.spec, dtype=config.model.dtype, device=device)
    return heal(model, tokenizer, completions, config.heal, round_index, out, seed=config.seed, parallel=parallel)


def run_eval(
    config: Config,
    out: Path,
    adapters: list[Path] | None = None,
    vector_path: Path | None = None,
    coeff: float = 0.0,
    persona_axis: str | None = None,
    persona_side: str = "pos",
) -> dict[str, object]:
    """Evaluate base / baked student / steered / persona-prompted; write OUT.json and OUT.rows.jsonl."""
    model, tokenizer, info = load_model(config.model.spec, dtype=config.model.dtype, device=config.model.device)
    model = bake(model, list(adapters or []))
    steering = Steering(SteeringVector.load(vector_path), coeff) if vector_path is not None else Steering()
    persona = None
    if persona_axis is not None:
        pair = persona_pair(PersonaConfig(axis=persona_axis))
        persona = pair.pos if persona_side == "pos" else pair.neg
    result = evaluate(model, tokenizer, persona_pair(config.persona).axis, config.eval, steering, persona, config.seed)
    result["mode"] = {
        "model": info.name,
        "adapters": [str(a) for a in adapters or []],
        "vector": str(vector_path) if vector_path else None,
        "coeff": coeff,
        "persona": persona,
    }
    write_eval(result, out)
    return result


def run_collect(config: Config, out: Path) -> Collection:
    """Vector, then dose-controlled steered sampling + filter: completions.jsonl (all) and summary.json.

    The completions are written before the starved-data check, so a starved run still leaves its evidence.
    """
    model, tokenizer, pair, vector = _load_and_extract(config, out)
    try:
        collection = collect_kept_completions(
            model,
            tokenizer,
            vector,
            pair,
            task_prompts(),
            config.steer.coeffs,
            config.generate,
            config.filter,
            seed=config.seed,
            generated_only=config.steer.generated_only,
        )
    except StarvedDataError as err:
        if err.collection is not None:
            err.collection.write(out / "completions.jsonl", out / "summary.json")
        raise
    collection.write(out / "completions.jsonl", out / "summary.json")
    return collection
