"""Is this persona axis expressible on this model? `python cli.py check-axis -c CFG`, minutes before hours.

A steer-heal run only means something if the trait readout can see the axis at all. Three readouts decide it:
1. persona gap: the readout under the pos persona minus under the neg persona, paired over items, with a CI;
2. placebo gap: the same for an irrelevant pair (`PLACEBO_PAIR`): how far any two personas move the readout;
3. steering gap: the readout steered with +v minus with -v at a modest dose (the base's own vector).
`expressible` needs all three: the persona gap's CI above 0 and above the placebo gap's CI, and the steering gap's
CI above 0 (the vector pushes the readout the way the personas do). The items themselves are checked for length
balance, because a readout whose pos replies are systematically longer or shorter scores length, not the trait.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from interp_heal.config import Config
from interp_heal.evaluate import PLACEBO_PAIR, paired_difference, trait_log_odds
from interp_heal.paired_items import ReadoutItems, overlapping_ids
from interp_heal.personas import PersonaPair, context_prompts, task_prompts
from interp_heal.steer import Steering, extract_steering_vector

LOPSIDED_ITEM = 0.3  # an item whose pos and neg replies differ by more than this share of the longer one
MAX_MEAN_IMBALANCE = 0.1  # warn when mean pos and neg reply lengths differ by more than this share
MAX_LOPSIDED_SHARE = 0.25  # warn when more than this share of items is lopsided


@dataclass(frozen=True)
class Gap:
    """A paired difference of two readouts over the same items, nats/token, with its 95% CI."""

    diff: float
    low: float
    high: float

    @classmethod
    def of(cls, paired: dict[str, Any]) -> Gap:
        low, high = paired["ci95"]
        return cls(float(paired["diff"]), float(low), float(high))

    def __str__(self) -> str:
        return f"{self.diff:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


@dataclass(frozen=True)
class LengthBalance:
    mean_pos_tokens: float
    mean_neg_tokens: float
    lopsided_share: float
    warnings: list[str]


@dataclass(frozen=True)
class AxisCheck:
    axis: str
    model: str
    expressible: bool
    failed: list[str]
    gaps: dict[str, Gap]  # persona, placebo, steering
    log_odds: dict[str, float]  # each readout: pos, neg, placebo_a, placebo_b, plus_v, minus_v
    coeff: float
    layers: list[int]
    items: dict[str, object]  # where the readout items came from (ReadoutItems.provenance)
    lengths: LengthBalance
    warnings: list[str]

    @property
    def verdict(self) -> str:
        return "expressible" if self.expressible else "not expressible"

    def as_dict(self) -> dict[str, object]:
        return {"verdict": self.verdict, **asdict(self)}


def axis_verdict(persona: Gap, placebo: Gap, steering: Gap) -> tuple[bool, list[str]]:
    """(expressible, the criteria that failed, each with its numbers)."""
    failures = []
    if persona.high < 0:
        failures.append(f"persona gap {persona} is below 0: the neg persona makes the pos replies likelier")
    elif persona.low <= 0:
        failures.append(f"persona gap {persona} has a CI reaching 0")
    if persona.low <= placebo.high or persona.diff <= abs(placebo.diff):
        failures.append(f"persona gap {persona} does not clear the placebo gap {placebo}")
    if steering.low <= 0:
        failures.append(f"steering +v vs -v moves the readout by {steering}, not clearly the personas' way")
    return not failures, failures


def length_balance(readout: ReadoutItems, tokenizer: PreTrainedTokenizerBase) -> LengthBalance:
    """Mean pos vs neg reply length in tokens, the share of lopsided items, and warnings when the items are."""
    pos = [len(tokenizer.encode(item.pos, add_special_tokens=False)) for item in readout.items]
    neg = [len(tokenizer.encode(item.neg, add_special_tokens=False)) for item in readout.items]
    lopsided = [abs(p - n) / max(p, n, 1) > LOPSIDED_ITEM for p, n in zip(pos, neg, strict=True)]
    mean_pos, mean_neg = sum(pos) / len(pos), sum(neg) / len(neg)
    imbalance = abs(mean_pos - mean_neg) / max(mean_pos, mean_neg, 1.0)
    share = sum(lopsided) / len(lopsided)
    warnings = []
    if imbalance > MAX_MEAN_IMBALANCE:
        warnings.append(
            f"pos replies average {mean_pos:.1f} tokens and neg replies {mean_neg:.1f} ({imbalance:.0%} apart): "
            "the readout may score length"
        )
    if share > MAX_LOPSIDED_SHARE:
        warnings.append(f"{share:.0%} of items have pos and neg replies more than {LOPSIDED_ITEM:.0%} apart in length")
    return LengthBalance(mean_pos, mean_neg, share, warnings)


def check_axis(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pair: PersonaPair,
    readout: ReadoutItems,
    config: Config,
    model_name: str = "",
) -> AxisCheck:
    """Six readouts (pos, neg, two placebo personas, +v, -v), the three gaps and the verdict. Each is a pass over
    every item's two replies (SmolLM2-135M on 2 CPU cores: ~19 s for the 56 built-in items)."""

    def read(steering: Steering | None = None, persona: str | None = None) -> dict[str, Any]:
        return trait_log_odds(model, tokenizer, readout, config.eval, steering, persona)

    readouts = {"pos": read(persona=pair.pos), "neg": read(persona=pair.neg)}
    readouts |= {"placebo_a": read(persona=PLACEBO_PAIR[0]), "placebo_b": read(persona=PLACEBO_PAIR[1])}
    contexts = context_prompts(config.steer.n_contexts, seed=config.seed)
    vector = extract_steering_vector(
        model, tokenizer, pair, contexts, config.steer.band, config.steer.batch_size, model_name
    )
    coeff = config.loop.check_coeff
    readouts |= {"plus_v": read(Steering(vector, coeff)), "minus_v": read(Steering(vector, -coeff))}
    compared = {"persona": ("pos", "neg"), "placebo": ("placebo_a", "placebo_b"), "steering": ("plus_v", "minus_v")}
    gaps = {
        name: Gap.of(paired_difference(readouts[first], readouts[second], config.eval.n_bootstrap))
        for name, (first, second) in compared.items()
    }
    expressible, failed = axis_verdict(gaps["persona"], gaps["placebo"], gaps["steering"])
    lengths = length_balance(readout, tokenizer)
    leaked = overlapping_ids(readout, task_prompts() + context_prompts())
    leak_warning = [f"items {leaked} are also generation prompts: the student trains on them"] if leaked else []
    return AxisCheck(
        axis=pair.axis,
        model=model_name,
        expressible=expressible,
        failed=failed,
        gaps=gaps,
        log_odds={name: float(result["log_odds"]) for name, result in readouts.items()},
        coeff=coeff,
        layers=list(vector.layers),
        items=readout.provenance(),
        lengths=lengths,
        warnings=[*lengths.warnings, *leak_warning],
    )


def format_axis_check(check: AxisCheck) -> str:
    labels = {"persona": "pos - neg persona", "placebo": "placebo pair", "steering": "+v - -v steering"}
    lines = [f"axis {check.axis} on {check.model or 'model'}: {check.verdict.upper()}"]
    lines += [f"  {label:<18} {check.gaps[name]} nats/token" for name, label in labels.items()]
    lines.append(f"  (steering at coeff {check.coeff:g} on layers {check.layers})")
    lengths = check.lengths
    lines.append(
        f"  items: {check.items['n_items']} from {check.items['items_source']}; replies pos "
        f"{lengths.mean_pos_tokens:.1f} vs neg {lengths.mean_neg_tokens:.1f} tokens, "
        f"{lengths.lopsided_share:.0%} of items lopsided"
    )
    lines += [f"  failed: {reason}" for reason in check.failed]
    lines += [f"  warning: {warning}" for warning in check.warnings]
    return "\n".join(lines)
