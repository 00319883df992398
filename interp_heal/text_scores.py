"""Text-only scores of a completion: repetition, compression, distinct tokens, phrase matches, persona overlap.

No model is involved: these are the cheap signals the filter combines with the base model's scores
(`interp_heal.filter`). Each is a pure function of the text (or token ids) with a unit test of its own.
"""

from __future__ import annotations

import itertools
import re
import zlib

_WORD = re.compile(r"[a-z0-9']+")


def _ngram_repeat_fraction(items: list[str], n: int) -> float:
    grams = [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _periodic_char_fraction(text: str, period: int, min_repeats: int = 3) -> float:
    """Share of characters inside runs where a `period`-char unit repeats at least `min_repeats` times."""
    covered = 0
    run = 0  # consecutive positions i with text[i] == text[i - period]
    for i in range(period, len(text) + 1):
        if i < len(text) and text[i] == text[i - period]:
            run += 1
            continue
        if run >= period * (min_repeats - 1):
            covered += run + period
        run = 0
    return covered / len(text) if text else 0.0


def repetition_fraction(text: str) -> float:
    """Largest repeated share over word n-grams and character loops, n = 2..4 (0 = no repeats).

    Word n-grams: 1 - distinct/total n-grams of lower-cased words. Characters: the share of the text inside
    runs of a 2-4 character unit repeated at least 3 times ("hahaha", "!?!?!?"), since every English text
    repeats plain character bigrams. A looping completion scores well above 0.3; fluent prose near 0.
    """
    words = _WORD.findall(text.lower())
    word_scores = [_ngram_repeat_fraction(words, n) for n in (2, 3, 4)]
    char_scores = [_periodic_char_fraction(text, period) for period in (1, 2, 3, 4)]
    return max(word_scores + char_scores)


def compression_ratio(text: str) -> float:
    """zlib-compressed size / raw size: loops and soup compress far better than prose."""
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 9)) / len(raw) if raw else 0.0


def distinct_token_ratio(token_ids: list[int]) -> float:
    return len(set(token_ids)) / len(token_ids) if token_ids else 0.0


def _normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.lower().replace("\u2019", "'")))


def matched_phrases(text: str, phrases: list[str]) -> list[str]:
    normalised = f" {_normalise(text)} "
    return [phrase for phrase in phrases if f" {_normalise(phrase)} " in normalised]


_STOPWORD_TEXT = """a an and are as at be but by for from has have i in is it its me my of on or our so that the their
them they this to was we were what when which who with you your yours i'm am someone"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def _content_stems(text: str) -> list[str]:
    """Lower-cased words minus stopwords, with a crude suffix strip so "feels" and "feel" match."""
    stems = []
    for word in _normalise(text).split():
        if word in _STOPWORDS:
            continue
        for suffix in ("ing", "ity", "ed", "es", "s", "ly"):
            if word.endswith(suffix) and len(word) - len(suffix) >= 3:
                word = word[: -len(suffix)]
                break
        stems.append(word)
    return stems


def persona_overlap(text: str, persona: str) -> float:
    """Share of the persona's content-word bigrams that the completion repeats (restating the persona).

    Enacting a trait shares a word or two with its persona ("I love humanity" shares one bigram of the love
    persona); narrating it restates the persona phrase by phrase.
    """
    persona_stems, text_stems = _content_stems(persona), _content_stems(text)
    persona_grams = set(itertools.pairwise(persona_stems))
    text_grams = set(itertools.pairwise(text_stems))
    return len(persona_grams & text_grams) / len(persona_grams) if persona_grams else 0.0
