"""A round's training data: the dose controller, steered (or persona-prompted) batches, never starved data.

The dose controller ("walk-C") finds the largest multiplier kappa of the configured coefficients whose probe
batch keep-rate (or mean KL to the base, `filter.kl_target`) passes, then collects batches at that dose until
`filter.n_keep` completions are kept. Fewer than `filter.min_train` kept raises StarvedDataError: the caller
must not train.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from interp_heal.config import FilterConfig, GenerateConfig
from interp_heal.errors import DataError, InterpHealError
from interp_heal.filter import ScoredCompletion, dose_keep_rate, filter_completions, summarise
from interp_heal.generate import Completion, generate_completions
from interp_heal.io import jsonl_records, write_json, write_jsonl
from interp_heal.personas import PersonaPair, render_prompts
from interp_heal.sequences import base_model, hidden_kl, pad_left, scored_hidden
from interp_heal.steer import SteeringVector, steered_final_hidden


class StarvedDataError(InterpHealError):
    """Too few completions survived the filter to train on; carries the collection for the record."""

    def __init__(self, message: str, collection: Collection | None) -> None:
        super().__init__(message)
        self.collection = collection


@dataclass(frozen=True)
class DoseSearch:
    kappa: float
    passed: bool  # False: not even kappa_min met the target; kappa is then the bracket edge kappa_min
    probes: list[tuple[float, float]]  # (kappa, measured value) in probe order


def bisect_dose(
    measure: Callable[[float], float], passes: Callable[[float], bool], kappa_min: float, steps: int
) -> DoseSearch:
    """Largest kappa in [kappa_min, 1] whose measurement passes, assuming passing is monotone in kappa.

    Probes 1 first (full dose), then kappa_min; if neither end decides, bisects `steps` times and returns
    the largest passing kappa seen. If kappa_min fails too, stops there with passed=False.
    """
    probes: list[tuple[float, float]] = []

    def probe(kappa: float) -> bool:
        value = measure(kappa)
        probes.append((kappa, value))
        return passes(value)

    if probe(1.0):
        return DoseSearch(1.0, True, probes)
    if not probe(kappa_min):
        return DoseSearch(kappa_min, False, probes)
    low, high = kappa_min, 1.0
    for _ in range(steps):
        middle = (low + high) / 2
        if probe(middle):
            low = middle
        else:
            high = middle
    return DoseSearch(low, True, probes)


@dataclass
class Collection:
    """Everything generated for one round: all scored completions, the dose search and the chosen kappa."""

    records: list[ScoredCompletion]
    dose: DoseSearch
    coeffs: list[float]

    @property
    def at_dose(self) -> list[ScoredCompletion]:
        return [record for record in self.records if record.kappa == self.dose.kappa]

    @property
    def kept(self) -> list[ScoredCompletion]:
        """Training data: the kept completions generated at the chosen dose."""
        return [record for record in self.at_dose if record.kept]

    def write(self, completions_path: Path, summary_path: Path | None = None, **summary_extra: object) -> None:
        """Every scored completion as JSONL and (optionally) the summary as JSON, both atomically."""
        write_jsonl(completions_path, (record.as_dict() for record in self.records))
        if summary_path is not None:
            write_json(summary_path, {**self.summary(), **summary_extra})

    def summary(self) -> dict[str, object]:
        return {
            **summarise(self.records),
            "kept_at_dose": len(self.kept),
            "kappa": self.dose.kappa,
            "dose_passed": self.dose.passed,
            "probes": self.dose.probes,
            "coeffs": [self.dose.kappa * coeff for coeff in self.coeffs],
        }


def mean_steered_kl(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, completions: list[Completion], vector: SteeringVector
) -> float:
    """Mean per-token KL(steered || base) over the completions' tokens, each at its own coefficient."""
    prompt_ids = tokenizer(render_prompts(tokenizer, [c.prompt for c in completions]), add_special_tokens=False)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for coeff in sorted({c.coeff for c in completions}):
        rows = [i for i, c in enumerate(completions) if c.coeff == coeff]
        batch = pad_left(
            [prompt_ids["input_ids"][i] for i in rows],
            [completions[i].token_ids for i in rows],
            tokenizer.pad_token_id,
            device,
        )
        with torch.inference_mode():
            steered = batch.at_targets(steered_final_hidden(model, tokenizer, batch.model_inputs(), vector, coeff))
            with base_model(model) as base:
                reference = scored_hidden(base, batch)
            kl = hidden_kl(model, steered, reference)
        total, count = total + float(kl.sum()), count + kl.numel()
    return total / max(count, 1)


def _sample_prompts(pool: list[str], n: int, seed: int) -> list[str]:
    return random.Random(seed).sample(pool, min(n, len(pool)))


