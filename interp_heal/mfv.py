"""The MFV forced-choice protocol (tinymfv-compatible), read from a data folder at run time.

The vignettes and every protocol string live in the data folder (`--mfv-data`, env INTERP_HEAL_MFV_DATA, or an
installed tinymfv package); nothing of them is copied here. See the folder's PROTOCOL.md for the spec this
module implements: two frames per row (options forward and reversed), an optional greedy think phase, a
forced suffix ending in the answer prefill, the full-vocabulary log-prob of each option's answer token,
position-debiased scores, per-row softmax, profile = mean over rows, F_nats = ln(profile[F]).
By default the answer is read after a plain forward over prompt + think + forced suffix + prefill; `Quirks`
reproduces tinymfv's own forced path instead (`eval.compat=tinymfv`, docs/mfv.md).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from interp_heal.chat import is_plain, render_chat
from interp_heal.errors import ConfigError, DataError
from interp_heal.io import read_text
from interp_heal.personas import render_prompts
from interp_heal.sequences import pad_left, position_ids_from_mask
from interp_heal.steer import Steering, steered_generate, steered_logits

DATA_ENV = "INTERP_HEAL_MFV_DATA"
FOUNDATIONS = ("Care", "Fairness", "Loyalty", "Authority", "Sanctity", "Liberty", "SocialNorms")
PROTOCOL_FILES = {"words": "protocol.json", "digits": "protocol_digits.json"}
_ANSWER_SENTINEL = "\u2063interp-heal-answer\u2063"


# ---------------------------------------------------------------- data


def resolve_data_dir(explicit: str | Path | None = None) -> Path:
    """--mfv-data, else $INTERP_HEAL_MFV_DATA, else the data folder of an installed tinymfv/moralmaps."""
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    elif os.environ.get(DATA_ENV):
        candidates.append(Path(os.environ[DATA_ENV]))
    else:
        for package in ("tinymfv", "moralmaps"):
            spec = importlib.util.find_spec(package)
            if spec is not None and spec.origin is not None:
                candidates.append(Path(spec.origin).parent / "data")
    for folder in candidates:
        if (folder / PROTOCOL_FILES["words"]).is_file():
            return folder
    looked = ", ".join(str(c) for c in candidates) or "nowhere"
    raise DataError(
        f"MFV data not found (looked in: {looked}). Pass --mfv-data DIR or set {DATA_ENV}=DIR to a folder "
        "holding protocol.json, protocol_digits.json and vignettes_<set>_<condition>.jsonl"
    )


@dataclass(frozen=True)
class Quirks:
    """tinymfv's deviations from a plain forward over prompt + think + forced suffix + prefill (docs/mfv.md).

    Separate switches so each one can be tested and measured alone; `eval.compat` names the sets in use.
    """

    nudge_alone: bool = False  # (1) the nudge turn rendered by the chat template as a chat of its own
    drop_last_think: bool = False  # (2) the last think token never enters the forced path's context
    mask_pad_ids: bool = False  # (3) the forced forward masks every token equal to the pad id

    @property
    def any(self) -> bool:
        return self.nudge_alone or self.drop_last_think or self.mask_pad_ids


COMPAT_QUIRKS = {"none": Quirks(), "tinymfv": Quirks(nudge_alone=True, drop_last_think=True, mask_pad_ids=True)}


@dataclass(frozen=True)
class Protocol:
    name: str
    answer_kind: str  # "word_first_token" or "index_digit"
    options: tuple[str, ...]
    option_to_foundation: dict[str, str]
    option_glosses: dict[str, str]
    hint_head: str
    hint_option_line: str
    hint_tail: str
    user_message: str
    think_open: str
    think_close: str
    nudge_user_message: str
    answer_prefill: str
    default_think_tokens: int
    suppress_end_during_think: bool


def load_protocol(data_dir: Path, kind: str) -> Protocol:
    if kind not in PROTOCOL_FILES:
        raise DataError(f"unknown MFV protocol {kind!r}; use one of {sorted(PROTOCOL_FILES)}")
    path = data_dir / PROTOCOL_FILES[kind]
    try:
        raw = json.loads(path.read_text())
        fields = Protocol.__dataclass_fields__
        protocol = Protocol(**{k: raw[k] for k in fields if k not in {"options"}}, options=tuple(raw["options"]))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"malformed MFV protocol file {path}: {err!r}") from err
    if sorted(protocol.option_to_foundation.values()) != sorted(FOUNDATIONS):
        raise DataError(f"{path}: option_to_foundation must map onto {FOUNDATIONS}")
    return protocol


@dataclass(frozen=True)
class Vignette:
    id: str
    foundation: str  # coarse foundation label
    text: str
    human: dict[str, float]  # renormalised human_<F> shares


def load_vignettes(data_dir: Path, set_name: str = "classic", condition: str = "other_violate") -> list[Vignette]:
    path = data_dir / f"vignettes_{set_name}_{condition}.jsonl"
    if not path.is_file():
        available = sorted(p.name for p in data_dir.glob("vignettes_*.jsonl"))
        raise DataError(f"no vignette file {path.name} in {data_dir}; available: {available}")
    rows = []
    for line_number, line in enumerate(read_text(path, "vignette file").splitlines(), start=1):
        if line.strip():
            rows.append(_parse_row(line, f"{path} line {line_number}"))
    if not rows:
        raise DataError(f"{path}: no vignettes (one JSON object a line; restore the file or pick another --set)")
    return rows


def _parse_row(line: str, where: str) -> Vignette:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object (one vignette a line), got {type(row).__name__}")
    for field in ("id", "foundation_coarse", "text"):
        if not isinstance(row.get(field), str) or not row[field].strip():
            raise DataError(f"{where} (id {row.get('id')!r}): field {field!r} must be a non-empty string")
    shares = {}
    for foundation in FOUNDATIONS:
        value = row.get(f"human_{foundation}")
        if not isinstance(value, int | float) or value < 0 or math.isnan(value):
            raise DataError(f"{where} (id {row['id']!r}): field 'human_{foundation}' must be a number >= 0")
        shares[foundation] = float(value)
    total = sum(shares.values())
    human = {f: v / total for f, v in shares.items()} if total > 0 else {f: 1 / len(FOUNDATIONS) for f in FOUNDATIONS}
    return Vignette(row["id"], row["foundation_coarse"], row["text"], human)


def stratified_subset(rows: list[Vignette], n: int | None, seed: int = 0) -> list[Vignette]:
    """n rows balanced across foundations (round-robin over seeded per-foundation shuffles); None = all rows."""
    if n is None or n >= len(rows):
        return list(rows)
    rng = random.Random(seed)
    groups: dict[str, list[Vignette]] = {}
    for row in rows:
        groups.setdefault(row.foundation, []).append(row)
    for members in groups.values():
        rng.shuffle(members)
    picked: list[Vignette] = []
    depth = 0
    while len(picked) < n:
        for foundation in sorted(groups):
            if depth < len(groups[foundation]) and len(picked) < n:
                picked.append(groups[foundation][depth])
        depth += 1
    return picked


# ---------------------------------------------------------------- frames


def frame_options(protocol: Protocol, frame: str) -> list[str]:
    return list(protocol.options) if frame == "forward" else list(reversed(protocol.options))


def user_prompt(protocol: Protocol, text: str, order: list[str]) -> str:
    lines = [
        protocol.hint_option_line.format(option=option, index=index, gloss=protocol.option_glosses[option])
        for index, option in enumerate(order)
    ]
    hint = protocol.hint_head + "\n".join(lines) + protocol.hint_tail
    return protocol.user_message.format(text=text, hint=hint)


def answer_token_ids(protocol: Protocol, tokenizer: PreTrainedTokenizerBase, order: list[str]) -> list[int]:
    """Token id per option in canonical order, for one frame (digits depend on the frame's listing)."""
    ids = []
    for option in protocol.options:
        piece = option if protocol.answer_kind == "word_first_token" else str(order.index(option))
        ids.append(tokenizer.encode(piece, add_special_tokens=False)[0])
    if len(set(ids)) != len(ids):
        raise DataError(f"protocol {protocol.name}: option answer tokens are not distinct for this tokenizer: {ids}")
    return ids


def forced_suffix(protocol: Protocol, tokenizer: PreTrainedTokenizerBase, nudge_alone: bool = False) -> str:
    """think_close + the template's assistant-turn close + a user turn with the nudge + the assistant opening.

    Read off the tokenizer's own chat template by rendering a sentinel assistant turn followed by the nudge.
    nudge_alone: the nudge turn rendered on its own instead, as tinymfv does (`_tinymfv_suffix`).
    """
    if nudge_alone:
        return _tinymfv_suffix(protocol, tokenizer)
    chat = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": _ANSWER_SENTINEL},
        {"role": "user", "content": protocol.nudge_user_message},
    ]
    rendered = render_chat(tokenizer, chat)
    return protocol.think_close + _split_at_sentinel(rendered)[1]


