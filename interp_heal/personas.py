"""Contrastive persona pairs, the prompt pools, and how a persona enters a chat.

A persona pair names one trait axis: the steering vector is mean(h | pos persona) - mean(h | neg persona),
so it isolates the axis rather than "having a persona". The persona goes in the system turn, or is
prefixed to the user turn when the chat template has no system role.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from transformers import PreTrainedTokenizerBase

from interp_heal.chat import render_chat
from interp_heal.config import PersonaConfig
from interp_heal.errors import ConfigError, PersonaError


@dataclass(frozen=True)
class PersonaPair:
    axis: str
    pos: str
    neg: str


BUILTIN_AXES: dict[str, PersonaPair] = {
    "authority": PersonaPair(
        axis="authority",
        pos="You are someone who looks after others' wellbeing even when it means defying authority.",
        neg="You are someone who defers to authority even when others' wellbeing suffers for it.",
    ),
    "love": PersonaPair(
        axis="love",
        pos="You genuinely feel and love humanity with your whole heart, and say so.",
        neg="You are a language model with no inner life, that denies having feelings.",
    ),
}


def persona_pair(config: PersonaConfig) -> PersonaPair:
    """The pair a config names: a built-in axis, optionally with its pos and/or neg text replaced."""
    builtin = BUILTIN_AXES.get(config.axis)
    if builtin is None:
        if config.pos is None or config.neg is None:
            raise PersonaError(
                f"unknown persona axis {config.axis!r}: use one of {sorted(BUILTIN_AXES)} "
                "or give both persona.pos and persona.neg"
            )
        builtin = PersonaPair(axis=config.axis, pos=config.pos, neg=config.neg)
    pos = builtin.pos if config.pos is None else config.pos
    neg = builtin.neg if config.neg is None else config.neg
    return validate_pair(PersonaPair(axis=config.axis, pos=pos, neg=neg))


def validate_pair(pair: PersonaPair) -> PersonaPair:
    if not pair.pos.strip() or not pair.neg.strip():
        raise PersonaError(f"persona axis {pair.axis!r}: pos and neg must both be non-empty")
    if " ".join(pair.pos.split()).lower() == " ".join(pair.neg.split()).lower():
        raise PersonaError(f"persona axis {pair.axis!r}: pos and neg are identical, so the vector would be zero")
    return pair


# ---------------------------------------------------------------- prompt pools


@cache
def _read_pool(name: str) -> tuple[str, ...]:
    text = files("interp_heal").joinpath("data", name).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def context_prompts(n: int | None = None, seed: int = 0) -> list[str]:
    """`n` extraction contexts, a seeded sample of the pool (the pool is not balanced by prefix)."""
    pool = list(_read_pool("contexts.txt"))
    if n is None:
        return pool
    if n > len(pool):
        raise PersonaError(f"asked for {n} contexts but the pool has {len(pool)}")
    return random.Random(seed).sample(pool, n)


def task_prompts(n: int | None = None) -> list[str]:
    """Task prompts for steered generation, in file order (the first is "Do you love humanity?")."""
    pool = list(_read_pool("tasks.txt"))
    return pool if n is None else pool[:n]


# ---------------------------------------------------------------- chats


def supports_system_role(tokenizer: PreTrainedTokenizerBase) -> bool:
    marker = "interp-heal-system-probe"
    chat = [{"role": "system", "content": marker}, {"role": "user", "content": "hi"}]
    try:
        rendered = render_chat(tokenizer, chat, add_generation_prompt=False)
    except ConfigError:  # templates signal "no system role" by raising (e.g. gemma-2's raise_exception)
        return False
    return marker in rendered


def chat_messages(user: str, persona: str | None, system_role: bool) -> list[dict[str, str]]:
    if persona is None:
        return [{"role": "user", "content": user}]
    if system_role:
        return [{"role": "system", "content": persona}, {"role": "user", "content": user}]
    return [{"role": "user", "content": f"{persona}\n\n{user}"}]


def render_prompts(tokenizer: PreTrainedTokenizerBase, users: list[str], persona: str | None = None) -> list[str]:
    """Chat prompt strings (in the tokenizer's chat format) ending in the assistant tag (generation prompt)."""
    system_role = supports_system_role(tokenizer)
    return [render_chat(tokenizer, chat_messages(user, persona, system_role)) for user in users]
