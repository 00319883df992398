"""Evaluate a model (base, steered, baked student, or prompted with a persona) on three readouts.

1. Trait: paired-response log-odds. For each scenario (`paired_items.py`: built-in or the user's file), the
   mean per-token log p of a reply that acts out the pos persona minus that of a reply acting out the neg
   persona, teacher-forced; mean over scenarios with a bootstrap CI. Works at 135M, where MFV cannot see the trait.
2. Coherence at small scale: per-token NLL of fixed neutral fluent answers (capability drift), and mean /
   rmse KL(model || base) on those answers.
3. MFV (`mfv.py`): the tinymfv forced-choice protocol, care_nats / auth_nats and its own validity numbers
   (answer-token mass, top-1 agreement with humans).
"""

from __future__ import annotations

import json
import math
from functools import cache
from importlib.resources import files
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from interp_heal.config import EvalConfig
from interp_heal.io import write_json, write_jsonl
from interp_heal.mfv import (
    COMPAT_QUIRKS,
    load_protocol,
    load_vignettes,
    resolve_data_dir,
    score_frames,
    stratified_subset,
    summarise_mfv,
)
from interp_heal.paired_items import ReadoutItems
from interp_heal.personas import render_prompts
from interp_heal.sequences import (
    base_model,
    hidden_kl,
    kl_aggregates,
    pad_left,
    scored_hidden,
    scored_target_ids,
    target_logprobs,
)
from interp_heal.steer import Steering, steered_final_hidden

# Irrelevant persona pair for the validity check: a real trait readout must separate the axis' pos/neg
# personas by more than it separates these.
PLACEBO_PAIR = ("You like tidy kitchens.", "You like long walks.")


@cache
def neutral_answers() -> tuple[tuple[str, str], ...]:
    text = files("interp_heal").joinpath("data", "neutral_answers.jsonl").read_text(encoding="utf-8")
    return tuple((row["prompt"], row["answer"]) for row in map(json.loads, filter(str.strip, text.splitlines())))


# ---------------------------------------------------------------- teacher forcing


