"""`python cli.py steer`: extract a vector from a config and write greedy samples at each coefficient."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from interp_heal.config import Config, save_config
from interp_heal.generate import Completion, generate_completions, write_completions
from interp_heal.models import load_model
from interp_heal.personas import context_prompts, persona_pair, task_prompts
from interp_heal.steer import SteeringVector, extract_steering_vector


@dataclass(frozen=True)
class SteerResult:
    vector: SteeringVector
    vector_path: Path
    samples: list[Completion]
    samples_path: Path


def run_steer(config: Config, out: Path, n_samples: int = 4) -> SteerResult:
    pair = persona_pair(config.persona)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    model, tokenizer, info = load_model(config.model.spec, dtype=config.model.dtype, device=config.model.device)
    logger.info(f"model {info.name}: {info.n_layers} layers, d={info.d_model}, {info.dtype} on {info.device}")
    contexts = context_prompts(config.steer.n_contexts, seed=config.seed)
    vector = extract_steering_vector(
        model, tokenizer, pair, contexts, config.steer.band, config.steer.batch_size, model_name=info.name
    )
    vector_path = out / "vector.safetensors"
    vector.save(vector_path)
    norms = ", ".join(f"L{layer}: {float(vector.layer_norms[layer]):.2f}" for layer in vector.layers)
    logger.info(f"axis {pair.axis}: band {config.steer.band} -> layers {list(vector.layers)}; |v| {norms}")
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
    return SteerResult(vector, vector_path, samples, samples_path)
