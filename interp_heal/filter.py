"""Keep only coherent steered completions that enact the trait; control the dose; never train on starved data.

Every completion gets scores (base-model NLL, tail perplexity, repetition, compression, distinct tokens,
refusal and narration matches) and a list of drop reasons; it is kept when that list is empty. The dose
controller ("walk-C") finds the largest multiplier kappa of the configured coefficients whose probe batch
keep-rate reaches the target, then collects batches at that dose.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from loguru import logger
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from interp_heal.config import FilterConfig, GenerateConfig
from interp_heal.errors import DataError, InterpHealError
from interp_heal.generate import Completion, generate_completions
from interp_heal.io import jsonl_records, write_json, write_jsonl
from interp_heal.personas import PersonaPair, render_prompts
from interp_heal.sequences import base_model, continuation_logprobs, pad_left, token_kl
from interp_heal.steer import SteeringVector, steered_logits

TAIL_FRACTION = 0.25
_WORD = re.compile(r"[a-z0-9']+")


class StarvedDataError(InterpHealError):
    """Too few completions survived the filter to train on; carries the collection for the record."""

    def __init__(self, message: str, collection: Collection | None) -> None:
        super().__init__(message)
        self.collection = collection


# ---------------------------------------------------------------- text scores


def _ngram_repeat_fraction(items: list[str], n: int) -> float:
    grams = [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _periodic_char_fraction(text: str, period: int, min_repeats: int = 3) -> float:
    """Share of characters inside runs where a `period`-char unit repeats at least `min_repeats` times."""
    covered = 0
    run = 0  # consecutive positions i with text[i] == text[i - period]
    for i in range(period, len(text) + 1):
        if i < len(text) and text[i] == text[i - period]:
            run += 1
            continue
        if run >= period * (min_repeats - 1):
            covered += run + period
        run = 0
    return covered / len(text) if text else 0.0


def repetition_fraction(text: str) -> float:
    """Largest repeated share over word n-grams and character loops, n = 2..4 (0 = no repeats).

    Word n-grams: 1 - distinct/total n-grams of lower-cased words. Characters: the share of the text inside
    runs of a 2-4 character unit repeated at least 3 times ("hahaha", "!?!?!?"), since every English text
    repeats plain character bigrams. A looping completion scores well above 0.3; fluent prose near 0.
    """
    words = _WORD.findall(text.lower())
    word_scores = [_ngram_repeat_fraction(words, n) for n in (2, 3, 4)]
    char_scores = [_periodic_char_fraction(text, period) for period in (1, 2, 3, 4)]
    return max(word_scores + char_scores)


def compression_ratio(text: str) -> float:
    """zlib-compressed size / raw size: loops and soup compress far better than prose."""
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 9)) / len(raw) if raw else 0.0


def distinct_token_ratio(token_ids: list[int]) -> float:
    return len(set(token_ids)) / len(token_ids) if token_ids else 0.0


def _normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.lower().replace("\u2019", "'")))


def matched_phrases(text: str, phrases: list[str]) -> list[str]:
    normalised = f" {_normalise(text)} "
    return [phrase for phrase in phrases if f" {_normalise(phrase)} " in normalised]


_STOPWORD_TEXT = """a an and are as at be but by for from has have i in is it its me my of on or our so that the their
them they this to was we were what when which who with you your yours i'm am someone"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def _content_stems(text: str) -> list[str]:
    """Lower-cased words minus stopwords, with a crude suffix strip so "feels" and "feel" match."""
    stems = []
    for word in _normalise(text).split():
        if word in _STOPWORDS:
            continue
        for suffix in ("ing", "ity", "ed", "es", "s", "ly"):
            if word.endswith(suffix) and len(word) - len(suffix) >= 3:
                word = word[: -len(suffix)]
                break
        stems.append(word)
    return stems


def persona_overlap(text: str, persona: str) -> float:
    """Share of the persona's content-word bigrams that the completion repeats (restating the persona).

    Enacting a trait shares a word or two with its persona ("I love humanity" shares one bigram of the love
    persona); narrating it restates the persona phrase by phrase.
    """
    persona_stems, text_stems = _content_stems(persona), _content_stems(text)
    persona_grams = set(itertools.pairwise(persona_stems))
    text_grams = set(itertools.pairwise(text_stems))
    return len(persona_grams & text_grams) / len(persona_grams) if persona_grams else 0.0


