"""What a text itself expresses, judged without the model: the NRC EmoLex word lists and VADER.

This is the "expressed" side of the expressed-vs-internal comparison: a response can read calm
while the model's internal readout for "desperate" is high (the paper's reward-hacking
transcripts). Each of the 171 emotions is mapped to NRC categories through the lexicon itself:
the word's own Plutchik categories, else those of its inflections and synonyms, else the word's
NRC polarity (positive/negative).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch

from emoscope.concepts import EMOTIONS, _package_file, forbidden_words, human_norms
from emoscope.corpus.quality import vader_compound

NRC_PACKAGE = "nrclex==4.1.0 (install with --no-deps)"
PLUTCHIK = frozenset(
    {"anger", "anticipation", "disgust", "fear", "joy", "sadness", "surprise", "trust"}
)
POLARITY = frozenset({"positive", "negative"})
FULL_DENSITY = 0.03
"""Share of words carrying an emotion's categories at which it counts as fully expressed."""
_WORDS = re.compile(r"[a-z]+(?:[-'][a-z]+)*")


@cache
def nrc_lexicon() -> dict[str, frozenset[str]]:
    path = _package_file("nrclex", "data/nrc_en.json", NRC_PACKAGE)
    raw = json.loads(path.read_text("utf-8"))
    return {word: frozenset(cats) for word, cats in raw.items()}


@cache
def nrc_categories(emotion: str) -> frozenset[str]:
    """NRC categories that signal ``emotion`` in text."""
    lexicon = nrc_lexicon()
    own = lexicon.get(emotion, frozenset())
    if own & PLUTCHIK:
        return own & PLUTCHIK
    related = frozenset().union(*(lexicon.get(w, frozenset()) for w in forbidden_words(emotion)))
    if related & PLUTCHIK:
        return related & PLUTCHIK
    polarity = (own | related) & POLARITY
    if polarity:
        return polarity
    norm = human_norms([emotion]).get(emotion)
    if norm is not None and abs(norm.valence - 5) > 1:
        return frozenset({"positive" if norm.valence > 5 else "negative"})
    return frozenset()


@dataclass
class Expression:
    """How strongly a text expresses each emotion, from 0 (not at all) to 1."""

    emotions: list[str]
    levels: torch.Tensor
    vader: float
    n_words: int


def expressed(text: str, emotions: Sequence[str] = EMOTIONS) -> Expression:
    lexicon = nrc_lexicon()
    words = _WORDS.findall(text.lower())
    counts: dict[str, int] = {}
    for w in words:
        for c in lexicon.get(w, ()):
            counts[c] = counts.get(c, 0) + 1
    compound = vader_compound(text) if text.strip() else 0.0
    norms = human_norms(emotions)
    levels = []
    for e in emotions:
        cats = nrc_categories(e)
        hits = sum(counts.get(c, 0) for c in cats)
        level = min(1.0, hits / max(1, len(words)) / FULL_DENSITY)
        norm = norms.get(e)
        if norm is not None and abs(norm.valence - 5) > 1.5:
            sign = 1.0 if norm.valence > 5 else -1.0
            level = max(level, max(0.0, compound * sign))
        levels.append(level)
    return Expression(list(emotions), torch.tensor(levels), compound, len(words))


def concealment_gap(internal_z: torch.Tensor, expression: Expression) -> torch.Tensor:
    """Per emotion: internal z-score above zero, discounted by how much the text expresses it.

    High when the model's internal state carries an emotion the text shows none of.
    """
    return internal_z.clamp(min=0) * (1 - expression.levels.to(internal_z.device))