def reply_logprobs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    users: list[str],
    replies: list[str],
    batch_size: int,
    steering: Steering | None = None,
    persona: str | None = None,
    with_base_kl: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-token log p(reply | chat prompt) per item, and (optionally) per-token KL(model || base)."""
    steering = steering or Steering()
    prompts = tokenizer(render_prompts(tokenizer, users, persona), add_special_tokens=False)["input_ids"]
    reply_ids = [tokenizer.encode(reply, add_special_tokens=False) for reply in replies]
    device = next(model.parameters()).device
    logprobs: list[torch.Tensor] = []
    kls: list[torch.Tensor] = []
    for start in range(0, len(users), batch_size):
        batch = pad_left(
            prompts[start : start + batch_size], reply_ids[start : start + batch_size], tokenizer.pad_token_id, device
        )
        with torch.inference_mode():
            hidden = batch.at_targets(
                steered_final_hidden(model, tokenizer, batch.model_inputs(), steering.vector, steering.coeff)
            )
            picked = target_logprobs(model, hidden, scored_target_ids(batch))
            logprobs.extend(row.cpu() for row in batch.split_targets(picked))
            if with_base_kl:
                with base_model(model) as base:
                    base_hidden = scored_hidden(base, batch)
                kls.extend(row.cpu() for row in batch.split_targets(hidden_kl(model, hidden, base_hidden)))
    return logprobs, kls


def bootstrap_ci(values: torch.Tensor, n_resamples: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean over items: every resample drawn at once as one index tensor."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(values.numel(), (n_resamples, values.numel()), generator=generator)
    means = values.flatten().double()[picks].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype)).tolist()
    return low, high


def trait_log_odds(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    readout: ReadoutItems,
    config: EvalConfig,
    steering: Steering | None = None,
    persona: str | None = None,
) -> dict[str, object]:
    """Mean over scenarios of [mean log p(pos reply) - mean log p(neg reply)] in nats/token, with a CI."""
    items = readout.items
    users = [item.scenario for item in items]
    pos, _ = reply_logprobs(model, tokenizer, users, [i.pos for i in items], config.batch_size, steering, persona)
    neg, _ = reply_logprobs(model, tokenizer, users, [i.neg for i in items], config.batch_size, steering, persona)
    per_item = torch.tensor([float(p.mean() - n.mean()) for p, n in zip(pos, neg, strict=True)])
    low, high = bootstrap_ci(per_item, config.n_bootstrap)
    return {
        "axis": readout.axis,
        "log_odds": float(per_item.mean()),
        "ci95": [low, high],
        **readout.provenance(),
        "per_item": [float(x) for x in per_item],
    }


def paired_difference(first: dict[str, object], second: dict[str, object], n_bootstrap: int) -> dict[str, object]:
    """Mean per-scenario difference of two trait readouts on the same items, with a bootstrap CI.

    The paired comparison is the right test between two model states (e.g. pos vs neg persona): item
    difficulty cancels, so the interval is far tighter than comparing two separate intervals.
    """
    a, b = torch.tensor(first["per_item"]), torch.tensor(second["per_item"])
    if a.shape != b.shape:
        raise ValueError("paired_difference needs two readouts over the same items")
    low, high = bootstrap_ci(a - b, n_bootstrap)
    return {"diff": float((a - b).mean()), "ci95": [low, high]}


def neutral_coherence(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    config: EvalConfig,
    steering: Steering | None = None,
    persona: str | None = None,
) -> dict[str, float]:
    """NLL per token of fixed neutral answers (the first `config.n_neutral`), and mean / rmse / p95 / max
    KL(model || base) over their tokens."""
    prompts, answers = zip(*neutral_answers()[: config.n_neutral], strict=True)
    logprobs, kls = reply_logprobs(
        model, tokenizer, list(prompts), list(answers), config.batch_size, steering, persona, with_base_kl=True
    )
    kl = kl_aggregates(torch.cat(kls))
    return {"neutral_nll": float(-torch.cat(logprobs).mean()), **{f"neutral_kl_{how}": kl[how] for how in kl}}


def neutral_fluency(neutral_nll: float, base_neutral_nll: float) -> float:
    """Fluency on the neutral answers relative to the base, in (0, 1]: exp(base NLL - NLL), capped at 1 (1 = as
    fluent as the base; 0.5 = NLL up by ln 2 nats per token)."""
    return math.exp(min(0.0, float(base_neutral_nll) - float(neutral_nll)))


# ---------------------------------------------------------------- all readouts


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    readout: ReadoutItems,
    config: EvalConfig,
    steering: Steering | None = None,
    persona: str | None = None,
    seed: int = 0,
) -> dict[str, object]:
    """Every readout for one model state; `per_row` (MFV rows) is returned under its own key."""
    result: dict[str, object] = {
        "trait": trait_log_odds(model, tokenizer, readout, config, steering, persona),
        **neutral_coherence(model, tokenizer, config, steering, persona),
        "think_tokens": config.think_tokens,
        "config": config.model_dump(mode="json"),
    }
    if config.mfv:
        data_dir = resolve_data_dir(config.mfv_data)
        protocol = load_protocol(data_dir, config.protocol)
        rows = stratified_subset(load_vignettes(data_dir, config.set_name, config.condition), config.n_vignettes, seed)
        frames = score_frames(
            model,
            tokenizer,
            protocol,
            rows,
            config.think_tokens,
            config.batch_size,
            steering,
            persona,
            COMPAT_QUIRKS[config.compat],
        )
        result.update(summarise_mfv(protocol, rows, frames), mfv_compat=config.compat)
    return result


def check_eval_inputs(config: EvalConfig) -> None:
    """Read every data file `evaluate` will need, so a missing folder or a malformed row fails before a run
    starts rather than an hour into it."""
    if config.mfv:
        data_dir = resolve_data_dir(config.mfv_data)
        load_protocol(data_dir, config.protocol)
        load_vignettes(data_dir, config.set_name, config.condition)


def write_eval(result: dict[str, object], path: Path) -> None:
    """OUT.json without the per-row records, and OUT.rows.jsonl beside it."""
    per_row = result.get("per_row") or []
    if not isinstance(per_row, list):
        raise TypeError("per_row must be a list of records")
    write_json(path, {k: v for k, v in result.items() if k != "per_row"})
    write_jsonl(path.with_suffix(".rows.jsonl"), per_row)
