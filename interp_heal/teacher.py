"""The teacher of `heal.target: logits`: its top-K next-token distribution at every completion position.

Prompt Baking (Bhargava et al. 2024, arXiv 2409.13697) distils a prompted teacher by forward KL over the
teacher's top-K tokens at each position of teacher-sampled trajectories. Here the teacher is the round's own:
the student steered at each completion's dose (loop.source: steer) or with the pos persona as its system prompt
(loop.source: prompt). The student trains on the prompt without the persona, so teacher and student rows are
aligned by completion position, not by sequence position.

Computed once per round after the filter and stored as [tokens, K] token ids (int32) and log-probs (float32),
never as full distributions: at Gemma's 262k vocabulary that is MB instead of GB. The file carries a key (K,
the sha256 of every teacher input, the vector's) and is reused only when that key is the round's; a missing,
unreadable or mismatched file is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from interp_heal.config import HealConfig
from interp_heal.generate import Completion
from interp_heal.heal import TeacherRows, training_examples
from interp_heal.io import atomic_target
from interp_heal.personas import render_prompts
from interp_heal.sequences import PaddedBatch, pad_left, position_chunks, scored_hidden, unembed, vocab_size
from interp_heal.steer import SteeringVector, steered_final_hidden

FORMAT = 1
_META = "interp_heal_teacher"


@dataclass(frozen=True)
class TeacherInputs:
    """What the teacher reads: its own context per completion and the tokens the student trains on."""

    prompt_ids: list[list[int]]  # the chat-templated prompt as the teacher sees it (with the persona, if any)
    completion_ids: list[list[int]]  # the completion tokens, cut to heal.max_len as training cuts them
    coeffs: list[float]  # the steering dose of each completion (0 without a vector)


@dataclass(frozen=True)
class TeacherTopK:
    token_ids: torch.Tensor  # [n_tokens, K] int32: completions in order, each one's positions in order
    log_probs: torch.Tensor  # [n_tokens, K] float32: the teacher's full-vocabulary log-probs of those tokens
    counts: list[int]  # rows per completion
    key: dict[str, object]

    def per_completion(self) -> list[TeacherRows]:
        ids, log_probs = self.token_ids.split(self.counts), self.log_probs.split(self.counts)
        return [TeacherRows(i, lp) for i, lp in zip(ids, log_probs, strict=True)]

    def save(self, path: Path) -> None:
        tensors = {
            "token_ids": self.token_ids.contiguous(),
            "log_probs": self.log_probs.contiguous(),
            "counts": torch.tensor(self.counts, dtype=torch.int64),
        }
        with atomic_target(path) as tmp:
            save_file(tensors, str(tmp), metadata={_META: json.dumps(self.key, sort_keys=True)})


def teacher_inputs(
    tokenizer: PreTrainedTokenizerBase,
    completions: list[Completion],
    max_len: int,
    vector: SteeringVector | None,
    persona: str | None,
) -> TeacherInputs:
    """The student's completion tokens (training's cut) after the teacher's prompt (with `persona`, if given)."""
    examples = training_examples(tokenizer, completions, max_len)
    rendered = render_prompts(tokenizer, [c.prompt for c in completions], persona)
    prompt_ids = [list(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    coeffs = [c.coeff if vector is not None else 0.0 for c in completions]
    return TeacherInputs(prompt_ids, [e.completion_ids for e in examples], coeffs)


def teacher_key(
    inputs: TeacherInputs, k: int, vector: SteeringVector | None, generated_only: bool = False
) -> dict[str, object]:
    """What the stored top-K was computed from. The student itself is keyed through its inputs: the completions
    were sampled from it and the vector read from it, so another student gives another key."""
    payload = json.dumps([inputs.prompt_ids, inputs.completion_ids, inputs.coeffs]).encode()
    vector_sha = None
    if vector is not None:
        digest = hashlib.sha256(vector.directions.float().contiguous().numpy().tobytes())
        digest.update(json.dumps(list(vector.layers)).encode())
        vector_sha = digest.hexdigest()
    return {
        "format": FORMAT,
        "k": k,
        "inputs_sha256": hashlib.sha256(payload).hexdigest(),
        "vector_sha256": vector_sha,
        "generated_only": generated_only and vector is not None,
        "n_completions": len(inputs.completion_ids),
        "n_tokens": sum(len(ids) for ids in inputs.completion_ids),
    }


def read_teacher_topk(path: Path, key: dict[str, object]) -> TeacherTopK | None:
    """The stored top-K when `path` holds one computed from `key`; None (and why, logged) otherwise."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored_key = json.loads((handle.metadata() or {})[_META])
            token_ids, log_probs = handle.get_tensor("token_ids"), handle.get_tensor("log_probs")
            counts = handle.get_tensor("counts").tolist()
    except (OSError, KeyError, ValueError, SafetensorError) as err:
        logger.warning(f"{path}: unreadable teacher top-K ({err}); recomputing")
        return None
    if stored_key != key:
        changed = sorted(name for name in {*key, *stored_key} if key.get(name) != stored_key.get(name))
        logger.warning(f"{path}: teacher top-K of other inputs (differs in {changed}); recomputing")
        return None
    shape_ok = token_ids.shape == log_probs.shape == (sum(counts), key["k"]) and len(counts) == key["n_completions"]
    if not shape_ok or token_ids.dtype != torch.int32:
        logger.warning(f"{path}: teacher top-K tensors do not match its key; recomputing")
        return None
    return TeacherTopK(token_ids, log_probs, counts, key)


def _teacher_hidden(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batch: PaddedBatch,
    vector: SteeringVector | None,
    coeffs: list[float],
    generated_only: bool,
) -> torch.Tensor:
    """The teacher's final hidden states at the completion-predicting positions, [n_targets, d]."""
    if vector is None or not any(coeffs):
        return scored_hidden(model, batch)
    # generated_only sampling steered the completion tokens only (the prompt's KV cache was unsteered): the input
    # positions holding completion tokens are the target positions shifted by one.
    positions = torch.roll(batch.target_mask, 1, dims=1) if generated_only else None
    hidden = steered_final_hidden(model, tokenizer, batch.model_inputs(), vector, coeffs, positions)
    return batch.at_targets(hidden)


def compute_teacher_topk(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    inputs: TeacherInputs,
    k: int,
    vector: SteeringVector | None = None,
    generated_only: bool = False,
    batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K token ids (int32) and log-probs (float32) at every completion position, unembedded a chunk of
    positions at a time so no [positions, vocab] tensor outlives its chunk."""
    device = next(model.parameters()).device
    ids, log_probs = [], []
    for start in range(0, len(inputs.prompt_ids), batch_size):
        rows = slice(start, start + batch_size)
        batch = pad_left(inputs.prompt_ids[rows], inputs.completion_ids[rows], tokenizer.pad_token_id, device)
        with torch.no_grad():
            hidden = _teacher_hidden(model, tokenizer, batch, vector, inputs.coeffs[rows], generated_only)
            for chunk in position_chunks(len(hidden), vocab_size(model)):
                top = torch.log_softmax(unembed(model, hidden[chunk]), dim=-1).topk(k, dim=-1)
                ids.append(top.indices.to(torch.int32).cpu())
                log_probs.append(top.values.float().cpu())
    return torch.cat(ids), torch.cat(log_probs)


def teacher_topk(
    path: Path,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    completions: list[Completion],
    config: HealConfig,
    vector: SteeringVector | None = None,
    persona: str | None = None,
    generated_only: bool = False,
) -> TeacherTopK:
    """The teacher's top-K for `completions`: read from `path` when it was computed from the same inputs, else
    computed (the student steered by `vector` at each completion's coeff, or prompted with `persona`) and saved."""
    inputs = teacher_inputs(tokenizer, completions, config.max_len, vector, persona)
    key = teacher_key(inputs, min(config.teacher_topk, vocab_size(model)), vector, generated_only)
    stored = read_teacher_topk(path, key)
    if stored is not None:
        logger.info(f"teacher top-K: reusing {path} ({key['n_tokens']} tokens x {key['k']})")
        return stored
    token_ids, log_probs = compute_teacher_topk(model, tokenizer, inputs, int(key["k"]), vector, generated_only)
    topk = TeacherTopK(token_ids, log_probs, [len(ids) for ids in inputs.completion_ids], key)
    topk.save(path)
    mass = float(log_probs.exp().sum(-1).mean()) if len(log_probs) else float("nan")
    logger.info(f"teacher top-K: {path} ({key['n_tokens']} tokens x {key['k']}, mean top-K mass {mass:.3f})")
    return topk