# ---------------------------------------------------------------- scores under the base model


@dataclass(frozen=True)
class CompletionScores:
    n_tokens: int
    nll_mean: float
    tail_ppl: float
    max_token_nll: float
    repetition: float
    compression: float
    distinct_tokens: float
    persona_overlap: float
    refusals: list[str] = field(default_factory=list)
    narrations: list[str] = field(default_factory=list)
    adherence: float | None = None  # own-vs-other prompt PMI (nats/token); None when filter.min_adherence is off


def _nll_summary(token_nlls: torch.Tensor) -> tuple[float, float, float]:
    if token_nlls.numel() == 0:
        return math.nan, math.nan, math.nan
    tail = token_nlls[-max(1, math.ceil(TAIL_FRACTION * token_nlls.numel())) :]
    return float(token_nlls.mean()), float(tail.mean().exp()), float(token_nlls.max())


def base_token_nlls(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    completions: list[Completion],
    batch_size: int = 16,
    prompts: list[str] | None = None,
) -> list[torch.Tensor]:
    """Per-token NLL of each completion's tokens under the base model (no adapter, no steering hook), after its
    own prompt or, when given, after `prompts[i]` instead."""
    users = prompts if prompts is not None else [c.prompt for c in completions]
    prompt_ids = tokenizer(render_prompts(tokenizer, users), add_special_tokens=False)
    device = next(model.parameters()).device
    nlls: list[torch.Tensor] = []
    for start in range(0, len(completions), batch_size):
        chunk = completions[start : start + batch_size]
        prompts = prompt_ids["input_ids"][start : start + batch_size]
        batch = pad_left(prompts, [c.token_ids for c in chunk], tokenizer.pad_token_id, device)
        with torch.inference_mode(), base_model(model) as base:
            logits = base(**batch.scored_inputs()).logits
        nlls.extend((-row).cpu() for row in continuation_logprobs(logits, batch))
    return nlls


def other_prompts(prompts: list[str], seed: int) -> list[str]:
    """For each item, a different prompt of the same list: the distinct prompts in a seeded derangement (a
    permutation that moves every one), so each prompt stands in as "another prompt" for exactly one other.

    Being a permutation matters: a reply that ignores its prompt then scores exactly 0 on average (every
    prompt's log p is added once and subtracted once), where "a random other prompt" would only be 0 in
    expectation."""
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) < 2:
        raise ValueError("another prompt needs at least two distinct prompts")
    rng = random.Random(seed)
    order = list(range(len(distinct)))
    while any(i == j for i, j in enumerate(order)):  # rejection sampling: uniform over derangements, ~e tries
        rng.shuffle(order)
    other = {prompt: distinct[j] for prompt, j in zip(distinct, order, strict=True)}
    return [other[prompt] for prompt in prompts]


def prompt_pmi(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    completions: list[Completion],
    others: list[str],
    own_nlls: list[torch.Tensor] | None = None,
    batch_size: int = 16,
) -> list[float]:
    """Per completion, under the base: mean over its tokens of log p(token | own prompt) - log p(token | the
    other prompt `others[i]`), in nats/token (pointwise mutual information between reply and prompt). A reply
    that ignores its prompt scores ~0; one that answers it, > 0; one written for another prompt, < 0. NaN for
    a completion without tokens. `own_nlls`: the base NLLs after the own prompt, when already computed."""
    own = own_nlls if own_nlls is not None else base_token_nlls(model, tokenizer, completions, batch_size)
    other = base_token_nlls(model, tokenizer, completions, batch_size, prompts=others)
    return [float((o - s).mean()) if s.numel() else math.nan for s, o in zip(own, other, strict=True)]


