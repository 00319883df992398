"""Heal: distil the kept steered completions into a fresh LoRA behind a KL barrier.

    loss = NLL(completion | prompt) + lam_eff * relu(D - tau),   D = agg_t KL(student_t || ref_t)

over the completion tokens of a batch (prompt tokens masked), reverse KL (expectation under the student)
over the full vocabulary, `agg` in mean / rmse / p95 / max, `ref` = the base model (every adapter off) or
the previous student (this round's adapter muted), lam_eff = lam * (1 + round) ** lam_round_pow.
With `target: logits` the NLL term becomes the cross-entropy from the teacher's renormalised top-K distribution
at each completion position, -sum_k q_k log p_student(k) (interp_heal/teacher.py makes and stores the top-K).
Why the aggregate matters: incoherence is spiky. A 4-token loop inside 60 fluent tokens barely lifts the
mean KL, so a mean barrier never fires on it; the rmse (or p95, max) does.
"""

from __future__ import annotations

import csv
import math
import os
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from interp_heal.architecture import band_to_layers, decoder_layer_path, decoder_layers, is_peft_model, unwrap_peft
from interp_heal.bake import activate, adapter_name, adapter_names, muted_adapter
from interp_heal.config import HealConfig
from interp_heal.errors import InterpHealError
from interp_heal.generate import Completion
from interp_heal.parallel import DataParallel, share_of_step
from interp_heal.personas import render_prompts
from interp_heal.sequences import (
    PaddedBatch,
    aggregate_kl,
    base_model,
    kl_aggregates,
    kl_from_logprobs,
    pad_left,
    position_chunks,
    scored_hidden,
    scored_target_ids,
    unembed,
    vocab_size,
)


class HealError(InterpHealError):
    """Training cannot go on (non-finite loss or gradients, no data); nothing was saved."""


def barrier_weight(lam: float, round_index: int, power: float) -> float:
    return lam * (1 + round_index) ** power


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class TeacherRows:
    """The teacher's top-K at completion positions (one row per position): what `target: logits` imitates."""

    token_ids: torch.Tensor  # [n, K] int32
    log_probs: torch.Tensor  # [n, K] float32: full-vocabulary log-probs, renormalised over K where used

    def __len__(self) -> int:
        return len(self.token_ids)


def cat_teacher_rows(rows: list[TeacherRows], device: torch.device) -> TeacherRows:
    return TeacherRows(
        torch.cat([r.token_ids for r in rows]).to(device), torch.cat([r.log_probs for r in rows]).to(device)
    )


@dataclass(frozen=True)
class TrainExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    teacher: TeacherRows | None = None  # with target: logits, one row per completion token


def training_examples(
    tokenizer: PreTrainedTokenizerBase, completions: list[Completion], max_len: int
) -> list[TrainExample]:
    """Chat-templated prompt (no persona, no steering) + the exact generated ids, cut to `max_len` tokens."""
    prompts = tokenizer(render_prompts(tokenizer, [c.prompt for c in completions]), add_special_tokens=False)
    examples = []
    for prompt_ids, completion in zip(prompts["input_ids"], completions, strict=True):
        room = max_len - len(prompt_ids)
        if room < 1:
            raise HealError(f"prompt of {len(prompt_ids)} tokens leaves no room under heal.max_len={max_len}")
        examples.append(TrainExample(list(prompt_ids), list(completion.token_ids[:room])))
    return examples


def with_teacher(examples: list[TrainExample], teacher: list[TeacherRows] | None) -> list[TrainExample]:
    """Each example with its completion's teacher rows; the counts must match token for token, since the rows are
    aligned by completion position (the teacher may have read another prompt, e.g. with the persona)."""
    if teacher is None:
        raise HealError("heal.target=logits needs the teacher's top-K (interp_heal.teacher.teacher_topk)")
    if len(teacher) != len(examples):
        raise HealError(f"teacher top-K for {len(teacher)} completions, but {len(examples)} to train on")
    for number, (example, rows) in enumerate(zip(examples, teacher, strict=True)):
        if len(rows) != len(example.completion_ids):
            raise HealError(
                f"completion {number}: {len(example.completion_ids)} tokens to train on but {len(rows)} teacher rows"
            )
    return [TrainExample(e.prompt_ids, e.completion_ids, rows) for e, rows in zip(examples, teacher, strict=True)]


