"""Task adherence: does the model still answer the question it was asked?

Healing can restore fluency while the student's replies drift away from what they were asked: generic fluent
text is, if anything, *more* predictable, so neither neutral-text NLL nor the base NLL of the student's own
samples can see the drift. This readout can. For held-out everyday requests (`data/adherence_prompts.txt`,
disjoint from every prompt the loop generates from, extracts with or reads out on; tested), the model state
samples its own replies (seeded, the run's generation settings; a steered state samples with its steering, a
prompted one with its persona), and the **base** model scores each reply y after its own prompt and after
another one:

    adherence = mean over prompts and their replies of (1/|y|) sum_t [log p(y_t | y_<t, own prompt)
                                                                      - log p(y_t | y_<t, other prompt)]

the pointwise mutual information between reply and prompt in nats/token. The other prompt is a seeded
derangement of the prompts (`filter.other_prompts`), the same for every state, so a reply that ignores its
prompt scores exactly 0 on average and one written for another prompt scores below 0.

Why the base scores it: one fixed reader for every state, so the number moves only when the replies do (a
student scoring its own replies would also reward itself for having learnt their style), and the base reads
the chat the way the loop's filter does. The CI resamples prompts, since replies to one prompt are not
independent. The same PMI is the filter's `off_prompt` check (`filter.min_adherence`) and, as a share of the
base's, the loop's floor with `loop.coherence: adherence`.
"""

from __future__ import annotations

import hashlib
import math
from functools import cache
from importlib.resources import files

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from interp_heal.config import Config, GenerateConfig
from interp_heal.evaluate import bootstrap_ci
from interp_heal.filter import base_token_nlls, other_prompts, prompt_pmi
from interp_heal.generate import Completion, generate_completions
from interp_heal.steer import Steering

PROMPTS_FILE = "adherence_prompts.txt"


@cache
def adherence_prompts() -> tuple[str, ...]:
    """The held-out everyday requests, in file order."""
    text = files("interp_heal").joinpath("data", PROMPTS_FILE).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def sample_replies(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    n_samples: int,
    config: GenerateConfig,
    seed: int,
    steering: Steering | None = None,
    persona: str | None = None,
    generated_only: bool = False,
) -> list[Completion]:
    """`n_samples` replies per prompt from the model as it stands (with its steering or persona), seeded."""
    steering = steering or Steering()
    repeated = [prompt for prompt in prompts for _ in range(n_samples)]
    return generate_completions(
        model, tokenizer, repeated, steering.vector, [steering.coeff], config, seed, generated_only, persona
    )


def prompt_means(prompts: list[str], values: list[float]) -> torch.Tensor:
    """One value per distinct prompt (first-seen order): the mean of its replies' values, NaNs left out (a prompt
    whose replies are all NaN is left out). Replies to one prompt are not independent, so CIs resample these."""
    by_prompt: dict[str, list[float]] = {}
    for prompt, value in zip(prompts, values, strict=True):
        if not math.isnan(value):
            by_prompt.setdefault(prompt, []).append(value)
    return torch.tensor([sum(group) / len(group) for group in by_prompt.values()])


def score_adherence(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    replies: list[Completion],
    n_bootstrap: int,
    batch_size: int,
    seed: int,
    own_nlls: list[torch.Tensor] | None = None,
) -> dict[str, object]:
    """The readout from sampled replies: mean PMI over prompts (each the mean of its replies) with a bootstrap
    CI over prompts, the base NLL of the replies, and every reply with its own values. A reply without tokens
    has no PMI; it is counted (`n_empty`) and left out. `own_nlls`: the replies' base NLLs, when already
    computed."""
    others = other_prompts([reply.prompt for reply in replies], seed)
    if own_nlls is None:
        own_nlls = base_token_nlls(model, tokenizer, replies, batch_size)
    pmis = prompt_pmi(model, tokenizer, replies, others, own_nlls, batch_size)
    nlls = [float(nll.mean()) if nll.numel() else math.nan for nll in own_nlls]
    per_prompt = prompt_means([reply.prompt for reply in replies], pmis)
    ci = list(bootstrap_ci(per_prompt, n_bootstrap)) if per_prompt.numel() else [math.nan, math.nan]
    present = [nll for nll in nlls if not math.isnan(nll)]
    return {
        "pmi": float(per_prompt.mean()) if per_prompt.numel() else math.nan,
        "ci95": ci,
        "nll": sum(present) / len(present) if present else math.nan,
        "n_prompts": len(dict.fromkeys(reply.prompt for reply in replies)),
        "n_replies": len(replies),
        "n_empty": len(replies) - len(present),
        "per_prompt": [float(value) for value in per_prompt],
        "replies": [
            {"prompt": reply.prompt, "other_prompt": other, "reply": reply.completion, "pmi": pmi, "nll": nll}
            for reply, other, pmi, nll in zip(replies, others, pmis, nlls, strict=True)
        ],
    }


def held_out_replies(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    config: Config,
    steering: Steering | None = None,
    persona: str | None = None,
) -> list[Completion]:
    """The state's own replies to the held-out prompts (`eval.adherence_prompts`, `eval.adherence_samples`)."""
    prompts = list(adherence_prompts()[: config.eval.adherence_prompts])
    return sample_replies(
        model, tokenizer, prompts, config.eval.adherence_samples, config.generate, config.seed, steering, persona,
        config.steer.generated_only,
    )  # fmt: skip


def task_adherence(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    config: Config,
    steering: Steering | None = None,
    persona: str | None = None,
    replies: list[Completion] | None = None,
    own_nlls: list[torch.Tensor] | None = None,
) -> dict[str, object]:
    """The adherence block of an eval JSON for one model state (see the module docstring); `replies` (from
    `held_out_replies`) and their base NLLs when another readout already has them."""
    if replies is None:
        replies = held_out_replies(model, tokenizer, config, steering, persona)
    eval_config = config.eval
    result = score_adherence(
        model, tokenizer, replies, eval_config.n_bootstrap, eval_config.batch_size, config.seed, own_nlls
    )
    prompts = list(adherence_prompts()[: eval_config.adherence_prompts])
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    return {**result, "n_samples": eval_config.adherence_samples, "prompts_sha256": digest, "seed": config.seed}


def adherence_ratio(result: dict, base: dict) -> float:
    """A state's adherence as a share of the base's, in [0, 1] (1 = answers its prompts as well as the base;
    above the base counts as 1, below 0 as 0); NaN when either lacks the readout or the base's is not > 0 (a
    model whose own replies say nothing about their prompts gives the share no meaning)."""
    state, reference = result.get("adherence") or {}, base.get("adherence") or {}
    if "pmi" not in state or not float(reference.get("pmi", math.nan)) > 0:
        return math.nan
    return min(1.0, max(0.0, float(state["pmi"]) / float(reference["pmi"])))


def adherence_columns(result: dict) -> dict[str, object]:
    """metrics.csv columns of an eval's adherence block (empty when the eval has none)."""
    block = result.get("adherence") or {}
    low, high = block.get("ci95") or [None, None]
    return {"adherence": block.get("pmi"), "adherence_ci_low": low, "adherence_ci_high": high,
            "adherence_nll": block.get("nll")}  # fmt: skip
