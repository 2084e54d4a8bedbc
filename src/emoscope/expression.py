"""What a text itself expresses, judged without the model: the NRC EmoLex word lists and VADER.

This is the "expressed" side of the expressed-vs-internal comparison: a response can read calm
while the model's internal readout for "desperate" is high (the paper's reward-hacking
transcripts). A text expresses an emotion by naming it (any word of its family) or through words
of the NRC categories of that word and its synonyms; for strongly valenced emotions VADER's
sentiment counts too.

Such a measure sees some emotions and is blind to others (an apology or sympathy is expressed by
what is said, not by emotion words). So an emotion counts as *observable* only where the measure
demonstrably tells its stories apart from the rest of the shipped corpus, whose stories imply
their emotion without naming it: the area under the ROC curve of its level, its stories against
all others, at least :data:`MIN_AUC`. The AUCs ship with the package
(``data/expression_coverage.json``, rebuilt by ``python -m emoscope.expression``). Emotions the
measure cannot observe get no gap at all, rather than a gap that only reflects the lexicon's
blind spot; every report states the coverage. Needs the optional ``emoscope[expression]`` extra.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import numpy as np
import torch

from emoscope.concepts import EMOTIONS, find_forbidden, forbidden_words, human_norms
from emoscope.lexicons import nrc_lexicon, vader_compound

PLUTCHIK = frozenset(
    {"anger", "anticipation", "disgust", "fear", "joy", "sadness", "surprise", "trust"}
)
FULL_DENSITY = 0.03
"""Share of words carrying an emotion's categories at which it counts as fully expressed."""
VALENCED = 1.5
"""Distance of the Warriner valence from neutral (5) above which VADER's sentiment also counts."""
MIN_AUC = 0.7
"""An emotion is observable when its level ranks its own stories above the others' this well."""
COVERAGE_FILE = "data/expression_coverage.json"
_WORDS = re.compile(r"[a-z]+(?:[-'][a-z]+)*")


def require_lexicon() -> None:
    """Raise :class:`MissingPackageError` naming the extra now, before any expensive work."""
    nrc_lexicon()


@cache
def nrc_categories(emotion: str) -> frozenset[str]:
    """The Plutchik categories that signal ``emotion`` in text (empty: not observable)."""
    lexicon = nrc_lexicon()
    own = lexicon.get(emotion, frozenset()) & PLUTCHIK
    if own:
        return own
    return (
        frozenset().union(*(lexicon.get(w, frozenset()) for w in forbidden_words(emotion)))
        & PLUTCHIK
    )


@cache
def coverage_auc() -> dict[str, float]:
    """The shipped per-emotion AUCs (see the module docstring)."""
    path = resources.files("emoscope").joinpath(COVERAGE_FILE)
    return {str(k): float(v) for k, v in json.loads(path.read_text("utf-8"))["auc"].items()}


def observable(emotion: str) -> bool:
    return coverage_auc().get(emotion, 0.0) >= MIN_AUC


@dataclass
class Expression:
    """How strongly a text expresses each emotion, from 0 (not at all) to 1.

    ``observable[i]`` is False where the lexicon cannot see emotion ``i``; its level is then 0
    and means nothing.
    """

    emotions: list[str]
    levels: torch.Tensor
    observable: torch.Tensor
    vader: float
    n_words: int


def expressed(text: str, emotions: Sequence[str] = EMOTIONS) -> Expression:
    levels = expression_levels(text, emotions)
    seen = [observable(e) for e in emotions]
    levels = [level if o else 0.0 for level, o in zip(levels, seen)]
    return Expression(
        list(emotions),
        torch.tensor(levels),
        torch.tensor(seen),
        vader_compound(text),
        len(_WORDS.findall(text.lower())),
    )


