"""Teacher-forced scoring of (prompt, continuation) token sequences, batched with left padding.

Shared by the filter (NLL under the base model), heal (KL to a reference) and evaluate (paired-response
log-odds). Positions are derived from the attention mask so a left-padded row sees the same positions as
the same row alone (plain HF forward would count the padding).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from interp_heal.architecture import final_norm, is_peft_model, text_config, unwrap_peft


@dataclass(frozen=True)
class PaddedBatch:
    input_ids: torch.Tensor  # [B, T], left-padded
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    target_mask: torch.Tensor  # [B, T]: True where the token at t+1 is a continuation token (predicted at t)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    @property
    def n_scored(self) -> int:
        """Trailing positions whose logits predict a continuation token in some row (>= 1).

        Logits before them are never read, so forwards pass `logits_to_keep=n_scored`: at these shapes the
        unembedding is a fifth of a forward's FLOPs, and a [B, T, vocab] fp32 tensor is hundreds of MB.
        """
        columns = self.target_mask.any(dim=0).nonzero()
        return int(self.target_mask.shape[1] - columns[0]) if len(columns) else 1

    def scored_inputs(self) -> dict[str, object]:
        """`model_inputs()` plus `logits_to_keep`: the forward returns logits for the scored positions only."""
        return {**self.model_inputs(), "logits_to_keep": self.n_scored}

    def at_targets(self, per_position: torch.Tensor) -> torch.Tensor:
        """Rows of a [B, T', ...] tensor (T' <= T trailing positions) at the continuation-predicting positions."""
        return per_position[self.target_mask[:, -per_position.shape[1] :]]

    def split_targets(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A flat [n_targets, ...] tensor in `at_targets` order (row by row), kept apart per batch row."""
        return list(flat.split(self.target_mask.sum(dim=1).tolist()))

    def rows_at_targets(self, per_position: torch.Tensor) -> list[torch.Tensor]:
        """`at_targets`, kept apart per row: one 1-D tensor per batch row."""
        mask = self.target_mask[:, -per_position.shape[1] :]
        return [per_position[b][mask[b]] for b in range(per_position.shape[0])]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pad_left(
    prompts: list[list[int]], continuations: list[list[int]], pad_id: int, device: torch.device
) -> PaddedBatch:
    """Concatenate each prompt with its continuation and left-pad the batch.

    `target_mask[b, t]` marks the logits at position t that predict a continuation token (t+1), so
    `logits[target_mask]` lines up with `input_ids[:, 1:][target_mask[:, :-1]]`.
    """
    rows = [prompt + continuation for prompt, continuation in zip(prompts, continuations, strict=True)]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    target_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
        start = width - len(row)
        input_ids[b, start:] = torch.tensor(row)
        attention_mask[b, start:] = 1
        # Logit at position p predicts token p+1; continuation tokens sit at start+len(prompt) .. width-1.
        target_mask[b, start + len(prompt) - 1 : width - 1] = True
    return PaddedBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids_from_mask(attention_mask).to(device),
        target_mask=target_mask.to(device),
    )


def target_ids(batch: PaddedBatch) -> torch.Tensor:
    """The token each position predicts (next token), aligned with the logits: [B, T] (last column = pad)."""
    shifted = torch.roll(batch.input_ids, shifts=-1, dims=1)
    shifted[:, -1] = 0
    return shifted


def scored_target_ids(batch: PaddedBatch) -> torch.Tensor:
    """The continuation token each scored position predicts, flat in `at_targets` order: [n_targets]."""
    return target_ids(batch)[batch.target_mask]


# Full-vocabulary work (log-softmax, KL) runs over this many logits at a time, so its peak memory is set
# here rather than by batch x length x vocabulary: 64 positions of Gemma 3's 262k vocabulary, 341 of SmolLM2's.
CHUNK_ELEMENTS = 1 << 24


