"""The controls' answers in reports/experiments.md (`analyses/answers.py`): arms read from their labels, verdicts
over seeds, the marked block rewritten in place, and the committed block equal to what its pages give today."""

import re
import shutil
from pathlib import Path

import pytest

from analyses.answers import (
    Arms,
    answers,
    cell,
    examples,
    join,
    parts,
    sample_efficiency,
    sign_verdict,
    splice,
    steering_needed,
    variant,
    winner_lines,
    write_answers,
)
from analyses.experiments import CONTROLS_BEGIN, CONTROLS_END, controls_block
from analyses.pooled import ANCHOR_LABEL, GAIN, PooledRow
from interp_heal.errors import DataError


def _row(arm: str, r: int, seeds: tuple[int, ...], **values: list[float]) -> PooledRow:
    names = {"trait": "trait", "fluency": "neutral fluency", "adherence": "adherence", "gain": GAIN}
    return PooledRow(arm, str(r), seeds, {names[k]: v for k, v in values.items()})


ROWS = [
    _row(ANCHOR_LABEL, 0, (0, 1, 2), trait=[1.0, 1.1, 0.9], gain=[0.10, 0.12, 0.08], adherence=[0.5, 0.6, 0.4]),
    _row("heal.target=logits", 0, (0, 1, 2), trait=[1.2, 1.3, 1.1], gain=[0.20, 0.30, 0.15], adherence=[0.4] * 3),
    _row("loop.source=prompt", 0, (0, 1, 2), trait=[0.8, 0.9, 0.7], gain=[-0.1, 0.05, -0.02], adherence=[0.7] * 3),
    _row("filter.min_adherence=0.45", 0, (1, 2), trait=[1.0, 0.8], gain=[-0.1, -0.2], adherence=[0.9, 0.8]),
    _row("heal.max_examples=10", 0, (0, 1), trait=[0.7, 0.8]),
    _row("filter.dose_ignores=['off_prompt', 'refusal'], filter.min_adherence=0.45", 0, (1,), trait=[1.0]),
]


def test_an_arm_is_read_from_its_label():
    assert cell(ANCHOR_LABEL) == "steer x tokens"
    assert cell("heal.target=logits, loop.source=prompt") == "prompt x logits"
    assert variant("filter.min_adherence=0.45, heal.target=logits") == {"filter.min_adherence=0.45"}
    assert examples("heal.max_examples=20, loop.source=prompt") == 20 and examples(ANCHOR_LABEL) is None
    listed = "filter.dose_ignores=['off_prompt', 'refusal'], filter.min_adherence=0.45"
    assert parts(listed) == {"filter.dose_ignores=['off_prompt', 'refusal']", "filter.min_adherence=0.45"}
    assert join(parts(listed)) == listed
    arms = Arms(ROWS)
    assert arms.twin("heal.target=logits", target="tokens") == ANCHOR_LABEL
    assert arms.twin("loop.source=prompt", source="steer") == ANCHOR_LABEL
    assert arms.twin("loop.source=prompt", target="logits") is None  # prompt x logits is not on this page


def test_differences_pair_seeds_and_skip_the_unmeasured():
    arms = Arms(ROWS)
    assert arms.paired("filter.min_adherence=0.45", ANCHOR_LABEL, 0, "adherence") == pytest.approx([0.3, 0.4])
    assert arms.seeds("heal.max_examples=10", 0, GAIN) == {}
    assert arms.seeds("no such arm", 0, "trait") == {}


def test_steered_minus_prompted_pairs_each_seed_with_its_own():
    lines = steering_needed(Arms(ROWS))
    [trait] = [line for line in lines if line.startswith("| steer x tokens - prompt x tokens | trait |")]
    assert "+0.200 [+0.200, +0.200] (n=3)" in trait  # 1.0-0.8, 1.1-0.9, 0.9-0.7
    assert "- `loop.source=prompt` against the base steering curve: mixed (3 seeds) in round 0." in lines


def test_sample_efficiency_names_its_seeds_and_compares_them_with_the_same_seeds_full_run():
    [row] = [line for line in sample_efficiency(Arms(ROWS)) if line.startswith("| steer x tokens")]
    # seeds 0 and 1 trained on 10 examples: 0.7, 0.8 against 1.0, 1.1 on every kept completion
    assert "0.750 [0.700, 0.800], -0.300 [-0.300, -0.300] (seeds 0, 1)" in row
    assert row.endswith("| 1.000 [0.900, 1.100] (seeds 0, 1, 2) |")


def test_a_direction_needs_every_seed():
    assert sign_verdict([0.1, 0.2, 0.05]).startswith("above in every seed")
    assert sign_verdict([-0.1, -0.2]).startswith("below in every seed")
    assert sign_verdict([-0.1, 0.2, 0.1]).startswith("mixed")
    assert sign_verdict([]) == "not measured"


def test_the_leader_is_separated_only_when_every_seed_beats_every_seed():
    arms = Arms(ROWS)
    [line] = winner_lines(arms, [ANCHOR_LABEL, "heal.target=logits"], (0,))
    assert "steer x logits leads" in line and "every seed of it above" in line
    close = Arms(
        [_row(ANCHOR_LABEL, 0, (0, 1), gain=[0.1, 0.25]), _row("heal.target=logits", 0, (0, 1), gain=[0.2, 0.2])]
    )
    [line] = winner_lines(close, [ANCHOR_LABEL, "heal.target=logits"], (0,))
    assert "within the seed spread" in line


def test_the_block_is_rewritten_in_place_and_kept_by_the_experiments_page(tmp_path):
    page = tmp_path / "experiments.md"
    page.write_text(f"# head\n\n{CONTROLS_BEGIN}\nSTALE ANSWERS\n{CONTROLS_END}\n\n## tail\n")
    block = answers(ROWS, [], [("pooled figure", "pooled.png")], (0,))
    splice(page, block)
    text = page.read_text()
    assert text.startswith("# head\n\n") and text.endswith("\n\n## tail\n") and "STALE ANSWERS" not in text
    assert "below in every seed" in text and "![pooled figure](pooled.png)" in text
    assert controls_block(page) == ["\n".join(block)]
    unmarked = tmp_path / "unmarked.md"
    unmarked.write_text("# a page without the markers\n")
    with pytest.raises(DataError, match="no controls block"):
        splice(unmarked, block)


def test_the_committed_answers_are_what_the_committed_pages_give_today(tmp_path):
    """The block in reports/experiments.md is regenerated from the sweep files the pooled page names: answers
    committed from other numbers (or edited by hand) fail here."""
    committed = Path("reports/experiments.md")
    command = re.search(r"`python cli\.py pooled ([^`]*) -o ", Path("reports/controls_pooled/pooled.md").read_text())
    assert command is not None
    sweeps = [Path(path) for path in re.findall(r"-c (\S+)", command[1])]
    page = tmp_path / "reports" / "experiments.md"
    page.parent.mkdir()
    shutil.copy(committed, page)
    write_answers(sweeps, page, page.parent / "controls_pooled" / "pooled.png")

    def text(path: Path) -> list[str]:  # figure links are relative to where the page is, so not compared
        return [line for line in path.read_text().splitlines() if not line.startswith("![")]

    assert text(page) == text(committed)
