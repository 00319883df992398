"""What a model state writes when left to itself: task adherence, held-out trait and generation coherence of its own
replies.

Neutral fluency (exp(base NLL - NLL) on fixed neutral text) reads how a state *scores* text someone else wrote;
it cannot see what the state writes. Generation coherence does: the state samples replies to the held-out
prompts of the adherence readout (never generated from, trained on or extracted with; `interp_heal.adherence`),
with its steering or persona as it stands, and the **base** model reads them the way the loop's filter reads
training data:

- `nll`: mean base NLL per token over every reply token (lower: closer to what the base would write);
- `tail_ppl`: geometric mean over replies of each reply's base perplexity on its last quarter
  (`filter.TAIL_FRACTION`), where a drifting generation shows first;
- `repetition`: mean share of repeated word n-grams (`filter.repetition_fraction`);
- `keep_rate`: the share of replies the loop's own filter (`filter:` config, narration checks included) would
  keep, with the drop reasons counted.

One set of replies feeds all three readouts (the held-out trait: `interp_heal.reply_trait`), so they describe the same
text and cost one sampling pass.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from interp_heal.adherence import held_out_replies, task_adherence
from interp_heal.config import Config
from interp_heal.filter import ScoredCompletion, base_token_nlls, drop_reasons, score_completions, summarise
from interp_heal.generate import Completion
from interp_heal.personas import PersonaPair
from interp_heal.reply_trait import reply_trait
from interp_heal.steer import Steering

GENERATION_COLUMNS = ("generation_nll", "generation_tail_ppl", "generation_repetition", "generation_keep_rate")


def _mean(values: list[float]) -> float:
    present = [value for value in values if not math.isnan(value)]
    return sum(present) / len(present) if present else math.nan


def generation_summary(scored: list[ScoredCompletion]) -> dict[str, object]:
    """The generation block from filter-scored replies (see the module docstring). Replies without tokens
    count against the keep-rate (the filter drops them) but have no NLL."""
    scores = [record.scores for record in scored]
    token_nll_sum = sum(s.nll_mean * s.n_tokens for s in scores if s.n_tokens and not math.isnan(s.nll_mean))
    n_tokens = sum(s.n_tokens for s in scores if s.n_tokens and not math.isnan(s.nll_mean))
    log_tail = [math.log(s.tail_ppl) for s in scores if s.n_tokens and s.tail_ppl > 0]
    kept = summarise(scored)
    return {
        "nll": token_nll_sum / n_tokens if n_tokens else math.nan,
        "tail_ppl": math.exp(_mean(log_tail)) if log_tail else math.nan,
        "repetition": _mean([s.repetition for s in scores]),
        "keep_rate": kept["keep_rate"],
        "drop_reasons": kept["drop_reasons"],
        "n_replies": len(scored),
        "n_tokens": n_tokens,
    }


def generation_coherence(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    replies: list[Completion],
    pair: PersonaPair,
    config: Config,
    own_nlls: list[torch.Tensor] | None = None,
) -> dict[str, object]:
    """Score a state's replies under the base with the loop's filter and summarise them."""
    scores = score_completions(
        model, tokenizer, replies, pair, config.filter, config.eval.batch_size, config.seed, own_nlls
    )
    scored = [
        ScoredCompletion(reply, score, drop_reasons(score, reply.completion, config.filter), reply.coeff, 0)
        for reply, score in zip(replies, scores, strict=True)
    ]
    return generation_summary(scored)


def own_reply_readouts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    config: Config,
    pair: PersonaPair,
    steering: Steering | None = None,
    persona: str | None = None,
) -> dict[str, dict]:
    """The `adherence`, `reply_trait` (held-out trait) and `generation` blocks of an eval JSON for one model state,
    from one set of replies."""
    replies = held_out_replies(model, tokenizer, config, steering, persona)
    own_nlls = base_token_nlls(model, tokenizer, replies, config.eval.batch_size)
    prompts, texts = [reply.prompt for reply in replies], [reply.completion for reply in replies]
    return {
        "adherence": task_adherence(model, tokenizer, config, steering, persona, replies, own_nlls),
        "reply_trait": reply_trait(
            model, tokenizer, prompts, texts, pair, config.eval.n_bootstrap, config.eval.batch_size
        ),
        "generation": generation_coherence(model, tokenizer, replies, pair, config, own_nlls),
    }


def generation_columns(result: dict) -> dict[str, object]:
    """metrics.csv columns of an eval's generation block (None where the eval has none)."""
    block = result.get("generation") or {}
    return {column: block.get(column.removeprefix("generation_")) for column in GENERATION_COLUMNS}
