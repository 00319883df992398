"""Keep only coherent completions that enact the trait: base-model scores, text scores, drop reasons.

Every completion gets scores (base-model NLL, tail perplexity, repetition, compression, distinct tokens,
refusal and narration matches, optionally its prompt adherence) and a list of drop reasons; it is kept when
that list is empty. Choosing the dose and collecting a round's data is `interp_heal.collect`.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from interp_heal.config import FilterConfig
from interp_heal.generate import Completion
from interp_heal.personas import PersonaPair, render_prompts
from interp_heal.sequences import base_model, pad_left, scored_hidden, scored_target_ids, target_logprobs
from interp_heal.text_scores import (
    compression_ratio,
    distinct_token_ratio,
    matched_phrases,
    persona_overlap,
    repetition_fraction,
)

TAIL_FRACTION = 0.25


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
    persona: str | None = None,
) -> list[torch.Tensor]:
    """Per-token NLL of each completion's tokens under the base model (no adapter, no steering hook), after its
    own prompt or, when given, after `prompts[i]` instead; with `persona` in the chat the way the loop puts it."""
    users = prompts if prompts is not None else [c.prompt for c in completions]
    prompt_ids = tokenizer(render_prompts(tokenizer, users, persona), add_special_tokens=False)
    device = next(model.parameters()).device
    nlls: list[torch.Tensor] = []
    for start in range(0, len(completions), batch_size):
        chunk = completions[start : start + batch_size]
        prompts = prompt_ids["input_ids"][start : start + batch_size]
        batch = pad_left(prompts, [c.token_ids for c in chunk], tokenizer.pad_token_id, device)
        with torch.inference_mode(), base_model(model) as base:
            logprobs = target_logprobs(base, scored_hidden(base, batch), scored_target_ids(batch))
        nlls.extend((-row).cpu() for row in batch.split_targets(logprobs))
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


def dose_keep_rate(records: list[ScoredCompletion], ignored: Iterable[str] = ()) -> float:
    """The keep-rate the dose controller reads: the share of records with no drop reason outside `ignored`."""
    ignored = set(ignored)
    passing = sum(not set(record.reasons) - ignored for record in records)
    return passing / len(records) if records else 0.0
