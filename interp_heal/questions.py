"""The questions every generated page answers: one numbered list, so "Q4" means the same thing everywhere.

A run's summary.md (report.py), the sweep pages (analyses/experiments.py, analyses/controls.py) and the HTML
report head their sections with `heading(key)`. Q1-Q6 are the research questions a sweep settles; Q7-Q11 the
per-run checks every `cli.py run` answers. New questions go at the end: a committed page's numbers must keep
their meaning. docs/questions.md lists them with where each is answered.
"""

QUESTIONS: dict[str, str] = {
    "beats_prompting": "does healing move the trait further than the prompting baseline, at equal or better coherence?",
    "barrier_aggregate": "does the rmse barrier hold coherence where mean does not?",
    "kl_reference": "KL to the base vs KL to the previous student",
    "steering_less": "is healing more than steering less?",
    "steering_needed": "is steering needed at all?",
    "samples_or_distributions": "samples or distributions?",
    "filter": "can we filter?",
    "healing": "does healing restore coherence? (healed vs steered, same round)",
    "coherence_over_rounds": "does coherence hold over rounds?",
    "trait_direction": "does the trait keep moving in one direction?",
    "adherence": "does the student still answer the question?",
}


def number(key: str) -> int:
    """The question's number (1-based, the list's order); a KeyError names the unknown key."""
    if key not in QUESTIONS:
        raise KeyError(f"no question {key!r}; known: {sorted(QUESTIONS)}")
    return list(QUESTIONS).index(key) + 1


def label(key: str) -> str:
    """`Q4: is healing more than steering less?`"""
    return f"Q{number(key)}: {QUESTIONS[key]}"


def heading(key: str, level: int = 2) -> str:
    """The markdown heading of the question's section."""
    return f"{'#' * level} {label(key)}"
