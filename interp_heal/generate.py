"""Batched (steered) sampling of task prompts, returned as plain records and written as JSONL."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from interp_heal.config import GenerateConfig
from interp_heal.io import write_jsonl
from interp_heal.personas import render_prompts
from interp_heal.steer import SteeringVector, steered_generate, tokenize_prompts


@dataclass(frozen=True)
class Completion:
    prompt: str  # the user's task prompt (not the chat-templated string)
    completion: str
    coeff: float
    token_ids: list[int]  # completion tokens, up to and including EOS when it was produced
    finish_reason: str  # "eos" or "length"
    seed: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Completion:
        """From a JSONL record that may carry extra fields (scores, reasons, ...)."""
        return cls(**{name: record[name] for name in cls.__dataclass_fields__})


def sampling_kwargs(config: GenerateConfig) -> dict[str, object]:
    """HF generate arguments for the configured sampler (temperature 0 = greedy)."""
    if config.temperature == 0:
        return {"max_new_tokens": config.max_new_tokens, "do_sample": False}
    return {
        "max_new_tokens": config.max_new_tokens,
        "do_sample": True,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k or None,
    }


def split_completion(new_ids: list[int], eos_ids: set[int]) -> tuple[list[int], str]:
    """Cut generated ids at the first EOS (kept) and say why generation ended."""
    for position, token in enumerate(new_ids):
        if token in eos_ids:
            return new_ids[: position + 1], "eos"
    return new_ids, "length"


def _eos_ids(tokenizer: PreTrainedTokenizerBase, model: nn.Module) -> set[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return ids | {tokenizer.eos_token_id}


def generate_completions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    vector: SteeringVector | None,
    coeffs: list[float],
    config: GenerateConfig,
    seed: int,
    generated_only: bool = False,
) -> list[Completion]:
    """Sample every prompt at every coefficient. Rows are (prompt, coefficient) pairs sorted by prompt length
    (less padding) and batched together, doses mixed within a batch (each row carries its own coefficient).

    Each batch is seeded with `seed + batch index`, so a rerun with the same inputs is identical.
    """
    device = next(model.parameters()).device
    templated = render_prompts(tokenizer, prompts)
    lengths = [len(ids) for ids in tokenizer(templated, add_special_tokens=False)["input_ids"]]
    rows = sorted(((i, c) for c in range(len(coeffs)) for i in range(len(prompts))), key=lambda row: lengths[row[0]])
    eos_ids = _eos_ids(tokenizer, model)
    batches = [rows[start : start + config.batch_size] for start in range(0, len(rows), config.batch_size)]
    keyed: list[tuple[int, int, Completion]] = []
    for batch_index, batch in enumerate(tqdm(batches, desc="generate", leave=False)):
        batch_seed = seed + batch_index
        torch.manual_seed(batch_seed)
        inputs = dict(tokenize_prompts(tokenizer, [templated[i] for i, _ in batch], device))
        row_coeffs = [coeffs[c] for _, c in batch]
        sequences = steered_generate(
            model, tokenizer, inputs, vector, row_coeffs, generated_only=generated_only, **sampling_kwargs(config)
        )
        new_tokens = sequences[:, inputs["input_ids"].shape[1] :].tolist()
        for (index, coeff_index), new_ids in zip(batch, new_tokens, strict=True):
            token_ids, finish_reason = split_completion(new_ids, eos_ids)
            text = tokenizer.decode(token_ids, skip_special_tokens=True)
            record = Completion(prompts[index], text, coeffs[coeff_index], token_ids, finish_reason, batch_seed)
            keyed.append((coeff_index, index, record))
    return [record for _, _, record in sorted(keyed, key=lambda item: item[:2])]


def write_completions(path: Path, records: list[Completion]) -> None:
    write_jsonl(path, (record.as_dict() for record in records))