def position_chunks(n_positions: int, vocab_size: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // vocab_size)
    return [slice(start, start + step) for start in range(0, n_positions, step)]


def continuation_logprobs(logits: torch.Tensor, batch: PaddedBatch) -> list[torch.Tensor]:
    """Per-token log p(continuation token) for each row, as a list of 1-D float32 tensors.

    `logits` covers all T positions or the last T' of them (a forward with `logits_to_keep`).
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = target_ids(batch)[:, -logits.shape[1] :].reshape(-1, 1)
    picked = torch.cat(
        [
            torch.log_softmax(flat_logits[chunk].float(), dim=-1).gather(-1, flat_targets[chunk]).squeeze(-1)
            for chunk in position_chunks(len(flat_logits), logits.shape[-1])
        ]
    )
    return batch.rows_at_targets(picked.view(logits.shape[:-1]))


def token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the full vocabulary at every position: sum_v p (log p - log q), shape [..., T].

    The first argument is the distribution the expectation is taken under: KL(student || ref) is the
    reverse KL of the heal barrier. (torch's F.kl_div(input=log q, target=log p) computes this same KL(p||q);
    the argument order is easy to get backwards, so this is spelled out.)
    """
    flat_p, flat_q = (logits.reshape(-1, logits.shape[-1]) for logits in (logits_p, logits_q))
    kl = torch.cat(
        [
            kl_from_logprobs(torch.log_softmax(flat_p[chunk].float(), -1), torch.log_softmax(flat_q[chunk].float(), -1))
            for chunk in position_chunks(len(flat_p), logits_p.shape[-1])
        ]
    )
    return kl.view(logits_p.shape[:-1])


def target_logprobs(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each of n positions from the final hidden states that predict them ([n, d], [n]),
    unembedded a chunk of positions at a time: peak memory grows with the chunk, not with n x vocabulary."""
    return torch.cat(
        [
            torch.log_softmax(unembed(model, hidden[chunk]), dim=-1).gather(-1, targets[chunk, None]).squeeze(-1)
            for chunk in position_chunks(len(hidden), vocab_size(model))
        ]
    )


def hidden_kl(model: nn.Module, hidden_p: torch.Tensor, hidden_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) at each of n positions between the distributions that `model`'s head makes of two final
    hidden states ([n, d] each: e.g. steered and base), a chunk of positions at a time (see `token_kl`)."""
    return torch.cat(
        [
            kl_from_logprobs(
                torch.log_softmax(unembed(model, hidden_p[chunk]), -1),
                torch.log_softmax(unembed(model, hidden_q[chunk]), -1),
            )
            for chunk in position_chunks(len(hidden_p), vocab_size(model))
        ]
    )


def kl_from_logprobs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) from log-probabilities over the last dimension."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


AGGREGATES = ("mean", "rmse", "p95", "max")


def aggregate_kl(kl_per_token: torch.Tensor, how: str) -> torch.Tensor:
    """Aggregate per-token KL (1-D) into one scalar: mean, rmse = sqrt(mean kl^2), p95 (95th percentile), max."""
    if kl_per_token.ndim != 1 or kl_per_token.numel() == 0:
        raise ValueError(f"aggregate_kl needs a non-empty 1-D tensor, got shape {tuple(kl_per_token.shape)}")
    if how == "mean":
        return kl_per_token.mean()
    if how == "rmse":
        return kl_per_token.square().mean().sqrt()
    if how == "p95":
        return torch.quantile(kl_per_token, 0.95)
    if how == "max":
        return kl_per_token.max()
    raise ValueError(f"unknown KL aggregate {how!r}; use one of {AGGREGATES}")


def kl_aggregates(kl_per_token: torch.Tensor) -> dict[str, float]:
    """Every aggregate of a per-token KL, as plain numbers: what the heal log, the evals and the diffs report."""
    return {how: float(aggregate_kl(kl_per_token, how)) for how in AGGREGATES}


def scored_hidden(model: nn.Module, batch: PaddedBatch) -> torch.Tensor:
    """The unembedding's input (the final norm's output) at the continuation-predicting positions, [n_targets, d]:
    `unembed` turns it into logits a chunk of positions at a time. The forward goes through `model` itself (a DDP
    wrapper must see it) and keeps the logits of one position only. The norm's output is read by a hook added
    for this call, since `output_hidden_states` relies on hooks that `base_model` suspends."""
    captured: list[torch.Tensor] = []
    hook = final_norm(_causal_lm(model)).register_forward_hook(lambda _module, _args, out: captured.append(out))
    try:
        model(**batch.model_inputs(), logits_to_keep=1)
    finally:
        hook.remove()
    return batch.at_targets(captured[-1])


def _causal_lm(model: nn.Module) -> nn.Module:
    """The *ForCausalLM inside a DDP and/or peft wrapper."""
    return unwrap_peft(model.module if isinstance(model, DistributedDataParallel) else model)[0]


def vocab_size(model: nn.Module) -> int:
    return int(text_config(_causal_lm(model)).vocab_size)


def unembed(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits from final hidden states, as the model's own head makes them (with Gemma 2's soft cap)."""
    inner = _causal_lm(model)
    logits = inner.get_output_embeddings()(hidden).float()
    cap = getattr(text_config(inner), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@contextmanager
def base_model(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as the pristine base: peft adapters disabled and every forward hook suspended.

    The filter and the KL reference must see the base model even while a steering hook or a trained
    adapter is active on the same object. Hooks are restored on exit.
    """
    with ExitStack() as stack:
        if is_peft_model(model):
            stack.enter_context(model.disable_adapter())
        stack.enter_context(_suspended_hooks(model))
        yield model


@contextmanager
def _suspended_hooks(model: nn.Module) -> Iterator[None]:
    # torch keeps hooks in these per-module ordered dicts; swapping them out is the only way to silence a
    # hook someone else registered without holding its handle (TransformerLens' reset_hooks does the same).
    saved = [(module, module._forward_hooks, module._forward_pre_hooks) for module in model.modules()]
    try:
        for module, _, _ in saved:
            module._forward_hooks = type(module._forward_hooks)()
            module._forward_pre_hooks = type(module._forward_pre_hooks)()
        yield
    finally:
        for module, hooks, pre_hooks in saved:
            module._forward_hooks = hooks
            module._forward_pre_hooks = pre_hooks