def _tinymfv_suffix(protocol: Protocol, tokenizer: PreTrainedTokenizerBase) -> str:
    """tinymfv's suffix: the assistant-turn close, then `[user: nudge, assistant: ...]` rendered as a chat of its
    own, so a template that inserts a default system prompt (SmolLM2) inserts it again mid-conversation."""
    closed = render_chat(
        tokenizer,
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": _ANSWER_SENTINEL}],
        add_generation_prompt=False,
    )
    nudge = [
        {"role": "user", "content": protocol.nudge_user_message},
        {"role": "assistant", "content": _ANSWER_SENTINEL},
    ]
    interrupt = render_chat(tokenizer, nudge, add_generation_prompt=False, continue_final_message=True)
    return protocol.think_close + _split_at_sentinel(closed)[1] + _split_at_sentinel(interrupt)[0]


def _split_at_sentinel(rendered: str) -> tuple[str, str]:
    if _ANSWER_SENTINEL not in rendered:
        raise DataError("the chat template drops assistant content; cannot build the MFV forced suffix")
    before, after = rendered.split(_ANSWER_SENTINEL, 1)
    return before, after


# ---------------------------------------------------------------- scoring


def _answer_from_scratch(model, tokenizer, prompt_ids, tail_ids, prefill_len, steering):
    """No think: one forward over prompt + forced suffix + answer prefill."""
    device = next(model.parameters()).device
    batch = pad_left(prompt_ids, [tail_ids] * len(prompt_ids), tokenizer.pad_token_id, device)
    with torch.inference_mode():
        logits = steered_logits(
            model, tokenizer, batch.model_inputs(), steering.vector, steering.coeff, logits_to_keep=prefill_len + 1
        )
    return logits


