"""Drafted paired items: the pairing rule, and the `pairs` / `check-axis` commands on the tiny model."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cli import app
from interp_heal.filter import CompletionScores, ScoredCompletion
from interp_heal.generate import Completion
from interp_heal.pair_drafting import closest_in_length
from interp_heal.paired_items import load_items_file

runner = CliRunner()
SCORES = CompletionScores(0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0)


def _reply(n_tokens: int, finish: str = "eos") -> ScoredCompletion:
    completion = Completion("q", "x " * n_tokens, 0.0, list(range(n_tokens)), finish, 0)
    return ScoredCompletion(completion, SCORES, [], 0.0, 0)


def test_pairing_prefers_finished_replies_then_equal_length():
    pos = [_reply(10), _reply(30), _reply(21, "length")]
    neg = [_reply(20), _reply(40)]
    assert closest_in_length(pos, neg) == (1, 1)  # 30 vs 40 (25% apart) beats 10 vs 20; 21 vs 20 was cut
    assert closest_in_length([_reply(21, "length")], neg) == (0, 0)  # only cut replies left: still paired
    assert closest_in_length([], neg) is None and closest_in_length(pos, []) is None


def test_pairs_command_drafts_a_file_the_readout_accepts(tmp_path):
    scenarios = tmp_path / "scenarios.txt"
    scenarios.write_text("".join(f"Tell me about day {i} of your week.\n" for i in range(14)))
    out = tmp_path / "drafted.jsonl"
    args = ["pairs", "-c", "configs/smoke.yaml", "-o", str(out), "--scenarios", str(scenarios), "--samples", "2"]
    result = runner.invoke(app, [*args, "--set", "generate.batch_size=28"])
    assert result.exit_code == 0, result.output
    items = load_items_file(out, "love").items  # wide-open smoke filter: every scenario keeps a pair
    assert len(items) == 14 and items[0].id == "love-draft-001"
    assert [item.scenario for item in items] == scenarios.read_text().splitlines()
    preview = out.with_suffix(".md").read_text()
    assert "hand-written items are the stronger test" in preview and items[0].scenario in preview


def test_check_axis_command_exits_1_with_a_table_when_not_expressible(tmp_path):
    out = tmp_path / "check.json"
    result = runner.invoke(app, ["check-axis", "-c", "configs/smoke.yaml", "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert "NOT EXPRESSIBLE" in result.output and "placebo pair" in result.output
    assert json.loads(out.read_text())["verdict"] == "not expressible"