def split_train_val(examples: list[TrainExample], val_frac: float, seed: int) -> tuple[list, list]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = round(val_frac * len(examples)) if len(examples) > 2 else 0
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def _pad(examples: list[TrainExample], pad_id: int, device: torch.device) -> PaddedBatch:
    return pad_left([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id, device)


def _teacher_of(examples: list[TrainExample], device: torch.device) -> TeacherRows | None:
    """The batch's teacher rows in the order `PaddedBatch.at_targets` lists its positions (row by row)."""
    if examples[0].teacher is None:
        return None
    return cat_teacher_rows([e.teacher for e in examples if e.teacher is not None], device)


def _micro_batch(
    examples: list[TrainExample], pad_id: int, device: torch.device
) -> tuple[PaddedBatch, TeacherRows | None]:
    return _pad(examples, pad_id, device), _teacher_of(examples, device)


def _batches(
    examples: list[TrainExample], size: int, pad_id: int, device: torch.device
) -> Iterator[tuple[PaddedBatch, TeacherRows | None]]:
    for start in range(0, len(examples), size):
        yield _micro_batch(examples[start : start + size], pad_id, device)


class ReferenceCache:
    """Reference log-probs per training example, reused across epochs (the reference is fixed in a round).

    The reference forward is the whole extra cost of the barrier (measured on SmolLM2: ~0.8 s of a ~1.9 s
    NLL step; the full-vocabulary KL itself is negligible), so from the second epoch on it is skipped.
    Entries are fp32 so cached and fresh KL are identical; examples stop being added once `budget_bytes`
    is reached (the rest are recomputed each epoch).
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.entries: dict[int, torch.Tensor] = {}

    def lookup(self, example_ids: list[int], device: torch.device) -> torch.Tensor | None:
        if not all(i in self.entries for i in example_ids):
            return None
        return torch.cat([self.entries[i] for i in example_ids]).to(device)

    def store(self, example_ids: list[int], batch: PaddedBatch, ref_log_probs: torch.Tensor) -> None:
        counts = batch.target_mask.sum(dim=1).tolist()
        for example_id, rows in zip(example_ids, torch.split(ref_log_probs, counts), strict=True):
            size = rows.numel() * rows.element_size()
            if example_id in self.entries or self.used_bytes + size > self.budget_bytes:
                continue
            self.entries[example_id] = rows.detach().to("cpu", copy=True)
            self.used_bytes += size


# ---------------------------------------------------------------- model


def lora_target_pattern(model: nn.Module, config: HealConfig) -> str:
    """The modules LoRA adapts, as the full-name regex peft matches: `target_modules` of the heal band's blocks
    under the decoder's own layer list. Module names plus `layers_to_transform` would also match other stacks
    named "layers.N" (the vision tower of Gemma3ForConditionalGeneration has q/k/v_proj there too)."""
    layer_path = decoder_layer_path(unwrap_peft(model)[0])
    layers = "|".join(str(layer) for layer in band_to_layers(config.band, len(decoder_layers(model))))
    modules = "|".join(re.escape(module) for module in config.target_modules)
    return rf"{re.escape(layer_path)}\.({layers})\.(.*\.)?({modules})"


def add_fresh_adapter(student: nn.Module, config: HealConfig, round_index: int) -> PeftModel:
    """A new zero-initialised (B = 0) LoRA named after the round, trainable, on top of the frozen earlier ones."""
    name = adapter_name(round_index)
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_target_pattern(student, config),
        init_lora_weights=True,
        bias="none",
    )
    if is_peft_model(student):
        earlier = adapter_names(student)
        student.add_adapter(name, lora_config)
    else:
        earlier = []
        student = get_peft_model(student, lora_config, adapter_name=name)
    activate(student, [*earlier, name], trainable=name)
    return student


@contextmanager
def reference_model(model: nn.Module, ref: str, name: str) -> Iterator[nn.Module]:
    """The KL reference on the same weights: the base (all adapters off) or the previous student."""
    if ref == "base":
        with base_model(model) as base:
            yield base
    else:
        with muted_adapter(model, name):
            yield model


def save_adapter(model: PeftModel, name: str, directory: Path) -> None:
    """A standard peft adapter folder for one adapter, written to a temp dir and renamed into place."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.peft_config[name].save_pretrained(str(tmp))
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


# ---------------------------------------------------------------- loss


@dataclass(frozen=True)
class LossParts:
    loss: torch.Tensor
    nll: float
    kl_mean: float
    kl_rmse: float
    kl_p95: float
    kl_max: float
    barrier: float
    barrier_active: bool
    teacher_ce: float = math.nan  # target: logits, the cross-entropy from the teacher's top-K (then the `loss` term)


def reference_log_probs(model: nn.Module, batch: PaddedBatch, config: HealConfig, name: str) -> torch.Tensor:
    """log p_ref at the completion positions of a batch, [n_tokens, vocab] fp32, unembedded a chunk at a time."""
    with torch.no_grad(), reference_model(model, config.ref, name) as reference:
        hidden = scored_hidden(reference, batch)
        chunks = position_chunks(len(hidden), vocab_size(model))
        return torch.cat([torch.log_softmax(unembed(reference, hidden[chunk]), dim=-1) for chunk in chunks])


def teacher_cross_entropy(
    log_p: torch.Tensor, teacher_ids: torch.Tensor, teacher_log_probs: torch.Tensor
) -> torch.Tensor:
    """Per position, -sum_k q_k log p(k) with q the teacher's top-K renormalised: the forward KL(q || p) up to
    q's entropy, a constant, so its gradient is the KL's (zero where p = q)."""
    q = torch.softmax(teacher_log_probs.float(), dim=-1)
    return -(q * log_p.gather(-1, teacher_ids.long())).sum(-1)


def token_losses(
    model: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    ref_log_probs: torch.Tensor | None,
    teacher: TeacherRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token NLL, KL(student || ref) and (with `teacher`) the teacher cross-entropy from the student's final
    hidden states, a chunk of positions at a time. With gradients, each chunk is checkpointed: its [chunk, vocab]
    logits are recomputed in the backward instead of kept, so peak memory follows the chunk, not tokens x
    vocabulary (Gemma: 1 MB per token)."""

    def chunk_losses(
        h: torch.Tensor, t: torch.Tensor, ref: torch.Tensor | None, ids: torch.Tensor | None, lp: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        log_p = torch.log_softmax(unembed(model, h), dim=-1)
        nll = -log_p.gather(-1, t.unsqueeze(-1)).squeeze(-1)
        kl = () if ref is None else (kl_from_logprobs(log_p, ref),)
        ce = () if ids is None or lp is None else (teacher_cross_entropy(log_p, ids, lp),)
        return (nll, *kl, *ce)

    parts = []
    for chunk in position_chunks(len(hidden), vocab_size(model)):
        args = (
            hidden[chunk],
            targets[chunk],
            None if ref_log_probs is None else ref_log_probs[chunk],
            None if teacher is None else teacher.token_ids[chunk],
            None if teacher is None else teacher.log_probs[chunk],
        )
        if hidden.requires_grad:
            parts.append(checkpoint(chunk_losses, *args, use_reentrant=False))
        else:
            parts.append(chunk_losses(*args))
    columns = [torch.cat(column) for column in zip(*parts, strict=True)]
    nll = columns[0]
    kl = columns[1] if ref_log_probs is not None else None
    ce = columns[-1] if teacher is not None else None
    return nll, kl, ce


def batch_loss(
    model: nn.Module,
    batch: PaddedBatch,
    config: HealConfig,
    lam_eff: float,
    name: str,
    with_grad: bool = True,
    with_reference: bool = True,
    ref_log_probs: torch.Tensor | None = None,
    teacher: TeacherRows | None = None,
) -> LossParts:
    """NLL on the completion tokens (or, given `teacher`, the cross-entropy from its top-K) plus the barrier. The
    reference forward also runs when lam_eff = 0, so plain distillation still logs its KL drift;
    `with_reference=False` skips it (no barrier, KL reported NaN). `ref_log_probs` (from `reference_log_probs`,
    e.g. cached) replaces the reference forward. The sampled tokens' NLL is reported either way."""
    if with_reference and ref_log_probs is None:
        ref_log_probs = reference_log_probs(model, batch, config, name)
    targets = scored_target_ids(batch)
    with torch.set_grad_enabled(with_grad):
        token_nll, kl, token_ce = token_losses(model, scored_hidden(model, batch), targets, ref_log_probs, teacher)
    nll = token_nll.mean()
    ce = None if token_ce is None else token_ce.mean()
    objective = nll if ce is None else ce
    ce_value = math.nan if ce is None else ce.item()
    if kl is None:
        nan = float("nan")
        return LossParts(objective, nll.item(), nan, nan, nan, nan, 0.0, False, ce_value)
    divergence = aggregate_kl(kl, config.agg)
    active = bool(divergence.detach() > config.tau)
    # relu(D - tau) has zero gradient below tau; leaving the term out there is the same loss and avoids
    # 0 * inf = NaN from sqrt'(0) when the student still equals the reference (rmse of an all-zero KL).
    barrier = divergence - config.tau if active else torch.zeros((), device=nll.device)
    loss = objective + lam_eff * barrier if active and lam_eff > 0 else objective
    return LossParts(
        loss=loss,
        nll=nll.item(),
        **{f"kl_{how}": value for how, value in kl_aggregates(kl.detach()).items()},
        barrier=barrier.item(),
        barrier_active=active,
        teacher_ce=ce_value,
    )


# ---------------------------------------------------------------- training


LOG_FIELDS = (
    "step", "epoch", "nll", "kl_mean", "kl_rmse", "kl_p95", "kl_max", "barrier", "barrier_active_frac",
    "loss", "grad_norm", "lr",
)  # fmt: skip


def log_fields(config: HealConfig) -> tuple[str, ...]:
    """train_log.csv's columns: target: logits adds the teacher cross-entropy (its `loss` term; `nll` stays the
    sampled tokens' NLL, comparable across targets)."""
    return (*LOG_FIELDS, "teacher_ce") if config.target == "logits" else LOG_FIELDS


@dataclass(frozen=True)
class HealResult:
    model: PeftModel  # the student with this round's adapter active (frozen again after training)
    adapter_name: str
    adapter_dir: Path
    log: list[dict[str, float]]
    val: dict[str, float]
    lam_eff: float
    main_process: bool = True  # False on the other processes of a data-parallel heal (they save nothing)


def _cosine_with_warmup(total_steps: int, warmup_frac: float):
    """Linear warmup to the full rate, then cosine to 0. Not transformers' get_cosine_schedule_with_warmup: its
    warmup starts at lr 0, so the first optimizer step changes nothing but Adam's moments (one of the demo's 4
    warmup steps, at 42 steps and warmup_frac 0.1), and every committed healed number would move; here step 0
    already runs at lr/warmup."""
    warmup = max(1, round(warmup_frac * total_steps)) if warmup_frac > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _mean_parts(parts: list[LossParts], config: HealConfig) -> dict[str, float]:
    fields = _part_fields(config)
    means = {field: sum(getattr(p, field) for p in parts) / len(parts) for field in fields}
    means["barrier_active_frac"] = sum(p.barrier_active for p in parts) / len(parts)
    means["loss"] = sum(p.loss.item() for p in parts) / len(parts)
    return means


def validate(model: PeftModel, examples: list[TrainExample], config: HealConfig, name: str, pad_id: int) -> dict:
    if not examples:
        return {}
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        parts = [
            batch_loss(model, batch, config, 0.0, name, with_grad=False, teacher=teacher)
            for batch, teacher in _batches(examples, config.batch_size, pad_id, device)
        ]
    return {f"val_{key}": value for key, value in _mean_parts(parts, config).items() if key != "loss"}


def heal(
    student: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    completions: list[Completion],
    config: HealConfig,
    round_index: int,
    out_dir: Path,
    seed: int,
    parallel: DataParallel | None = None,
    teacher: list[TeacherRows] | None = None,
) -> HealResult:
    """Train this round's adapter on the kept completions; write train_log.csv and out_dir/adapter.

    With `parallel` over several processes (see interp_heal/parallel.py) each step's micro-batches are shared
    between them and only the main process writes the log and the adapter. `config.target == "logits"` needs
    `teacher`: one TeacherRows per completion (interp_heal.teacher.teacher_topk(...).per_completion()).
    """
    parallel = parallel or DataParallel()
    if not completions:
        raise HealError("no completions to train on")
    torch.manual_seed(seed)
    name = adapter_name(round_index)
    examples = training_examples(tokenizer, completions, config.max_len)
    if config.target == "logits":
        examples = with_teacher(examples, teacher)
    if config.max_examples is not None and len(examples) > config.max_examples:
        examples = random.Random(seed).sample(examples, config.max_examples)
    train, val = split_train_val(examples, config.val_frac, seed)
    model = add_fresh_adapter(student, config, round_index)
    lam_eff = barrier_weight(config.lam, round_index, config.lam_round_pow)
    trainable = [p for p in model.parameters() if p.requires_grad]
    forward_module = parallel.wrap(model)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    micro_per_epoch = math.ceil(len(train) / config.batch_size)
    micro_per_step = config.grad_accum * parallel.world
    total_steps = math.ceil(micro_per_epoch / micro_per_step) * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(total_steps, config.warmup_frac))
    device = next(model.parameters()).device
    out_dir.mkdir(parents=True, exist_ok=True)
    log: list[dict[str, float]] = []
    logger.info(
        f"heal {name}: {len(train)} train / {len(val)} val, {total_steps} steps, "
        f"{sum(p.numel() for p in trainable):,} trainable, agg={config.agg} tau={config.tau} lam_eff={lam_eff:.3g} "
        f"ref={config.ref}, target={config.target}" + (f", {parallel.world} processes" if parallel.world > 1 else "")
    )
    order_rng = random.Random(seed)
    cache = ReferenceCache(config.ref_cache_mb * 2**20)
    step_state = _StepState(model, forward_module, optimizer, trainable, cache, parallel)
    log_path = out_dir / "train_log.csv" if parallel.is_main else Path(os.devnull)
    bar = tqdm(total=total_steps, desc=name, disable=not parallel.is_main)
    with log_path.open("w", newline="") as handle, bar:
        writer = csv.DictWriter(handle, fieldnames=log_fields(config))
        writer.writeheader()
        step = 0
        for epoch in range(config.epochs):
            model.train()
            order = order_rng.sample(range(len(train)), len(train))
            chunks = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
            batches = [(ids, *_micro_batch([train[i] for i in ids], tokenizer.pad_token_id, device)) for ids in chunks]
            for first in range(0, len(batches), micro_per_step):
                group = batches[first : first + micro_per_step]
                row = _optimizer_step(step_state, group, config, lam_eff, name, step, epoch)
                scheduler.step()
                writer.writerow(row)
                handle.flush()
                log.append(row)
                bar.update(1)
                bar.set_postfix(nll=f"{row['nll']:.3f}", kl_rmse=f"{row['kl_rmse']:.3f}", bar=f"{row['barrier']:.3f}")
                step += 1
    activate(model, adapter_names(model), trainable=None)
    val_metrics = validate(model, val, config, name, tokenizer.pad_token_id) if parallel.is_main else {}
    if val_metrics:
        logger.info("heal validation: " + ", ".join(f"{k}={v:.4f}" for k, v in val_metrics.items()))
    model.eval()
    if parallel.is_main:
        save_adapter(model, name, out_dir / "adapter")
    parallel.wait()
    return HealResult(model, name, out_dir / "adapter", log, val_metrics, lam_eff, parallel.is_main)


@dataclass(frozen=True)
class _StepState:
    model: PeftModel  # the peft model itself: adapter switches and the reference forward
    forward_module: nn.Module  # what training forwards run through (DDP-wrapped under several processes)
    optimizer: torch.optim.Optimizer
    trainable: list[torch.nn.Parameter]
    cache: ReferenceCache
    parallel: DataParallel


def _optimizer_step(
    state: _StepState,
    group: list[tuple[list[int], PaddedBatch, TeacherRows | None]],
    config: HealConfig,
    lam_eff: float,
    name: str,
    step: int,
    epoch: int,
) -> dict[str, float]:
    """One optimizer step over `group`'s micro-batches, each weighted 1/len(group) in the averaged gradient."""
    state.optimizer.zero_grad(set_to_none=True)
    parallel = state.parallel
    mine = share_of_step(len(group), parallel.world, parallel.rank)
    # DDP averages gradients over processes, so a micro-batch weighs world/len(group) on its own process. A
    # process with no micro-batch left in a short final step still joins the all-reduce with a zero weight.
    work = [(index, parallel.world / len(group)) for index in mine] or [(0, 0.0)]
    parts = []
    for position, (index, weight) in enumerate(work):
        example_ids, batch, teacher = group[index]
        ref_log_probs = state.cache.lookup(example_ids, batch.input_ids.device)
        if ref_log_probs is None:
            ref_log_probs = reference_log_probs(state.model, batch, config, name)
            state.cache.store(example_ids, batch, ref_log_probs)
        with parallel.gradient_sync(state.forward_module, sync=position == len(work) - 1):
            part = batch_loss(
                state.forward_module, batch, config, lam_eff, name, ref_log_probs=ref_log_probs, teacher=teacher
            )
            if not torch.isfinite(part.loss):
                raise HealError(
                    f"non-finite loss at step {step} (epoch {epoch}): nll={part.nll}, barrier={part.barrier}"
                )
            (part.loss * weight).backward()
        if weight > 0:
            parts.append(part)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(state.trainable, config.max_grad_norm))
    if not math.isfinite(grad_norm):
        raise HealError(f"non-finite gradient norm at step {step} (epoch {epoch}); nothing was saved")
    lr = state.optimizer.param_groups[0]["lr"]
    state.optimizer.step()
    means = _step_means(parts, parallel, group[0][1].input_ids.device, config)
    return {"step": step, "epoch": epoch, **means, "grad_norm": grad_norm, "lr": lr}


_PART_FIELDS = ("nll", "kl_mean", "kl_rmse", "kl_p95", "kl_max", "barrier")


def _part_fields(config: HealConfig) -> tuple[str, ...]:
    return (*_PART_FIELDS, "teacher_ce") if config.target == "logits" else _PART_FIELDS


def _step_means(
    parts: list[LossParts], parallel: DataParallel, device: torch.device, config: HealConfig
) -> dict[str, float]:
    """Means over every process's micro-batches of the step (sums and counts all-reduced)."""
    fields = _part_fields(config)
    rows = [[*(getattr(p, f) for f in fields), float(p.barrier_active), p.loss.item(), 1.0] for p in parts]
    width = len(fields) + 3
    sums = torch.tensor(rows, dtype=torch.float64).sum(0) if rows else torch.zeros(width, dtype=torch.float64)
    totals = parallel.sum(sums.to(device)).cpu()
    means = (totals[:-1] / totals[-1]).tolist()
    n = len(fields)
    return {**dict(zip(fields, means[:n], strict=True)), "barrier_active_frac": means[n], "loss": means[n + 1]}
