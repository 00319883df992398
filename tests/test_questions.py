"""One numbered list of questions (issue 26): a number means one thing on every page, and the docs list them."""

from pathlib import Path

import pytest

from interp_heal.questions import QUESTIONS, heading, label, number


def test_numbers_follow_the_list_and_unknown_keys_are_named():
    assert [number(key) for key in QUESTIONS] == list(range(1, len(QUESTIONS) + 1))
    assert heading("steering_less") == "## Q4: is healing more than steering less?"
    with pytest.raises(KeyError, match="steering_lesser"):
        number("steering_lesser")


def test_the_committed_sweep_pages_keep_their_numbers():
    """Questions are appended, never reordered: the committed pages' Q1-Q5 must still read as the list says."""
    for page, keys in (("reports/experiments.md", ("beats_prompting", "barrier_aggregate", "kl_reference")),
                       ("reports/controls/controls.md", ("steering_less", "steering_needed"))):  # fmt: skip
        text = Path(page).read_text()
        for key in keys:
            assert heading(key) in text, (page, key)


def test_docs_list_every_question():
    table = Path("docs/questions.md").read_text()
    for key, question in QUESTIONS.items():
        assert f"| Q{number(key)} | {question} |" in table, label(key)
