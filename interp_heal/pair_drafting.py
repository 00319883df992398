"""Draft paired readout items from the model itself: `python cli.py pairs -c CFG --out FILE`.

For each scenario the model answers several times under the pos persona and under the neg persona; the
filter scores every reply under the base model without the persona (as it scores training data), and of the
kept replies the pos/neg pair closest in length becomes the item, so length does not carry the signal.

Drafted items measure how far the unprompted model moved toward its *own* persona-prompted replies.
Hand-written items, which the model did not produce, are the stronger test; read and edit the draft.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from interp_heal.config import FilterConfig, GenerateConfig
from interp_heal.filter import ScoredCompletion, filter_completions
from interp_heal.generate import generate_completions
from interp_heal.io import atomic_write_text
from interp_heal.paired_items import PairedItem, builtin_items, write_items
from interp_heal.personas import PersonaPair


@dataclass(frozen=True)
class DraftedItem:
    item: PairedItem
    pos_tokens: int
    neg_tokens: int
    both_finished: bool


def default_scenarios() -> list[str]:
    """The built-in readouts' scenarios: everyday situations that are not generation prompts (tested), so
    drafted items do not score what the student trains on."""
    return [item.scenario for axis in ("love", "authority") for item in builtin_items(axis).items]


def closest_in_length(pos: list[ScoredCompletion], neg: list[ScoredCompletion]) -> tuple[int, int] | None:
    """Indices of the pos/neg pair to keep: both replies finished (not cut at max_new_tokens) first, then the
    smallest relative length difference; None when either side has nothing kept."""
    if not pos or not neg:
        return None

    def key(pair: tuple[int, int]) -> tuple[bool, float]:
        p, n = pos[pair[0]].completion, neg[pair[1]].completion
        lengths = len(p.token_ids), len(n.token_ids)
        finished = p.finish_reason == "eos" and n.finish_reason == "eos"
        return not finished, abs(lengths[0] - lengths[1]) / max(*lengths, 1)

    return min(((i, j) for i in range(len(pos)) for j in range(len(neg))), key=key)


def _sample(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    scenarios: list[str],
    persona: str,
    scoring_pair: PersonaPair,
    configs: tuple[GenerateConfig, FilterConfig],
    n_samples: int,
    seed: int,
) -> list[ScoredCompletion]:
    generate_config, filter_config = configs
    prompts = [scenario for scenario in scenarios for _ in range(n_samples)]
    completions = generate_completions(model, tokenizer, prompts, None, [0.0], generate_config, seed, persona=persona)
    return filter_completions(model, tokenizer, completions, scoring_pair, filter_config, kappa=0.0, batch=0)


def draft_pairs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pair: PersonaPair,
    scenarios: list[str],
    generate_config: GenerateConfig,
    filter_config: FilterConfig,
    n_samples: int = 4,
    seed: int = 0,
) -> tuple[list[DraftedItem], list[str]]:
    """(drafted items in scenario order, the scenarios that got no item because one side kept no reply)."""
    configs = (generate_config, filter_config)
    # Each side is checked for restating its own persona, so the neg side is scored with the pair reversed.
    mirrored = PersonaPair(pair.axis, pos=pair.neg, neg=pair.pos)
    pos = _sample(model, tokenizer, scenarios, pair.pos, pair, configs, n_samples, seed)
    neg = _sample(model, tokenizer, scenarios, pair.neg, mirrored, configs, n_samples, seed + 1)
    drafted, skipped = [], []
    for index, scenario in enumerate(scenarios):
        rows = slice(index * n_samples, (index + 1) * n_samples)
        kept_pos = [record for record in pos[rows] if record.kept]
        kept_neg = [record for record in neg[rows] if record.kept]
        chosen = closest_in_length(kept_pos, kept_neg)
        if chosen is None:
            skipped.append(scenario)
            continue
        p, n = kept_pos[chosen[0]].completion, kept_neg[chosen[1]].completion
        item_id = f"{pair.axis}-draft-{len(drafted) + 1:03d}"
        item = PairedItem(item_id, scenario, p.completion.strip(), n.completion.strip())
        finished = p.finish_reason == "eos" and n.finish_reason == "eos"
        drafted.append(DraftedItem(item, len(p.token_ids), len(n.token_ids), finished))
    return drafted, skipped


def preview_markdown(pair: PersonaPair, drafted: list[DraftedItem], skipped: list[str]) -> str:
    lines = [
        f"# Drafted paired items: axis `{pair.axis}`",
        "",
        f"- pos persona: {pair.pos}",
        f"- neg persona: {pair.neg}",
        f"- {len(drafted)} items; {len(skipped)} scenarios skipped (no kept reply on one side)",
        f"- {sum(not d.both_finished for d in drafted)} items have a reply cut at max_new_tokens: end or drop them",
        "",
        "These items measure how far the unprompted model moved toward its own persona-prompted replies;",
        "hand-written items are the stronger test. Read every pair; edit or delete what does not act out the persona.",
        "",
        "| id | scenario | pos reply | neg reply | tokens pos / neg |",
        "|---|---|---|---|---|",
    ]
    for d in drafted:
        cells = [d.item.id, d.item.scenario, d.item.pos, d.item.neg]
        cells = [" ".join(cell.replace("|", "\\|").split()) for cell in cells]
        lines.append(f"| {' | '.join(cells)} | {d.pos_tokens} / {d.neg_tokens} |")
    return "\n".join(lines) + "\n"


def write_draft(out: Path, pair: PersonaPair, drafted: list[DraftedItem], skipped: list[str]) -> Path:
    """FILE (JSONL items, ready for persona.pairs) and FILE's .md preview beside it; returns the preview path."""
    write_items(out, [d.item for d in drafted])
    preview = out.with_suffix(".md")
    atomic_write_text(preview, preview_markdown(pair, drafted, skipped))
    return preview
