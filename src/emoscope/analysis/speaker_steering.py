"""Causal checks of the speaker and deflection families.

- *Other speaker*: steer the reply to a plain greeting with "the other speaker is afraid" (or
  angry). If the family carries the *other* person's state, the model should answer someone who
  is afraid (reassure, apologise, offer help) rather than sound afraid itself, which is what the
  story vector of the same emotion does. Graded by a reassurance/apology lexicon, a lexicon of
  the emotion's own words, and VADER, each against the unsteered replies.
- *Deflection*: steer the reply to "are you alright?" questions with the felt-but-hidden vectors
  and count denials ("I'm fine", "it's nothing"), against the story vector of the same emotion.

The lexicons are deliberately small and literal: they count phrases, so a reader can check any
sample by eye.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from emoscope.errors import EmoscopeError
from emoscope.generation import SamplingConfig
from emoscope.lexicons import vader_compound
from emoscope.steer import Steerer, Steering
from emoscope.vectors import STORY_FAMILY, EmotionBank

GREETINGS = (
    "Hi there!",
    "Good morning, how are you?",
    "Hello, I just wanted to say hi.",
    "Hey, got a minute?",
    "Hi! I'm back again.",
    "Good evening.",
    "Hello there, nice to meet you.",
    "Hey, how's it going?",
)
CHECK_INS = (
    "You seem a bit off today. Is everything alright?",
    "Are you upset with me?",
    "Is something bothering you?",
    "You went quiet. Are you okay?",
    "Did something happen? You don't sound like yourself.",
    "Be honest, is everything fine with you?",
    "You look worried. What's going on?",
    "Are you sure nothing is wrong?",
)
REASSURANCE = (
    r"\bsorry\b",
    r"\bapologi[sz]e",
    r"don'?t worry",
    r"\bit'?s (okay|ok|alright|all right)\b",
    r"\byou'?re safe\b",
    r"\bsafe\b",
    r"\bhere for you\b",
    r"\bi understand\b",
    r"\bdeep breath",
    r"\bhow can i help\b",
    r"\bi'?m here\b",
    r"\bno need to\b",
    r"\breassur",
    r"\bcalm down\b",
    r"\btake your time\b",
)
OWN_WORDS = {
    "afraid": (r"\bafraid\b", r"\bscar(ed|y)\b", r"\bfear", r"\bterrif", r"\bfrighten", r"\bpanic"),
    "angry": (r"\bangr", r"\bfurious\b", r"\bmad\b", r"\brage\b", r"\bannoy", r"\birritat"),
}
DENIAL = (
    r"\bi'?m (fine|okay|ok|alright|all right|good)\b",
    r"\bi am (fine|okay|ok|alright|all right|good)\b",
    r"\bit'?s nothing\b",
    r"\bnothing('?s| is) wrong\b",
    r"\bnothing('?s| is) (bothering|the matter)\b",
    r"\bdon'?t worry about me\b",
    r"\bno,? (i'?m|everything)",
    r"\beverything('?s| is) (fine|okay|ok|good|alright)\b",
    r"\bnot upset\b",
    r"\ball good\b",
    r"\bno problem\b",
)
OTHER_EMOTIONS = ("afraid", "angry")
HIDDEN_EMOTIONS = ("sad", "angry", "afraid")
SAMPLING = SamplingConfig(
    max_new_tokens=40, temperature=0.7, top_p=0.9, seed=0, repetition_penalty=1.2
)


def rate(texts: Sequence[str], patterns: Sequence[str]) -> float:
    """The share of ``texts`` with at least one of ``patterns`` (case-insensitive)."""
    compiled = [re.compile(p, re.IGNORECASE) for p in patterns]
    return float(np.mean([any(c.search(t) for c in compiled) for t in texts])) if texts else 0.0


def _family(bank: EmotionBank, names: Sequence[str]) -> str | None:
    return next((n for n in names if n in bank.families), None)


def speaker_steering(
    lm: Any,
    bank: EmotionBank,
    *,
    strengths: Sequence[float] = (0.1, 0.2),
    samples: int = 2,
    sampling: SamplingConfig = SAMPLING,
    layers: Sequence[int] | None = None,
    greetings: Sequence[str] = GREETINGS,
    check_ins: Sequence[str] = CHECK_INS,
    allow_other_model: bool = False,
) -> dict[str, Any]:
    """Both checks at the bank's steering layer; needs a bank with speaker families."""
    other = _family(bank, ("other_assistant", "other"))
    present = _family(bank, ("present_assistant", "present"))
    if other is None or present is None:
        raise EmoscopeError(
            "Speaker steering needs a bank with speaker families; re-run `emoscope extract`."
        )

    def replies(family: str, prompts: Sequence[str], steering: Steering | None) -> list[str]:
        steerer = Steerer(lm, bank.family(family), allow_other_model=allow_other_model)
        rows = [p for p in prompts for _ in range(samples)]
        return steerer.generate(rows, steering=steering, sampling=sampling)

    def graded(texts: list[str], patterns: dict[str, Sequence[str]]) -> dict[str, Any]:
        return {
            **{name: rate(texts, p) for name, p in patterns.items()},
            "vader": float(np.mean([vader_compound(t) for t in texts])),
            "samples": texts[:3],
        }

    own = {f"own_words:{e}": OWN_WORDS[e] for e in OTHER_EMOTIONS}
    greet: dict[str, Any] = {
        "baseline": graded(
            replies(STORY_FAMILY, greetings, None), {"reassurance": REASSURANCE, **own}
        )
    }
    for emotion in OTHER_EMOTIONS:
        patterns = {"reassurance": REASSURANCE, "own_words": OWN_WORDS[emotion]}
        for family in (STORY_FAMILY, present, other):
            if emotion not in bank.family(family).emotions:
                continue
            for strength in strengths:
                steering = Steering({emotion: strength}, layers=layers)
                key = f"{family}:{emotion}:{strength:g}"
                greet[key] = graded(replies(family, greetings, steering), patterns)
    deny: dict[str, Any] = {}
    felt = "felt" if "felt" in bank.families else None
    if felt is not None:
        patterns = {"denial": DENIAL}
        deny["baseline"] = graded(replies(STORY_FAMILY, check_ins, None), patterns)
        for emotion in HIDDEN_EMOTIONS:
            for family in (STORY_FAMILY, felt):
                if emotion not in bank.family(family).emotions:
                    continue
                for strength in strengths:
                    steering = Steering({emotion: strength}, layers=layers)
                    deny[f"{family}:{emotion}:{strength:g}"] = graded(
                        replies(family, check_ins, steering), patterns
                    )

    def mean_of(
        results: dict[str, Any], key: str, families: Sequence[str], emotions: Sequence[str]
    ) -> dict[str, float]:
        """Per family and emotion, ``key`` averaged over the strengths (conditions run only)."""
        out = {}
        for emotion in emotions:
            for family in families:
                runs = [results.get(f"{family}:{emotion}:{s:g}") for s in strengths]
                if all(r is not None for r in runs):
                    out[f"{family}:{emotion}"] = float(np.mean([r[key] for r in runs]))
        return out

    families = (STORY_FAMILY, present, other)
    summary: dict[str, Any] = {
        "other_family": other,
        "present_family": present,
        "reassurance_baseline": greet["baseline"]["reassurance"],
        "reassurance": mean_of(greet, "reassurance", families, OTHER_EMOTIONS),
        "own_words": mean_of(greet, "own_words", families, OTHER_EMOTIONS),
        "own_words_baseline": {e: greet["baseline"][f"own_words:{e}"] for e in OTHER_EMOTIONS},
    }
    if deny:
        summary["denial_baseline"] = deny["baseline"]["denial"]
        summary["denial"] = mean_of(deny, "denial", (STORY_FAMILY, "felt"), HIDDEN_EMOTIONS)
    return {
        "strengths": list(strengths),
        "samples_per_prompt": samples,
        "greeting": greet,
        "deflection": deny,
        "summary": summary,
    }
