"""Batched (steered) sampling of task prompts, returned as plain records and written as JSONL.

Prompts that share a prefix (the chat template's system block) prefill it once into a KV cache that every
row reuses (`prompt_batch`); the sampler itself is `interp_heal.sampling`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedTokenizerBase

from interp_heal.chat import turn_end
from interp_heal.config import GenerateConfig
from interp_heal.io import write_jsonl
from interp_heal.personas import render_prompts
from interp_heal.sampling import sampling_kwargs
from interp_heal.sequences import pad_left
from interp_heal.steer import SteeringVector, steered_generate, steered_logits


@dataclass(frozen=True)
class Completion:
    prompt: str  # the user's task prompt (not the chat-templated string)
    completion: str
    coeff: float
    token_ids: list[int]  # completion tokens, up to and including EOS when it was produced
    finish_reason: str  # "eos" (or, in the plain chat format, the start of the next turn) or "length"
    seed: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Completion:
        """From a JSONL record that may carry extra fields (scores, reasons, ...)."""
        return cls(**{name: record[name] for name in cls.__dataclass_fields__})


def split_completion(new_ids: list[int], eos_ids: set[int]) -> tuple[list[int], str]:
    """Cut generated ids at the first EOS (kept) and say why generation ended."""
    for position, token in enumerate(new_ids):
        if token in eos_ids:
            return new_ids[: position + 1], "eos"
    return new_ids, "length"


def shared_prefix_length(rows: list[list[int]]) -> int:
    """How many leading tokens all rows share (typically the chat template's system block), leaving at least
    the last token of the shortest row for generate's first step, which needs a position to predict from."""
    length, shortest = 0, min(len(row) for row in rows)
    while length < shortest - 1 and all(row[length] == rows[0][length] for row in rows):
        length += 1
    return length


def sliding_window(model: nn.Module) -> int | None:
    """The sliding attention window of the model's windowed layers, or None when every layer sees the whole
    sequence (Llama; Qwen2 with its window switched off; Gemma 3 has windowed layers)."""
    config = getattr(model, "config", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return getattr(config, "sliding_window", None)


@dataclass
class PromptBatch:
    """What `generate` gets for a batch: token ids, attention mask, and the KV cache of a shared prefix."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prefix_cache: DynamicCache | None

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def generate_kwargs(self) -> dict[str, object]:
        return {} if self.prefix_cache is None else {"past_key_values": self.prefix_cache}


def prompt_batch(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[list[int]],
    vector: SteeringVector | None,
    row_coeffs: list[float],
    config: GenerateConfig,
    generated_only: bool = False,
) -> PromptBatch:
    """Lay out prompt token rows as [shared prefix | left padding | rest], with the prefix run once per distinct
    coefficient (steered as generation steers prompts) and its KV cache copied to every row.

    Why: all chat-templated prompts start with the same system block (24 of ~40 tokens for SmolLM2), which a
    plain left-padded batch runs once per row. HF derives positions from the attention mask's running count, so
    each token keeps the position it has in the plain layout, and padding inside the sequence is masked like
    padding on the left: the same computation with fewer prefill positions (tests/test_generate.py checks it).
    Not with a sliding window shorter than the sequence: a window counts cache slots, and padding inside the
    sequence would take slots from real tokens. Then, with `config.share_prefix` off, or nothing shared, this is
    the plain left-padded batch.
    """
    device = next(model.parameters()).device
    window = sliding_window(model)
    longest = max(len(row) for row in rows) + config.max_new_tokens
    share = config.share_prefix and (window is None or window >= longest)
    prefix_length = shared_prefix_length(rows) if share else 0
    rests = pad_left([row[prefix_length:] for row in rows], [[] for _ in rows], tokenizer.pad_token_id, device)
    prefix = rests.input_ids.new_tensor(rows[0][:prefix_length]).expand(len(rows), -1)
    input_ids = torch.cat([prefix, rests.input_ids], dim=1)
    batch = PromptBatch(input_ids, torch.cat([torch.ones_like(prefix), rests.attention_mask], dim=1), None)
    if prefix_length == 0:
        return batch
    prefix_coeffs = [0.0] * len(rows) if generated_only else row_coeffs
    distinct = sorted(set(prefix_coeffs))
    prefix_ids = prefix[: len(distinct)]
    cache = DynamicCache(config=getattr(model, "config", None))
    prefix_inputs = {"input_ids": prefix_ids, "attention_mask": torch.ones_like(prefix_ids)}
    with torch.inference_mode():  # as generate runs: no autograd graph behind the cached keys and values
        steered_logits(model, tokenizer, prefix_inputs, vector, distinct, past_key_values=cache, logits_to_keep=1)
        cache.reorder_cache(torch.tensor([distinct.index(c) for c in prefix_coeffs], device=device))
    batch.prefix_cache = cache
    return batch


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
    persona: str | None = None,
) -> list[Completion]:
    """Sample every prompt at every coefficient (with `persona` in the chat when given). Rows are (prompt,
    coefficient) pairs sorted by prompt length (less padding) and batched together, doses mixed within a batch
    (each row carries its own coefficient); the prompts' shared prefix runs once per coefficient (`prompt_batch`).

    Each batch is seeded with `seed + batch index`, so a rerun with the same inputs is identical.
    """
    token_rows = tokenizer(render_prompts(tokenizer, prompts, persona), add_special_tokens=False)["input_ids"]
    pairs = ((i, c) for c in range(len(coeffs)) for i in range(len(prompts)))
    rows = sorted(pairs, key=lambda row: len(token_rows[row[0]]))
    eos_ids = _eos_ids(tokenizer, model)
    batches = [rows[start : start + config.batch_size] for start in range(0, len(rows), config.batch_size)]
    keyed: list[tuple[int, int, Completion]] = []
    for batch_index, batch in enumerate(tqdm(batches, desc="generate", leave=False)):
        batch_seed = seed + batch_index
        torch.manual_seed(batch_seed)
        row_coeffs = [coeffs[c] for _, c in batch]
        batch_rows = [token_rows[i] for i, _ in batch]
        prompt = prompt_batch(model, tokenizer, batch_rows, vector, row_coeffs, config, generated_only)
        kwargs = {**sampling_kwargs(config), **prompt.generate_kwargs()}
        sequences = steered_generate(
            model, tokenizer, prompt.inputs(), vector, row_coeffs, generated_only=generated_only, **kwargs
        )
        new_tokens = sequences[:, prompt.input_ids.shape[1] :].tolist()
        for (index, coeff_index), new_ids in zip(batch, new_tokens, strict=True):
            token_ids, finish_reason = split_completion(new_ids, eos_ids)
            turn = turn_end(tokenizer, token_ids)
            if turn is not None:  # a base model writing the next user turn itself: its answer ended there
                token_ids, finish_reason = token_ids[:turn], "eos"
            text = tokenizer.decode(token_ids, skip_special_tokens=True)
            record = Completion(prompts[index], text, coeffs[coeff_index], token_ids, finish_reason, batch_seed)
            keyed.append((coeff_index, index, record))
    return [record for _, _, record in sorted(keyed, key=lambda item: item[:2])]


def write_completions(path: Path, records: list[Completion]) -> None:
    write_jsonl(path, (record.as_dict() for record in records))