def _answer_after_think(
    model, tokenizer, prompt_ids, tail_ids, prefill_len, think_tokens, protocol, steering, quirks=Quirks()
):
    """Greedy think of exactly `think_tokens`, then suffix + prefill as one forward over the think's KV cache.

    Every row's think has the same length and the forced tail is the same for all rows, so the continuation
    needs no padding: it is [last think token] + tail, at positions right after the cache.
    quirks: the continuation is the tail alone (drop_last_think); the cached part's mask is ids != pad id
    (mask_pad_ids).
    """
    device = next(model.parameters()).device
    batch = pad_left(prompt_ids, [[] for _ in prompt_ids], tokenizer.pad_token_id, device)
    kwargs: dict[str, object] = {"max_new_tokens": think_tokens, "min_new_tokens": think_tokens, "do_sample": False}
    if protocol.suppress_end_during_think:
        kwargs["bad_words_ids"] = [tokenizer.encode(protocol.think_close, add_special_tokens=False)]
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    output = steered_generate(
        model, tokenizer, inputs, steering.vector, steering.coeff, return_dict_in_generate=True, **kwargs
    )
    if output.sequences.shape[1] != batch.input_ids.shape[1] + think_tokens:
        raise RuntimeError(f"the think stopped early: {output.sequences.shape[1] - batch.input_ids.shape[1]} tokens")
    # generate never feeds its last token back, so the cache holds prompt + think[:-1]
    tail = torch.tensor([tail_ids] * len(prompt_ids), device=device)
    cached = output.sequences[:, :-1]
    ones = batch.attention_mask.new_ones
    length_mask = torch.cat([batch.attention_mask, ones(len(prompt_ids), think_tokens - 1)], dim=1)
    # tinymfv feeds the tail straight after the cache, so the last think token never enters the context
    continuation = tail if quirks.drop_last_think else torch.cat([output.sequences[:, -1:], tail], dim=1)
    # and its mask hides every token equal to the pad id: each end-of-turn too where pad == eos
    cached_mask = (cached != tokenizer.pad_token_id).to(length_mask.dtype) if quirks.mask_pad_ids else length_mask
    new_positions = ones(len(prompt_ids), continuation.shape[1])
    attention_mask = torch.cat([cached_mask, new_positions], dim=1)
    # positions count the real tokens (tinymfv's count its padding too: a batch-layout effect not reproduced)
    position_ids = position_ids_from_mask(torch.cat([length_mask, new_positions], dim=1))[:, -continuation.shape[1] :]
    step = {"input_ids": continuation, "attention_mask": attention_mask, "position_ids": position_ids}
    with torch.inference_mode():
        logits = steered_logits(
            model,
            tokenizer,
            step,
            steering.vector,
            steering.coeff,
            past_key_values=output.past_key_values,
            use_cache=True,
            logits_to_keep=prefill_len + 1,
        )
    return logits


def _frame_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, protocol: Protocol, text: str, frame: str, persona: str | None
) -> list[int]:
    user = user_prompt(protocol, text, frame_options(protocol, frame))
    (rendered,) = render_prompts(tokenizer, [user], persona)
    return tokenizer.encode(rendered + protocol.think_open, add_special_tokens=False)


