"""Single-stage jobs behind the CLI: `steer` (vector + greedy samples), `collect` (dose-controlled
generation + filter) and `heal` (one adapter from a collect folder). The loop composes the same library
calls round after round."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from transformers import PreTrainedTokenizerBase

from interp_heal.axis_check import AxisCheck, check_axis
from interp_heal.bake import bake
from interp_heal.collect import Collection, StarvedDataError, collect_kept_completions, read_kept_completions
from interp_heal.config import Config, PersonaConfig, save_config
from interp_heal.errors import DataError
from interp_heal.evaluate import check_eval_inputs, evaluate, write_eval
from interp_heal.generate import Completion, generate_completions, write_completions
from interp_heal.heal import HealResult, TeacherRows, heal
from interp_heal.io import check_writable, read_json, write_json
from interp_heal.models import load_configured_model
from interp_heal.own_replies import own_reply_readouts
from interp_heal.pair_drafting import DraftedItem, default_scenarios, draft_pairs, write_draft
from interp_heal.paired_items import readout_items
from interp_heal.parallel import data_parallel
from interp_heal.personas import context_prompts, persona_pair, task_prompts
from interp_heal.steer import Steering, SteeringVector, check_fits, extract_steering_vector
from interp_heal.teacher import teacher_topk


@dataclass(frozen=True)
class SteerResult:
    vector: SteeringVector
    vector_path: Path
    samples: list[Completion]
    samples_path: Path


def _load_and_extract(config: Config, out: Path):
    pair = persona_pair(config.persona)
    check_writable(out, config.output.min_free_mb)
    save_config(config, out / "config.yaml")
    if config.model.threads is not None:
        torch.set_num_threads(config.model.threads)
    model, tokenizer, info = load_configured_model(config.model)
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
    summary = read_json(summary_path, "collect summary")
    if not isinstance(summary, dict) or not isinstance(summary.get("kappa"), int | float):
        raise DataError(f"{summary_path}: no number 'kappa' (the dose of the kept completions); rerun collect")
    return read_kept_completions(rows_path, summary["kappa"])


def run_heal(config: Config, collect_dir: Path, out: Path, round_index: int = 0) -> HealResult:
    """Train one round's adapter on a collect folder's kept completions, on top of the base model."""
    completions = kept_completions(collect_dir)
    if len(completions) < config.filter.min_train:
        raise StarvedDataError(
            f"{collect_dir} holds {len(completions)} kept completions, fewer than min_train={config.filter.min_train}",
            None,
        )
    check_writable(out, config.output.min_free_mb)
    save_config(config, out / "config.yaml")
    parallel = data_parallel()  # several processes only under `accelerate launch` / `torchrun`
    device = parallel.device or config.model.device
    model, tokenizer, _ = load_configured_model(config.model, device)
    teacher = _collect_teacher(config, collect_dir, out, model, tokenizer, completions)
    return heal(
        model, tokenizer, completions, config.heal, round_index, out, seed=config.seed, parallel=parallel,
        teacher=teacher,
    )  # fmt: skip


def _collect_teacher(
    config: Config,
    collect_dir: Path,
    out: Path,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    completions: list[Completion],
) -> list[TeacherRows] | None:
    """heal.target=logits: the top-K of the teacher that sampled a collect folder, the base steered by its
    vector at each completion's dose, stored in `out` (reused there while its key matches)."""
    if config.heal.target != "logits":
        return None
    vector_path = collect_dir / "vector.safetensors"
    if not vector_path.is_file():
        raise DataError(f"{collect_dir}: no vector.safetensors; heal.target=logits steers the teacher with it")
    vector = SteeringVector.load(vector_path)
    check_fits(vector, model)
    path = out / "teacher_topk.safetensors"
    topk = teacher_topk(path, model, tokenizer, completions, config.heal, vector, None, config.steer.generated_only)
    return topk.per_completion()


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
    # Every input is read before the model loads: a typo costs a second, not an evaluation.
    readout = readout_items(config.persona)
    persona = None
    if persona_axis is not None:
        pair = persona_pair(PersonaConfig(axis=persona_axis))
        persona = pair.pos if persona_side == "pos" else pair.neg
    check_eval_inputs(config.eval)
    steering = Steering(SteeringVector.load(vector_path), coeff) if vector_path is not None else Steering()
    check_writable(out.parent, config.output.min_free_mb)
    model, tokenizer, info = load_configured_model(config.model)
    model = bake(model, list(adapters or []))
    if steering.vector is not None:
        try:
            check_fits(steering.vector, model)
        except DataError as err:
            raise DataError(f"{vector_path}: {err}") from None
    result = evaluate(model, tokenizer, readout, config.eval, steering, persona, config.seed)
    if config.eval.adherence:  # the state's own replies: task adherence and generation coherence
        result |= own_reply_readouts(model, tokenizer, config, persona_pair(config.persona), steering, persona)
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


def run_check_axis(config: Config, out: Path) -> AxisCheck:
    """check-axis on the config's base model: the verdict, written to OUT (JSON)."""
    pair, readout = persona_pair(config.persona), readout_items(config.persona)
    check_writable(out.parent, config.output.min_free_mb)
    model, tokenizer, info = load_configured_model(config.model)
    check = check_axis(model, tokenizer, pair, readout, config, info.name)
    write_json(out, check.as_dict())
    return check


def read_scenarios(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"scenarios file not found: {path} (one scenario a line)")
    scenarios = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not scenarios:
        raise DataError(f"{path}: no scenarios (one scenario a line)")
    return scenarios


def run_pairs(
    config: Config, out: Path, scenarios_path: Path | None, n: int | None, n_samples: int
) -> tuple[list[DraftedItem], list[str], Path]:
    """Draft paired items for the config's persona pair; (items, skipped scenarios, preview path)."""
    pair = persona_pair(config.persona)
    scenarios = read_scenarios(scenarios_path) if scenarios_path is not None else default_scenarios()
    scenarios = scenarios[:n] if n is not None else scenarios
    check_writable(out.parent, config.output.min_free_mb)
    model, tokenizer, _ = load_configured_model(config.model)
    drafted, skipped = draft_pairs(
        model, tokenizer, pair, scenarios, config.generate, config.filter, n_samples, config.seed
    )
    if not drafted:
        raise DataError(f"no scenario kept a reply on both sides ({len(skipped)} skipped): loosen the filter")
    return drafted, skipped, write_draft(out, pair, drafted, skipped)
