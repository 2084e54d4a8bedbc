"""Model-free judges of text: VADER sentiment (core) and the NRC EmoLex word lists (optional).

They are what a text *expresses*, read without the model, and serve the corpus quality gates, the
steering checks and the expressed-vs-internal comparison alike. NRC EmoLex comes from the
``nrclex`` package, an optional extra: ``pip install 'emoscope[expression]'``.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from emoscope.concepts import package_file
from emoscope.errors import MissingPackageError

EXPRESSION_EXTRA = "'emoscope[expression]'"


@cache
def _vader() -> Any:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise MissingPackageError(
            "VADER is needed for this step: pip install vaderSentiment==3.3.2"
        ) from None
    return SentimentIntensityAnalyzer()


def vader_compound(text: str) -> float:
    """VADER's compound sentiment of ``text``, from -1 (negative) to +1 (positive)."""
    return float(_vader().polarity_scores(text)["compound"]) if text.strip() else 0.0


@cache
def nrc_lexicon() -> dict[str, frozenset[str]]:
    """NRC EmoLex: word -> its categories (Plutchik's eight emotions, positive, negative)."""
    try:
        path = package_file("nrclex", "data/nrc_en.json", EXPRESSION_EXTRA)
    except MissingPackageError:
        raise MissingPackageError(
            "Comparing internal readouts with what a text expresses needs the NRC emotion "
            f"lexicon: pip install {EXPRESSION_EXTRA} (or pip install --no-deps nrclex==4.1.0)."
        ) from None
    raw = json.loads(path.read_text("utf-8"))
    return {word: frozenset(cats) for word, cats in raw.items()}