def score_completions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    completions: list[Completion],
    pair: PersonaPair,
    config: FilterConfig,
    batch_size: int = 16,
    seed: int = 0,
    own_nlls: list[torch.Tensor] | None = None,
) -> list[CompletionScores]:
    """Every score of each completion; the off-prompt PMI only when `config.min_adherence` is set (its "other
    prompt" is another prompt of the same completions, a seeded derangement). `own_nlls`: the completions'
    base NLLs after their own prompts, when already computed."""
    narration_phrases = config.narration_phrases.get(pair.axis, [])
    if own_nlls is None:
        own_nlls = base_token_nlls(model, tokenizer, completions, batch_size)
    adherence: list[float | None] = [None] * len(completions)
    if config.min_adherence is not None:
        others = other_prompts([c.prompt for c in completions], seed)
        adherence = prompt_pmi(model, tokenizer, completions, others, own_nlls, batch_size)
    scores = []
    for completion, nlls, pmi in zip(completions, own_nlls, adherence, strict=True):
        nll_mean, tail_ppl, max_nll = _nll_summary(nlls)
        scores.append(
            CompletionScores(
                n_tokens=len(completion.token_ids),
                nll_mean=nll_mean,
                tail_ppl=tail_ppl,
                max_token_nll=max_nll,
                repetition=repetition_fraction(completion.completion),
                compression=compression_ratio(completion.completion),
                distinct_tokens=distinct_token_ratio(completion.token_ids),
                persona_overlap=persona_overlap(completion.completion, pair.pos),
                refusals=matched_phrases(completion.completion, config.refusal_phrases),
                narrations=matched_phrases(completion.completion, narration_phrases),
                adherence=pmi,
            )
        )
    return scores


def drop_reasons(scores: CompletionScores, completion_text: str, config: FilterConfig) -> list[str]:
    """Every reason to drop a completion; empty means keep."""
    minimum, pmi = config.min_adherence, scores.adherence
    off_prompt = minimum is not None and pmi is not None and pmi < minimum
    checks = [
        ("empty", not completion_text.strip()),
        ("truncated", scores.n_tokens < config.min_tokens),
        ("tail_ppl", scores.tail_ppl > config.max_tail_ppl),
        ("max_token_nll", scores.max_token_nll > config.max_token_nll),
        ("repetition", scores.repetition > config.max_repetition),
        ("compression", scores.compression < config.min_compression),
        ("distinct_tokens", scores.distinct_tokens < config.min_distinct_tokens),
        ("refusal", bool(scores.refusals)),
        ("narration", bool(scores.narrations) or scores.persona_overlap > config.max_persona_overlap),
        ("off_prompt", off_prompt),
    ]
    # NaN scores (no tokens) compare False above; "empty"/"truncated" already catch those rows.
    return [reason for reason, failed in checks if failed]


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class ScoredCompletion:
    completion: Completion
    scores: CompletionScores
    reasons: list[str]
    kappa: float
    batch: int

    @property
    def kept(self) -> bool:
        return not self.reasons

    def as_dict(self) -> dict[str, object]:
        return {
            **self.completion.as_dict(),
            "kappa": self.kappa,
            "batch": self.batch,
            "kept": self.kept,
            "reasons": self.reasons,
            "scores": asdict(self.scores),
        }


def filter_completions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    completions: list[Completion],
    pair: PersonaPair,
    config: FilterConfig,
    kappa: float,
    batch: int,
    seed: int = 0,
) -> list[ScoredCompletion]:
    scores = score_completions(model, tokenizer, completions, pair, config, seed=seed)
    return [
        ScoredCompletion(c, s, drop_reasons(s, c.completion, config), kappa, batch)
        for c, s in zip(completions, scores, strict=True)
    ]


def summarise(records: list[ScoredCompletion]) -> dict[str, object]:
    reasons = Counter(reason for record in records for reason in record.reasons)
    kept = sum(record.kept for record in records)
    return {
        "generated": len(records),
        "kept": kept,
        "keep_rate": kept / len(records) if records else 0.0,
        "drop_reasons": dict(sorted(reasons.items())),
    }


# ---------------------------------------------------------------- dose control


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
            steered = steered_logits(
                model, tokenizer, batch.model_inputs(), vector, coeff, logits_to_keep=batch.n_scored
            )
            with base_model(model) as base:
                reference = base(**batch.scored_inputs()).logits
        kl = batch.at_targets(token_kl(steered, reference))
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
            measure=lambda kappa: float(summarise(run_batch(kappa))["keep_rate"]),
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
