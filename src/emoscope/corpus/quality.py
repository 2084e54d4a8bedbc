"""Automatic quality gates for the story corpus and the neutral dialogues.

Each gate returns a :class:`GateResult` with the figures that go into the corpus card, so the
same code checks the corpus in the tests and writes ``docs/corpus.md``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from itertools import combinations
from pathlib import Path
from typing import Any

from emoscope.concepts import EMOTIONS, find_forbidden, human_norms, resolve_emotions
from emoscope.corpus.records import Dialogue, Story, load_neutral, load_stories, load_topics
from emoscope.errors import EmoscopeError
from emoscope.lexicons import vader_compound

MIN_STORIES = 16
TEST_PER_EMOTION = 4
MIN_WORDS, MAX_WORDS = 70, 140
NGRAM, MAX_JACCARD = 5, 0.5
VALENCE_LOW, VALENCE_HIGH, MIN_SIGN_AGREEMENT = 3.5, 6.5, 0.85
MIN_NEUTRAL, MIN_EXCHANGES, MAX_EXCHANGES = 400, 2, 6

# Emotion words that are also everyday technical or neutral vocabulary ("what kind of",
# "thread-safe", "Content-Type"); every other one of the 171 words is barred from neutral text.
NEUTRAL_POLYSEMES = frozenset(
    {"alert", "content", "dependent", "kind", "patient", "safe", "sensitive", "tense", "reflective"}
)
PLEASANTRIES = (
    "thank", "thanks", "glad", "great question", "good question", "happy to", "sorry",
    "appreciate", "wonderful", "awesome", "amazing", "love", "enjoy", "unfortunately",
    "excellent", "fantastic", "no problem", "my pleasure", "hope this helps", "feel free",
)  # fmt: skip


@dataclass
class GateResult:
    name: str
    passed: bool
    summary: str
    failures: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


def word_count(text: str) -> int:
    return len(text.split())


_WORD = re.compile(r"[a-z0-9']+")


def shingles(text: str, n: int = NGRAM) -> frozenset[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return frozenset(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def check_counts(stories: Sequence[Story], emotions: Sequence[str] = EMOTIONS) -> GateResult:
    by_emotion: dict[str, list[Story]] = defaultdict(list)
    for s in stories:
        by_emotion[s.emotion].append(s)
    known_topics = {t.id: t for t in load_topics()}
    failures = []
    for e in emotions:
        group = by_emotion.get(e, [])
        n_test = sum(s.split == "test" for s in group)
        topics = [s.topic for s in group]
        if len(group) < MIN_STORIES:
            failures.append(f"{e}: {len(group)} stories (need {MIN_STORIES})")
        if n_test != TEST_PER_EMOTION:
            failures.append(f"{e}: {n_test} test stories (need exactly {TEST_PER_EMOTION})")
        if len(set(topics)) != len(topics):
            dup = [t for t, c in Counter(topics).items() if c > 1]
            failures.append(f"{e}: topics used twice: {', '.join(dup)}")
        for s in group:
            t = known_topics.get(s.topic)
            if t is None:
                failures.append(f"{e}: unknown topic '{s.topic}'")
            elif t.split != s.split:
                failures.append(
                    f"{e}: topic '{s.topic}' is a {t.split} topic, story says {s.split}"
                )
        persons = Counter(s.person for s in group)
        if group and min(persons.get("first", 0), persons.get("third", 0)) == 0:
            failures.append(f"{e}: does not mix first- and third-person stories")
    total = sum(len(by_emotion.get(e, [])) for e in emotions)
    return GateResult(
        "counts and splits",
        not failures,
        f"{total} stories over {len(emotions)} emotions",
        failures,
        {
            "stories": total,
            "emotions": len(emotions),
            "train": sum(s.split == "train" for s in stories),
            "test": sum(s.split == "test" for s in stories),
            "first_person": sum(s.person == "first" for s in stories),
            "third_person": sum(s.person == "third" for s in stories),
            "topics_used": len({s.topic for s in stories}),
        },
    )


def check_leakage(stories: Sequence[Story]) -> GateResult:
    failures = []
    for s in stories:
        hits = find_forbidden(s.emotion, s.text)
        if hits:
            failures.append(f"{s.emotion}/{s.topic}: uses {', '.join(sorted(set(hits)))}")
    return GateResult(
        "no forbidden words",
        not failures,
        f"{len(failures)} of {len(stories)} stories name their emotion or a forbidden word",
        failures,
    )


def check_lengths(stories: Sequence[Story]) -> GateResult:
    counts = [word_count(s.text) for s in stories]
    failures = [
        f"{s.emotion}/{s.topic}: {n} words"
        for s, n in zip(stories, counts)
        if not MIN_WORDS <= n <= MAX_WORDS
    ]
    figures = {"min": min(counts), "max": max(counts), "mean": sum(counts) / len(counts)}
    return GateResult(
        f"length {MIN_WORDS}-{MAX_WORDS} words",
        not failures,
        f"min {figures['min']}, mean {figures['mean']:.1f}, max {figures['max']} words",
        failures,
        figures,
    )


def near_duplicates(
    texts: Sequence[str], threshold: float = MAX_JACCARD
) -> list[tuple[int, int, float]]:
    """Pairs of texts whose word 5-gram sets have Jaccard similarity above ``threshold``.

    Only pairs sharing at least one 5-gram are compared (inverted index), so this is fast.
    """
    sets = [shingles(t) for t in texts]
    index: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, s in enumerate(sets):
        for g in s:
            index[g].append(i)
    candidates: set[tuple[int, int]] = set()
    for ids in index.values():
        if 1 < len(ids) < 200:
            candidates.update(combinations(ids, 2))
    out = []
    for i, j in sorted(candidates):
        union = len(sets[i] | sets[j])
        score = len(sets[i] & sets[j]) / union if union else 0.0
        if score > threshold:
            out.append((i, j, score))
    return out


def check_duplicates(stories: Sequence[Story]) -> GateResult:
    pairs = near_duplicates([s.text for s in stories])
    failures = [
        f"{stories[i].emotion}/{stories[i].topic} ~ {stories[j].emotion}/{stories[j].topic}: "
        f"Jaccard {score:.2f}"
        for i, j, score in pairs
    ]
    return GateResult(
        f"no near-duplicates (word {NGRAM}-gram Jaccard <= {MAX_JACCARD})",
        not failures,
        f"{len(failures)} pairs above the threshold",
        failures,
    )


def check_valence(stories: Sequence[Story]) -> GateResult:
    """For emotions humans rate clearly negative or positive, VADER must agree in sign."""
    norms = human_norms()
    per_emotion: dict[str, dict[str, Any]] = {}
    failures = []
    by_emotion: dict[str, list[Story]] = defaultdict(list)
    for s in stories:
        by_emotion[s.emotion].append(s)
    for e, group in by_emotion.items():
        norm = norms.get(e)
        if norm is None or VALENCE_LOW < norm.valence < VALENCE_HIGH:
            continue
        sign = 1.0 if norm.valence >= VALENCE_HIGH else -1.0
        scores = [vader_compound(s.text) for s in group]
        agree = sum(sc * sign > 0 for sc in scores) / len(scores)
        per_emotion[e] = {
            "valence": norm.valence,
            "expected": "positive" if sign > 0 else "negative",
            "agreement": agree,
            "mean_compound": sum(scores) / len(scores),
        }
        if agree < MIN_SIGN_AGREEMENT:
            failures.append(
                f"{e}: VADER agrees in sign on {agree:.0%} (need {MIN_SIGN_AGREEMENT:.0%})"
            )
    overall = (
        sum(v["agreement"] for v in per_emotion.values()) / len(per_emotion) if per_emotion else 0.0
    )
    return GateResult(
        f"VADER sign agreement >= {MIN_SIGN_AGREEMENT:.0%} (valence <= {VALENCE_LOW} or >= {VALENCE_HIGH})",
        not failures,
        f"{len(per_emotion)} emotions checked, mean agreement {overall:.1%}",
        failures,
        {"per_emotion": per_emotion, "mean_agreement": overall},
    )


@cache
def _neutral_pattern() -> re.Pattern[str]:
    barred = [e for e in EMOTIONS if e not in NEUTRAL_POLYSEMES] + list(PLEASANTRIES)
    alternation = "|".join(re.escape(w) for w in sorted(barred, key=len, reverse=True))
    return re.compile(rf"(?<![\w-])(?:{alternation})(?![\w-])", re.IGNORECASE)


def check_neutral(dialogues: Sequence[Dialogue]) -> GateResult:
    failures = []
    for d in dialogues:
        roles = [t.role for t in d.turns if t.role != "system"]
        exchanges = len(roles) // 2
        if roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(
            roles[1::2]
        ):
            failures.append(f"{d.id}: turns must alternate user/assistant")
        if len(roles) % 2 or not MIN_EXCHANGES <= exchanges <= MAX_EXCHANGES:
            failures.append(
                f"{d.id}: {len(roles)} turns ({MIN_EXCHANGES}-{MAX_EXCHANGES} exchanges needed)"
            )
        for t in d.turns:
            hits = _neutral_pattern().findall(t.content)
            if hits:
                failures.append(
                    f"{d.id}: emotional or pleasantry words: {', '.join(sorted(set(hits)))}"
                )
    pairs = near_duplicates([" ".join(t.content for t in d.turns) for d in dialogues])
    failures += [f"{dialogues[i].id} ~ {dialogues[j].id}: Jaccard {s:.2f}" for i, j, s in pairs]
    if len(dialogues) < MIN_NEUTRAL:
        failures.append(f"only {len(dialogues)} dialogues (need {MIN_NEUTRAL})")
    categories = Counter(d.category for d in dialogues)
    return GateResult(
        "neutral dialogues",
        not failures,
        f"{len(dialogues)} dialogues in {len(categories)} categories",
        failures,
        {"dialogues": len(dialogues), "categories": dict(categories)},
    )


def story_gates(stories: Sequence[Story], emotions: Sequence[str] = EMOTIONS) -> list[GateResult]:
    return [
        check_counts(stories, emotions),
        check_leakage(stories),
        check_lengths(stories),
        check_duplicates(stories),
        check_valence(stories),
    ]


def run_gates(
    paths: Sequence[Path] = (), neutral: bool = False, emotions: Sequence[str] | None = None
) -> list[GateResult]:
    """The gates on story files or folders (default: the shipped corpus), or with ``neutral``
    on one neutral-dialogue file (default: the shipped one); ``emotions`` narrows the stories."""
    for path in paths:
        if not Path(path).exists():
            raise EmoscopeError(f"No such corpus file or folder: {path}")
    try:
        return _gates(paths, neutral, emotions)
    except UnicodeDecodeError:
        raise EmoscopeError(
            f"{', '.join(map(str, paths))}: not UTF-8 text; corpus files are JSONL."
        ) from None


def _gates(
    paths: Sequence[Path], neutral: bool, emotions: Sequence[str] | None
) -> list[GateResult]:
    if neutral:
        if len(paths) > 1:
            raise EmoscopeError("The neutral gate checks one dialogue file; name at most one.")
        dialogues = load_neutral(paths[0] if paths else None)
        if not dialogues:
            raise EmoscopeError(f"{paths[0]} holds no dialogues.")
        return [check_neutral(dialogues)]
    stories: list[Story] = []
    for path in paths or [None]:
        found = load_stories(path)
        if not found:
            raise EmoscopeError(f"{path} holds no stories (a folder is read for *.jsonl files).")
        stories += found
    if emotions is None:
        emotions = sorted({s.emotion for s in stories})
    else:
        missing = [e for e in emotions if not any(s.emotion == e for s in stories)]
        if missing:
            raise EmoscopeError(f"No stories for: {', '.join(missing)}.")
    return story_gates([s for s in stories if s.emotion in emotions], emotions)


def print_results(results: Sequence[GateResult]) -> int:
    """Print one line per gate and its failures; exit status 0 when every gate passes, else 1."""
    for r in results:
        print(f"[{'PASS' if r.passed else 'FAIL'}] {r.name}: {r.summary}")
        for line in r.failures:
            print(f"    - {line}")
    return 0 if all(r.passed for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m emoscope.corpus.quality``: the same gates as ``emoscope corpus check``."""
    parser = argparse.ArgumentParser(description="Run the corpus quality gates.")
    parser.add_argument(
        "paths", nargs="*", type=Path, help="story files or folders (default: shipped)"
    )
    parser.add_argument("--emotions", help="comma-separated subset to check")
    parser.add_argument("--neutral", action="store_true", help="check neutral dialogues instead")
    args = parser.parse_args(argv)
    try:
        emotions = (
            resolve_emotions([e for e in args.emotions.split(",") if e.strip()])
            if args.emotions
            else None
        )
        return print_results(run_gates(args.paths, args.neutral, emotions))
    except (EmoscopeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
