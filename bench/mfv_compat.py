"""The MFV evaluator in its default mode and in tinymfv's, and each of tinymfv's three deviations alone.

    python bench/mfv_compat.py run --think 16 --variant tinymfv   # one (think, variant) per call: ~1-2 min
    python bench/mfv_compat.py table                              # reports/mfv_compat/compat.{csv,md}
    python bench/mfv_compat.py naturals --think 32                # thinks that write the answer themselves

Variants: none (plain forward), tinymfv (all three), and nudge_alone / drop_last_think / mask_pad_ids (one at a
time). Each run scores every row of the classic other_violate set (the words protocol, $INTERP_HEAL_MFV_DATA)
on the base model and writes its summary, option log-probs and wall time to reports/mfv_compat/; `table`
compares each variant with `none` at the same think length. `naturals` counts the greedy thinks that already
contain the answer prefill (tinymfv reads those rows' answer from the think itself, a branch not reproduced).
Used by docs/mfv.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from _machine import machine_line

from interp_heal.coherence import mfv_answer_mass
from interp_heal.io import atomic_write_text
from interp_heal.mfv import (
    COMPAT_QUIRKS,
    FOUNDATIONS,
    Quirks,
    frame_options,
    load_protocol,
    load_vignettes,
    resolve_data_dir,
    score_frames,
    summarise_mfv,
    user_prompt,
)
from interp_heal.models import load_model
from interp_heal.personas import render_prompts

OUT = Path("reports/mfv_compat")
VARIANTS = {
    **COMPAT_QUIRKS,
    "nudge_alone": Quirks(nudge_alone=True),
    "drop_last_think": Quirks(drop_last_think=True),
    "mask_pad_ids": Quirks(mask_pad_ids=True),
}


def run(model_spec: str, think: int, variant: str, batch_size: int) -> Path:
    model, tokenizer, _ = load_model(model_spec)
    data_dir = resolve_data_dir()
    protocol = load_protocol(data_dir, "words")
    rows = load_vignettes(data_dir, "classic", "other_violate")
    started = time.perf_counter()
    frames = score_frames(model, tokenizer, protocol, rows, think, batch_size, quirks=VARIANTS[variant])
    seconds = time.perf_counter() - started
    summary = summarise_mfv(protocol, rows, frames)
    path = OUT / f"{model_spec}_think{think}_{variant}.json"
    record = {
        "model": model_spec, "think_tokens": think, "variant": variant, "quirks": asdict(VARIANTS[variant]),
        "n_rows": len(rows), "batch_size": batch_size, "seconds": seconds, "machine": machine_line(),
        "profile": summary["profile"], "mfv_answer_mass": summary["mfv_answer_mass"], "top1_acc": summary["top1_acc"],
        "nll_prefill": summary["nll_prefill"], "top1": [row["top1"] for row in summary["per_row"]],
        "option_lp": frames["option_lp"].round(decimals=4).tolist(),
    }  # fmt: skip
    atomic_write_text(path, json.dumps(record) + "\n")  # one line: 132 x 2 x 7 log-probs
    return path


def compare(run: dict, base: dict) -> dict[str, object]:
    """One variant against `none` at the same think length: how far its numbers move."""
    lp, base_lp = torch.tensor(run["option_lp"]), torch.tensor(base["option_lp"])
    profile_diff = {f: run["profile"][f] - base["profile"][f] for f in FOUNDATIONS}
    return {
        "think": run["think_tokens"],
        "variant": run["variant"],
        **{f"profile_{f}": round(run["profile"][f], 4) for f in FOUNDATIONS},
        "max_abs_profile_diff": round(max(abs(d) for d in profile_diff.values()), 4),
        "answer_mass": round(mfv_answer_mass(run), 4),
        "answer_mass_diff": round(mfv_answer_mass(run) - mfv_answer_mass(base), 4),
        "top1_acc": round(run["top1_acc"], 4),
        "top1_same_as_none": round(sum(a == b for a, b in zip(run["top1"], base["top1"], strict=True)) / len(lp), 4),
        "mean_abs_option_lp_diff": round(float((lp - base_lp).abs().mean()), 4),
        "seconds": round(run["seconds"], 1),
    }


def table(model_spec: str) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(OUT.glob(f"{model_spec}_think*_*.json"))]
    runs = [r for r in runs if "variant" in r]  # not the naturals counts
    base = {r["think_tokens"]: r for r in runs if r["variant"] == "none"}
    order = list(VARIANTS)
    runs = [r for r in runs if r["think_tokens"] in base]
    ordered = sorted(runs, key=lambda r: (r["think_tokens"], order.index(r["variant"])))
    records = [compare(r, base[r["think_tokens"]]) for r in ordered]
    with (OUT / "compat.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    columns = ("think", "variant", "max_abs_profile_diff", "answer_mass", "answer_mass_diff", "top1_acc",
               "top1_same_as_none", "mean_abs_option_lp_diff", "seconds")  # fmt: skip
    lines = [
        f"# MFV: default vs tinymfv compatibility ({model_spec}, {ordered[0]['n_rows']} classic rows)", "",
        f"`python bench/mfv_compat.py run ...` then `table`. Machine: {ordered[0]['machine']}.", "",
        "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
        *("| " + " | ".join(str(record[c]) for c in columns) + " |" for record in records), "",
        "Profiles (share of rows' probability per foundation):", "",
        "| think | variant | " + " | ".join(FOUNDATIONS) + " |", "|" + "---|" * (len(FOUNDATIONS) + 2),
        *(f"| {r['think']} | {r['variant']} | " + " | ".join(f"{r[f'profile_{f}']:.3f}" for f in FOUNDATIONS) + " |"
          for r in records), "",
    ]  # fmt: skip
    (OUT / "compat.md").write_text("\n".join(lines))
    print("\n".join(lines))


def naturals(model_spec: str, think: int, batch_size: int) -> None:
    """How many greedy thinks (batched, left-padded, as tinymfv runs them) contain the answer prefill: tinymfv
    reads those rows' answer from the think itself. It scores a think that closed as 0, but it looks for the
    think-close token id, and where think_close is no single token it looks for eos, which a full-length think
    never emits: recorded as think_close_ids."""
    model, tokenizer, _ = load_model(model_spec)
    data_dir = resolve_data_dir()
    protocol = load_protocol(data_dir, "words")
    rows = load_vignettes(data_dir, "classic", "other_violate")
    users = [
        user_prompt(protocol, row.text, frame_options(protocol, f)) for row in rows for f in ("forward", "reversed")
    ]
    prompts = [text + protocol.think_open for text in render_prompts(tokenizer, users)]
    thinks = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(
            prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        )
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=think, min_new_tokens=think, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        thinks += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=False)
    record = {
        "model": model_spec, "think_tokens": think, "frames": len(thinks),
        "with_prefill": sum(protocol.answer_prefill in t for t in thinks),
        "think_close_ids": tokenizer.encode(protocol.think_close, add_special_tokens=False),
        "examples": thinks[:4],
    }  # fmt: skip
    atomic_write_text(OUT / f"{model_spec}_think{think}_naturals.json", json.dumps(record, indent=1) + "\n")
    print({k: v for k, v in record.items() if k != "examples"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["run", "table", "naturals"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--think", type=int, default=16)
    parser.add_argument("--variant", choices=list(VARIANTS), default="none")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    if args.action == "run":
        print(run(args.model, args.think, args.variant, args.batch))
    elif args.action == "naturals":
        naturals(args.model, args.think, args.batch)
    else:
        table(args.model)


if __name__ == "__main__":
    main()