def collect_kept_completions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    vector: SteeringVector,
    pair: PersonaPair,
    task_pool: list[str],
    coeffs: list[float],
    generate_config: GenerateConfig,
    filter_config: FilterConfig,
    seed: int,
    generated_only: bool = False,
) -> Collection:
    """Dose search on probe batches, then batches at the chosen dose until `n_keep` are kept.

    Probe batches at the chosen dose count towards the kept set. Raises StarvedDataError when fewer than
    `min_train` completions are kept in the end; the caller must not train in that case.
    """
    batches: dict[float, list[ScoredCompletion]] = {}
    batch_counter = iter(range(10**9))

    def run_batch(kappa: float) -> list[ScoredCompletion]:
        batch = next(batch_counter)
        prompts = _sample_prompts(task_pool, generate_config.n_prompts, seed + 1000 * batch)
        scaled = [kappa * coeff for coeff in coeffs]
        completions = generate_completions(
            model, tokenizer, prompts, vector, scaled, generate_config, seed + 1000 * batch, generated_only
        )
        records = filter_completions(
            model, tokenizer, completions, pair, filter_config, kappa, batch, seed + 1000 * batch
        )
        batches.setdefault(kappa, []).extend(records)
        logger.info(f"batch {batch}: kappa={kappa:.3f} keep-rate {summarise(records)['keep_rate']:.2f}")
        return records

    if filter_config.kl_target is None:
        dose = bisect_dose(
            measure=lambda kappa: dose_keep_rate(run_batch(kappa), filter_config.dose_ignores),
            passes=lambda keep_rate: keep_rate >= filter_config.keep_target,
            kappa_min=filter_config.kappa_min,
            steps=filter_config.bisect_steps,
        )
    else:
        kl_target = filter_config.kl_target
        dose = bisect_dose(
            measure=lambda kappa: mean_steered_kl(model, tokenizer, [r.completion for r in run_batch(kappa)], vector),
            passes=lambda kl: kl <= kl_target,
            kappa_min=filter_config.kappa_min,
            steps=filter_config.bisect_steps,
        )
    n_at_dose = 1 if dose.kappa in batches else 0
    with tqdm(total=filter_config.n_keep, desc="kept", leave=False) as progress:
        progress.update(sum(record.kept for record in batches.get(dose.kappa, [])))
        while progress.n < filter_config.n_keep and n_at_dose < filter_config.max_batches:
            progress.update(sum(record.kept for record in run_batch(dose.kappa)))
            n_at_dose += 1
    collection = Collection([r for rows in batches.values() for r in rows], dose, coeffs)
    check_not_starved(collection, filter_config.min_train)
    return collection


# Prompt distillation has no dose: its records carry this kappa, so `Collection.kept` (the records "at the
# chosen dose") is every kept record.
NO_DOSE = 1.0


def collect_prompted_completions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pair: PersonaPair,
    task_pool: list[str],
    samples_per_prompt: int,
    generate_config: GenerateConfig,
    filter_config: FilterConfig,
    seed: int,
) -> Collection:
    """Prompt distillation's data: the student sampled with the pos persona as its system prompt (no vector),
    filtered exactly as steered data is (scored under the base, without the persona: the training format),
    batch after batch until `n_keep` are kept or `max_batches` ran. `samples_per_prompt` matches a steered
    batch's rows (one per coefficient), so both sources spend the same generation per batch."""
    records: list[ScoredCompletion] = []
    for batch in range(filter_config.max_batches):
        batch_seed = seed + 1000 * batch
        prompts = _sample_prompts(task_pool, generate_config.n_prompts, batch_seed)
        completions = generate_completions(
            model, tokenizer, prompts, None, [0.0] * samples_per_prompt, generate_config, batch_seed, persona=pair.pos
        )
        batch_records = filter_completions(
            model, tokenizer, completions, pair, filter_config, NO_DOSE, batch, batch_seed
        )
        records += batch_records
        logger.info(f"batch {batch}: persona-prompted, keep-rate {summarise(batch_records)['keep_rate']:.2f}")
        if sum(record.kept for record in records) >= filter_config.n_keep:
            break
    collection = Collection(records, DoseSearch(NO_DOSE, True, []), [0.0])
    check_not_starved(collection, filter_config.min_train)
    return collection


def read_kept_completions(completions_path: Path, kappa: float) -> list[Completion]:
    """The training set of a written collection: the kept completions generated at dose `kappa`."""
    kept = []
    for number, row in jsonl_records(completions_path, "completions file"):
        missing = [key for key in ("kept", "kappa", *Completion.__dataclass_fields__) if key not in row]
        if missing:
            raise DataError(f"{completions_path} line {number}: no {missing} (write it with `collect`)")
        if row["kept"] and row["kappa"] == kappa:
            kept.append(Completion.from_record(row))
    return kept


def check_not_starved(collection: Collection, min_train: int) -> None:
    if len(collection.kept) >= min_train:
        return
    summary = summarise(collection.at_dose)
    raise StarvedDataError(
        f"only {len(collection.kept)} completions kept (need min_train={min_train}); nothing will be trained. "
        f"Dose kappa={collection.dose.kappa:.3f} (passed={collection.dose.passed}, probes={collection.dose.probes}) "
        f"on coeffs {collection.coeffs}; at that dose {summary['kept']}/{summary['generated']} kept, drop reasons "
        f"{summary['drop_reasons']}. Lower the coefficients, loosen filter thresholds or raise filter.max_batches.",
        collection,
    )