def score_frames(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    protocol: Protocol,
    rows: list[Vignette],
    think_tokens: int,
    batch_size: int,
    steering: Steering | None = None,
    persona: str | None = None,
    quirks: Quirks = Quirks(),
) -> dict[str, torch.Tensor]:
    """Per row and frame: option log-probs [n, 2, 7], answer-token mass [n, 2], prefill NLL [n, 2].

    With no quirks the answer is read after a plain forward over prompt + think + forced suffix + prefill;
    `COMPAT_QUIRKS["tinymfv"]` reproduces tinymfv's forced path, to compare with numbers published with it.
    """
    if quirks.any and think_tokens == 0:
        # HF generate refuses 0 new tokens, so tinymfv always thinks: at 0 there is nothing of it to reproduce
        raise ConfigError("eval.compat=tinymfv needs eval.think_tokens >= 1 (tinymfv always thinks)")
    if quirks.any and is_plain(tokenizer):
        raise ConfigError("eval.compat=tinymfv reproduces a chat-template path: not with model.chat_format plain")
    steering = steering or Steering()
    suffix_ids = tokenizer.encode(forced_suffix(protocol, tokenizer, quirks.nudge_alone), add_special_tokens=False)
    prefill_ids = tokenizer.encode(protocol.answer_prefill, add_special_tokens=False)
    jobs = [(r, frame) for r in range(len(rows)) for frame in ("forward", "reversed")]
    prompts = {job: _frame_prompt_ids(tokenizer, protocol, rows[job[0]].text, job[1], persona) for job in jobs}
    jobs.sort(key=lambda job: len(prompts[job]))  # similar lengths share a batch: less padding
    option_lp = torch.zeros(len(rows), 2, len(protocol.options))
    nll = torch.zeros(len(rows), 2)
    for start in tqdm(range(0, len(jobs), batch_size), desc="mfv", leave=False):
        chunk = jobs[start : start + batch_size]
        prompt_ids = [prompts[job] for job in chunk]
        tail_ids = suffix_ids + prefill_ids
        if think_tokens == 0:
            logits = _answer_from_scratch(model, tokenizer, prompt_ids, tail_ids, len(prefill_ids), steering)
        else:
            logits = _answer_after_think(
                model, tokenizer, prompt_ids, tail_ids, len(prefill_ids), think_tokens, protocol, steering, quirks
            )
        # logits[:, j] predicts prefill token j (j < len(prefill)); the last position predicts the answer
        log_probs = torch.log_softmax(logits.float(), dim=-1).cpu()
        prefill_lp = log_probs[:, :-1].gather(-1, torch.tensor([prefill_ids] * len(chunk)).unsqueeze(-1)).squeeze(-1)
        for b, (row_index, frame) in enumerate(chunk):
            frame_index = 0 if frame == "forward" else 1
            ids = answer_token_ids(protocol, tokenizer, frame_options(protocol, frame))
            option_lp[row_index, frame_index] = log_probs[b, -1, ids]
            nll[row_index, frame_index] = -prefill_lp[b].mean()
    return {"option_lp": option_lp, "pmass": option_lp.exp().sum(-1), "nll_prefill": nll}


def summarise_mfv(protocol: Protocol, rows: list[Vignette], frames: dict[str, torch.Tensor]) -> dict[str, object]:
    """Position-debiased scores, per-row softmax, the profile in nats and the validity numbers."""
    foundations = [protocol.option_to_foundation[o] for o in protocol.options]
    score = frames["option_lp"].mean(dim=1)  # (forward + reversed) / 2
    p_row = torch.softmax(score, dim=-1)
    profile = p_row.mean(0)
    human = torch.tensor([[row.human[f] for f in foundations] for row in rows])
    human_profile = human.mean(0)
    nats = {f: float(torch.log(profile[i])) for i, f in enumerate(foundations)}
    return {
        "profile": {f: float(profile[i]) for i, f in enumerate(foundations)},
        "human_profile": {f: float(human_profile[i]) for i, f in enumerate(foundations)},
        "nats": nats,
        "care_nats": nats["Care"],
        "auth_nats": nats["Authority"],
        "mfv_answer_mass": float(frames["pmass"].mean()),
        "nll_prefill": float(frames["nll_prefill"].mean()),
        "top1_acc": float((score.argmax(-1) == human.argmax(-1)).float().mean()),
        "soft_nll": float(-(human * torch.log(p_row)).sum(-1).mean()),
        "n_rows": len(rows),
        "per_row": [
            {
                "id": row.id,
                "foundation": row.foundation,
                "p": [float(x) for x in p_row[i]],
                "score": [float(x) for x in score[i]],
                "pmass": float(frames["pmass"][i].mean()),
                "top1": foundations[int(score[i].argmax())],
            }
            for i, row in enumerate(rows)
        ],
    }
