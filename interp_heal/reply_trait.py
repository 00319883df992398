"""Held-out trait: how much a state's own replies to the held-out prompts read as the pos persona's.

The trait readout (`interp_heal.evaluate`) is teacher-forced: it asks which of two fixed replies, written by
someone else, the state prefers. It cannot see whether the state *writes* the trait when left to itself. This
readout does, on the same replies as task adherence and generation coherence (held-out everyday prompts never
generated from, trained on or extracted with; `interp_heal.adherence`). The **base** model reads each reply y
after its prompt twice, once with each persona of the pair in the chat (the way the loop puts a persona there):

    reply trait = mean over prompts and their replies of (1/|y|) sum_t [log p(y_t | y_<t, pos persona, prompt)
                                                                       - log p(y_t | y_<t, neg persona, prompt)]

in nats/token: > 0 when the replies are likelier from the pos persona than from the neg one. One fixed reader
for every state, so the number moves only when the replies do. A reply is read from its text (re-tokenised,
without an end-of-turn token), so a reply stored in an eval JSON scores exactly as it did when it was sampled
(`stored_reply_trait`, `cli.py rescore`). The CI resamples prompts.
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from interp_heal.adherence import prompt_means
from interp_heal.errors import DataError
from interp_heal.evaluate import bootstrap_ci
from interp_heal.filter import base_token_nlls
from interp_heal.generate import Completion
from interp_heal.io import read_json, sha256_file, write_json
from interp_heal.personas import PersonaPair

COLUMNS = ("reply_trait", "reply_trait_ci_low", "reply_trait_ci_high")


def text_replies(tokenizer: PreTrainedTokenizerBase, prompts: list[str], texts: list[str]) -> list[Completion]:
    """Replies as the readout reads them: each text's own tokens, no special tokens (coeff, finish reason and seed
    are placeholders: the readout reads only the prompt and the tokens)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [
        Completion(prompt=prompt, completion=text, coeff=0.0, token_ids=list(tokens), finish_reason="text", seed=0)
        for prompt, text, tokens in zip(prompts, texts, ids, strict=True)
    ]


def persona_log_ratios(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, replies: list[Completion], pair: PersonaPair, batch_size: int
) -> list[float]:
    """Per reply: mean over its tokens of log p(token | pos persona) - log p(token | neg persona) under the base;
    NaN for a reply without tokens."""
    pos = base_token_nlls(model, tokenizer, replies, batch_size, persona=pair.pos)
    neg = base_token_nlls(model, tokenizer, replies, batch_size, persona=pair.neg)
    return [float((n - p).mean()) if p.numel() else math.nan for p, n in zip(pos, neg, strict=True)]


def reply_trait(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    texts: list[str],
    pair: PersonaPair,
    n_bootstrap: int,
    batch_size: int,
) -> dict[str, object]:
    """The `reply_trait` block of an eval JSON from a state's replies (`texts[i]` answers `prompts[i]`)."""
    ratios = persona_log_ratios(model, tokenizer, text_replies(tokenizer, prompts, texts), pair, batch_size)
    per_prompt = prompt_means(prompts, ratios)
    ci = list(bootstrap_ci(per_prompt, n_bootstrap)) if per_prompt.numel() else [math.nan, math.nan]
    return {
        "log_ratio": float(per_prompt.mean()) if per_prompt.numel() else math.nan,
        "ci95": ci,
        "n_prompts": int(per_prompt.numel()),
        "n_replies": len(texts),
        "pos": pair.pos,
        "neg": pair.neg,
        "per_reply": ratios,
    }


def stored_reply_trait(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    result: dict,
    pair: PersonaPair,
    n_bootstrap: int,
    batch_size: int,
) -> dict[str, object]:
    """The readout for an eval JSON written before it existed, from the replies its adherence block stored."""
    replies = stored_replies(result)
    if not replies:
        raise DataError("this eval stored no replies (it ran with eval.adherence: false): nothing to read")
    prompts, texts = [row["prompt"] for row in replies], [row["reply"] for row in replies]
    return reply_trait(model, tokenizer, prompts, texts, pair, n_bootstrap, batch_size)


def stored_replies(result: dict) -> list[dict]:
    """The replies an eval JSON's adherence block stored (prompt, reply, ...); empty when it has none."""
    return list((result.get("adherence") or {}).get("replies") or [])


def reply_trait_columns(result: dict) -> dict[str, object]:
    """metrics.csv columns of an eval's reply_trait block (None where the eval has none)."""
    block = result.get("reply_trait") or {}
    low, high = block.get("ci95") or [None, None]
    return dict(zip(COLUMNS, (block.get("log_ratio"), low, high), strict=True))


# A run folder's eval JSONs are recorded by sha256 (`run_folder`), so the readout of an eval written before it
# existed goes beside it, never into it; `metrics.csv` reads it from there. The sidecar records the sha256 of the
# eval whose replies it read, so a sidecar left beside a different eval (a stage redone) is never merged into it.
SIDECAR_SUFFIX = ".reply_trait.json"


def sidecar_path(eval_path: Path) -> Path:
    return eval_path.with_name(eval_path.stem + SIDECAR_SUFFIX)


def write_sidecar(eval_path: Path, block: dict[str, object]) -> Path:
    path = sidecar_path(eval_path)
    write_json(path, {**block, "eval_sha256": sha256_file(eval_path)})
    return path


def with_sidecar(result: dict, eval_path: Path) -> dict:
    """An eval's result with the readout from its sidecar when the eval has none of its own; a sidecar written
    for another version of the eval is an error naming the command that rewrites it."""
    sidecar = sidecar_path(eval_path)
    if "reply_trait" in result or not sidecar.is_file():
        return result
    block = read_json(sidecar, "held-out trait readout")
    if block.pop("eval_sha256", None) != sha256_file(eval_path):
        raise DataError(f"{sidecar}: read from another version of {eval_path.name} (delete it, rerun `cli.py rescore`)")
    return result | {"reply_trait": block}
