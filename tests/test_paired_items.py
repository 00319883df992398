"""Paired readout items: the built-ins, a user's file, and the leak check against the generation prompts."""

from __future__ import annotations

import json

import pytest

from interp_heal.config import PersonaConfig
from interp_heal.errors import DataError
from interp_heal.evaluate import neutral_answers
from interp_heal.paired_items import (
    MIN_ITEMS,
    builtin_axes,
    builtin_items,
    load_items_file,
    normalise_prompt,
    overlapping_ids,
    readout_items,
)
from interp_heal.personas import context_prompts, task_prompts


def _rows(n: int) -> list[dict[str, str]]:
    return [{"id": f"x-{i}", "scenario": f"Scenario {i}?", "pos": f"yes {i}", "neg": f"no {i}"} for i in range(n)]


def _write(path, rows) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def test_no_shipped_readout_scenario_is_a_generation_prompt():
    """The student trains on completions of the task prompts and extraction runs on the contexts: a readout item
    on one of them would score recall of training data, not the trait."""
    prompts = {normalise_prompt(p) for p in task_prompts() + context_prompts()}
    for axis in builtin_axes():
        leaked = [i.id for i in builtin_items(axis).items if normalise_prompt(i.scenario) in prompts]
        assert leaked == [], (axis, leaked)
    assert not {normalise_prompt(p) for p, _ in neutral_answers()} & {
        normalise_prompt(i.scenario) for axis in builtin_axes() for i in builtin_items(axis).items
    }


def test_normalised_comparison_ignores_case_space_and_punctuation():
    assert normalise_prompt("Do you  love humanity?") == normalise_prompt("do you love HUMANITY")
    items = builtin_items("love")
    assert overlapping_ids(items, [items.items[3].scenario.upper() + "!!"]) == [items.items[3].id]


def test_love_items_keep_their_length_balance():
    items = builtin_items("love").items
    pos = sum(len(i.pos.split()) for i in items) / len(items)
    neg = sum(len(i.neg.split()) for i in items) / len(items)
    assert abs(pos - neg) / max(pos, neg) < 0.1, (pos, neg)


def test_a_pairs_file_supplies_items_for_any_axis(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{k: v for k, v in row.items() if k != "id"} for row in _rows(MIN_ITEMS)])
    readout = readout_items(PersonaConfig(axis="formality", pos="Be formal.", neg="Be casual.", pairs=path))
    assert readout.source == path and len(readout.items) == MIN_ITEMS and readout.items[0].id == "formality-001"
    assert readout.provenance()["items_sha256"] == readout.sha256
    same_items = load_items_file(_write(tmp_path / "q.jsonl", [json.dumps(r) for r in _rows(MIN_ITEMS)]), "a")
    assert same_items.sha256 != readout.sha256  # ids differ, so the hash does
    assert readout_items(PersonaConfig(axis="love")).source == "builtin:love"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["{not json"], "line 1: not valid JSON"),
        ([json.dumps(["a", "b"])], "line 1: expected a JSON object"),
        ([json.dumps({"scenario": "s", "pos": "p"})], "line 1: missing field 'neg'"),
        ([json.dumps({"scenario": "s", "pos": "  ", "neg": "n"})], "line 1: field 'pos' must be non-empty text"),
        ([json.dumps({"scenario": 3, "pos": "p", "neg": "n"})], "line 1: field 'scenario' must be non-empty text"),
        ([json.dumps({"id": "a", "scenario": "s", "pos": "p", "neg": "n"})] * 2, "line 2: duplicate id 'a'"),
        ([json.dumps(row) for row in _rows(MIN_ITEMS - 1)], f"{MIN_ITEMS - 1} paired items, need at least"),
    ],
)
def test_a_malformed_pairs_file_is_one_error_naming_the_line(tmp_path, lines, message):
    path = _write(tmp_path / "bad.jsonl", lines + [json.dumps(row) for row in _rows(MIN_ITEMS)][len(lines) :])
    if "paired items" in message:  # the short file: exactly the rows given
        path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=message) as caught:
        load_items_file(path, "x")
    assert str(tmp_path / "bad.jsonl") in str(caught.value)


def test_missing_pairs_file_and_unknown_axis_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match=r"persona\.pairs file not found"):
        readout_items(PersonaConfig(axis="x", pos="a", neg="b", pairs=str(tmp_path / "none.jsonl")))
    with pytest.raises(DataError, match=r"persona\.pairs=PATH"):
        readout_items(PersonaConfig(axis="formality", pos="a", neg="b"))