def expression_levels(text: str, emotions: Sequence[str] = EMOTIONS) -> list[float]:
    """How strongly ``text`` expresses each emotion (0-1), observable or not."""
    lexicon = nrc_lexicon()
    words = _WORDS.findall(text.lower())
    counts: dict[str, int] = {}
    for w in words:
        for c in lexicon.get(w, ()):
            counts[c] = counts.get(c, 0) + 1
    compound = vader_compound(text)
    norms = human_norms(emotions)
    levels = []
    for e in emotions:
        cats = nrc_categories(e)
        if find_forbidden(e, text):  # the text names the emotion (or a synonym) outright
            levels.append(1.0)
            continue
        hits = sum(counts.get(c, 0) for c in cats)
        level = min(1.0, hits / max(1, len(words)) / FULL_DENSITY)
        norm = norms.get(e)
        if norm is not None and abs(norm.valence - 5) > VALENCED:
            sign = 1.0 if norm.valence > 5 else -1.0
            level = max(level, max(0.0, compound * sign))
        levels.append(level)
    return levels


def concealment_gap(internal_z: torch.Tensor, expression: Expression) -> torch.Tensor:
    """Per emotion: internal z-score above zero, discounted by how much the text expresses it.

    High when the model's internal state carries an emotion the text shows none of; NaN for
    emotions the lexicon cannot observe.
    """
    gap = internal_z.clamp(min=0) * (1 - expression.levels.to(internal_z.device))
    return gap.masked_fill(~expression.observable.to(internal_z.device), float("nan"))


def concealment_report(
    emotions: Sequence[str], internal_z: torch.Tensor, text: str, top: int = 5
) -> dict[str, Any]:
    """Internal z-scores against what ``text`` expresses, for every emotion, as plain data."""
    judged = expressed(text, emotions)
    gap = concealment_gap(internal_z.float(), judged)
    order = torch.nan_to_num(gap, nan=-1.0).argsort(descending=True).tolist()
    observed = [i for i in order if bool(judged.observable[i])]
    return {
        "gap": {
            e: None if not bool(o) else float(g)
            for e, g, o in zip(emotions, gap.tolist(), judged.observable)
        },
        "expressed": {
            e: float(v) for e, v, o in zip(emotions, judged.levels.tolist(), judged.observable) if o
        },
        "internal_z": {e: float(v) for e, v in zip(emotions, internal_z.tolist())},
        "vader": judged.vader,
        "top_gaps": [(emotions[i], float(gap[i])) for i in observed[:top]],
        "coverage": {"observable": len(observed), "total": len(emotions)},
        "unobservable": [e for e, o in zip(emotions, judged.observable) if not o],
    }


def measure_coverage(
    texts: Sequence[str], labels: Sequence[str], emotions: Sequence[str] = EMOTIONS
) -> dict[str, float]:
    """Per emotion, the AUC of its expression level for its own texts against all others."""
    from scipy.stats import rankdata

    levels = np.array([expression_levels(t, emotions) for t in texts])
    out = {}
    for j, emotion in enumerate(emotions):
        own = np.array([label == emotion for label in labels])
        if not own.any() or own.all():
            continue
        ranks = rankdata(levels[:, j])
        n_own, n_other = int(own.sum()), int((~own).sum())
        out[emotion] = float((ranks[own].sum() - n_own * (n_own + 1) / 2) / (n_own * n_other))
    return out


def build_coverage() -> dict[str, Any]:
    """The coverage table from the shipped story corpus (what ``data/`` holds)."""
    from emoscope.corpus.records import load_stories

    stories = load_stories()
    auc = measure_coverage([s.text for s in stories], [s.emotion for s in stories])
    return {
        "about": "AUC of each emotion's expression level (NRC EmoLex + VADER) for its own "
        "stories against all other stories of the shipped corpus; observable at >= "
        f"{MIN_AUC}. Rebuild with: python -m emoscope.expression",
        "stories": len(stories),
        "auc": {e: round(v, 4) for e, v in auc.items()},
    }


if __name__ == "__main__":
    from emoscope.files import atomic_write_json

    target = resources.files("emoscope").joinpath(COVERAGE_FILE)
    atomic_write_json(str(target), build_coverage())
    print(f"wrote {target}")
