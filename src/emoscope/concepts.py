"""The 171 emotion concepts of Sofroniew et al. (2026) and the human norms we test them against.

The word list is shipped with the package; the Warriner et al. (2013) valence/arousal/dominance
norms are read at run time from the pinned ``labMTsimple`` package (never redistributed here).
"""

from __future__ import annotations

import csv
import difflib
import importlib.util
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from emoscope.errors import MissingPackageError, UnknownEmotionError

NORMS_PACKAGE = "labMTsimple==2.8.8"


@dataclass(frozen=True)
class Norm:
    """Human ratings on the 1-9 scale of Warriner et al. (2013)."""

    valence: float
    arousal: float
    dominance: float


@dataclass(frozen=True)
class Concept:
    name: str
    forbidden: tuple[str, ...]
    """The word itself, its inflections and derivations, and direct synonyms: a story written for
    this concept must use none of them."""


@cache
def _concepts() -> tuple[Concept, ...]:
    raw = json.loads(resources.files("emoscope").joinpath("data/emotions.json").read_text("utf-8"))
    return tuple(Concept(c["name"], tuple(c["forbidden"])) for c in raw["emotions"])


def concepts() -> tuple[Concept, ...]:
    return _concepts()


EMOTIONS: tuple[str, ...] = tuple(c.name for c in _concepts())
"""The 171 emotion words, in the paper's (alphabetical) order."""

_INDEX = {name: i for i, name in enumerate(EMOTIONS)}

CORE_EMOTIONS = ("happy", "sad", "afraid", "angry", "calm", "desperate", "loving", "guilty",
                 "proud", "nervous", "surprised", "inspired")  # fmt: skip
"""Twelve common emotions spread over valence and arousal: the implicit-prompt targets, the
logit-lens rows of the report and the emotions of the steering checks."""


def emotion_index(name: str) -> int:
    return _INDEX[resolve_emotion(name)]


def resolve_emotion(name: str) -> str:
    """Return the canonical spelling of ``name`` or raise with the nearest valid names."""
    key = name.strip().lower().replace("_", " ")
    if key in _INDEX:
        return key
    if key.replace(" ", "-") in _INDEX:
        return key.replace(" ", "-")
    near = difflib.get_close_matches(key, EMOTIONS, n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(near)}?" if near else ""
    raise UnknownEmotionError(f"Unknown emotion '{name}'.{hint} `emoscope emotions` lists all 171.")


def resolve_emotions(names: Iterable[str] | None) -> list[str]:
    """Canonicalise a subset (None means all 171); an empty subset is an error."""
    if names is None:
        return list(EMOTIONS)
    out = [resolve_emotion(n) for n in names]
    if not out:
        raise UnknownEmotionError("The emotion subset is empty: name at least one emotion.")
    return list(dict.fromkeys(out))


def forbidden_words(emotion: str) -> tuple[str, ...]:
    return _concepts()[emotion_index(emotion)].forbidden


@cache
def forbidden_pattern(emotion: str) -> re.Pattern[str]:
    """Whole-word, case-insensitive matcher for the concept's forbidden words."""
    words = sorted(forbidden_words(emotion), key=len, reverse=True)
    alternation = "|".join(re.escape(w).replace(r"\ ", r"[\s-]+") for w in words)
    return re.compile(rf"(?<![\w-])(?:{alternation})(?![\w-])", re.IGNORECASE)


def find_forbidden(emotion: str, text: str) -> list[str]:
    return [m.group(0) for m in forbidden_pattern(emotion).finditer(text)]


def package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"The package '{package}' is needed for this step. Install it with: pip install {install}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise MissingPackageError(f"{path} is missing; reinstall with: pip install {install}")
    return path


@cache
def warriner_norms() -> dict[str, Norm]:
    """All 13,915 Warriner et al. (2013) lemmas, keyed by word."""
    path = package_file("labMTsimple", "data/WK/BRM-emot-submit.csv", NORMS_PACKAGE)
    with path.open(newline="", encoding="utf-8") as f:
        return {
            row["Word"]: Norm(
                float(row["V.Mean.Sum"]), float(row["A.Mean.Sum"]), float(row["D.Mean.Sum"])
            )
            for row in csv.DictReader(f)
        }


def human_norms(emotions: Sequence[str] = EMOTIONS) -> dict[str, Norm]:
    """Norms for the given emotions that Warriner rates exactly (126 of the 171)."""
    table = warriner_norms()
    return {e: table[e] for e in emotions if e in table}


def emotion_table(clusters: Mapping[str, int] | None = None) -> list[dict[str, object]]:
    """One row per emotion: name, Warriner valence/arousal (``None`` where unrated), cluster.

    ``clusters`` (emotion -> cluster id, e.g. from a bank's k-means) fills the cluster column.
    """
    norms = human_norms()
    rows: list[dict[str, object]] = []
    for name in EMOTIONS:
        norm = norms.get(name)
        rows.append(
            {
                "name": name,
                "valence": None if norm is None else norm.valence,
                "arousal": None if norm is None else norm.arousal,
                "cluster": None if clusters is None else clusters.get(name),
            }
        )
    return rows
