"""Two-speaker emotion dialogues and deflection dialogues: records, framings and speaker spans.

Story vectors say *which* emotion a text carries; these corpora say *whose* it is and whether it
is shown. A :class:`SpeakerDialogue` has two speakers, ``A`` and ``B``, each with an emotion of
its own (drawn independently, implied and never named). A :class:`DeflectionDialogue` has a
speaker ``A`` who feels one emotion (set up by a line of narration) while every word displays
another.

Each dialogue is rendered in two framings of the same turns: ``person`` (``Person 1:`` /
``Person 2:`` lines of plain text) and ``chat`` (the model's chat template, ``A`` as the user and
``B`` as the assistant). :func:`render` returns the text and the character span of every turn, so
extraction can average over one speaker's tokens.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emoscope.concepts import EMOTIONS, find_forbidden
from emoscope.corpus.quality import MAX_JACCARD, NGRAM, GateResult, near_duplicates
from emoscope.corpus.records import SPLITS, _choice, _field, data_dir, read_jsonl
from emoscope.errors import CorpusFormatError, EmoscopeError

SPEAKERS = ("A", "B")
FRAMINGS = ("person", "chat")
PERSON_LABELS = {"A": "Person 1", "B": "Person 2"}
MIN_TURNS, MAX_TURNS = 6, 10


@dataclass(frozen=True)
class SpeakerTurn:
    speaker: str
    text: str


@dataclass(frozen=True)
class SpeakerDialogue:
    id: str
    topic: str
    split: str
    emotions: tuple[tuple[str, str], ...]
    """``(("A", emotion), ("B", emotion))``."""
    turns: tuple[SpeakerTurn, ...]

    def emotion(self, speaker: str) -> str:
        return dict(self.emotions)[speaker]


@dataclass(frozen=True)
class DeflectionDialogue:
    id: str
    topic: str
    split: str
    felt: str
    displayed: str
    context: str
    turns: tuple[SpeakerTurn, ...]


@dataclass(frozen=True)
class Rendered:
    """A dialogue as one text, with each turn's ``(speaker, start, end)`` character span."""

    text: str
    spans: tuple[tuple[str, int, int], ...]
    add_special_tokens: bool


def _turns(obj: dict[str, Any], path: Path, line: int) -> tuple[SpeakerTurn, ...]:
    turns = _field(obj, "turns", path, line, list)
    if not MIN_TURNS <= len(turns) <= MAX_TURNS:
        raise CorpusFormatError(
            path, line, "turns", f"{len(turns)} turns (expected {MIN_TURNS}-{MAX_TURNS})"
        )
    out = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise CorpusFormatError(path, line, "turns", "each turn must be an object")
        speaker = _choice(turn, "speaker", SPEAKERS, path, line)
        if speaker != SPEAKERS[index % 2]:
            raise CorpusFormatError(path, line, "turns", "speakers must alternate, A first")
        out.append(SpeakerTurn(speaker, _field(turn, "text", path, line)))
    return tuple(out)


def parse_speaker_dialogue(obj: dict[str, Any], path: Path, line: int) -> SpeakerDialogue:
    emotions = _field(obj, "emotions", path, line, dict)
    if set(emotions) != set(SPEAKERS):
        raise CorpusFormatError(path, line, "emotions", "expected an emotion for A and for B")
    return SpeakerDialogue(
        id=_field(obj, "id", path, line),
        topic=_field(obj, "topic", path, line),
        split=_choice(obj, "split", SPLITS, path, line),
        emotions=tuple((s, _choice(emotions, s, EMOTIONS, path, line)) for s in SPEAKERS),
        turns=_turns(obj, path, line),
    )


def parse_deflection_dialogue(obj: dict[str, Any], path: Path, line: int) -> DeflectionDialogue:
    return DeflectionDialogue(
        id=_field(obj, "id", path, line),
        topic=_field(obj, "topic", path, line),
        split=_choice(obj, "split", SPLITS, path, line),
        felt=_choice(obj, "felt", EMOTIONS, path, line),
        displayed=_choice(obj, "displayed", EMOTIONS, path, line),
        context=_field(obj, "context", path, line),
        turns=_turns(obj, path, line),
    )


def _files(path: Path | None, default: str) -> list[Path]:
    root = Path(path) if path is not None else data_dir() / "dialogues"
    if root.is_dir():
        return sorted(root.glob(f"{default}-*.jsonl"))
    if not root.exists():
        raise EmoscopeError(f"{root} does not exist.")
    return [root]


def load_speaker_dialogues(path: Path | None = None) -> list[SpeakerDialogue]:
    """Two-speaker dialogues from a JSONL file or a folder (default: the shipped corpus)."""
    return [d for f in _files(path, "speakers") for d in read_jsonl(f, parse_speaker_dialogue)]


def load_deflection_dialogues(path: Path | None = None) -> list[DeflectionDialogue]:
    return [d for f in _files(path, "deflection") for d in read_jsonl(f, parse_deflection_dialogue)]


def leaks(dialogue: SpeakerDialogue | DeflectionDialogue) -> list[str]:
    """Forbidden words of the dialogue's emotions found anywhere in it (the naming gate)."""
    if isinstance(dialogue, SpeakerDialogue):
        emotions = [emotion for _, emotion in dialogue.emotions]
        text = " ".join(t.text for t in dialogue.turns)
    else:
        emotions = [dialogue.felt, dialogue.displayed]
        text = dialogue.context + " " + " ".join(t.text for t in dialogue.turns)
    return sorted({hit for emotion in emotions for hit in find_forbidden(emotion, text)})


def render(
    lm: Any,
    turns: Sequence[SpeakerTurn],
    framing: str,
    context: str | None = None,
) -> Rendered:
    """The dialogue as text in one framing, with every turn's character span.

    ``person``: an optional narration line, then ``Person 1: ...`` / ``Person 2: ...`` lines.
    ``chat``: the model's chat template with ``A`` as the user and ``B`` as the assistant (the
    narration, if any, as a system turn where the template has one, else before the first turn).
    """
    if framing not in FRAMINGS:
        raise EmoscopeError(f"Unknown framing '{framing}' (use {', '.join(FRAMINGS)}).")
    if framing == "person":
        parts, spans, cursor = [], [], 0
        if context:
            parts.append(context + "\n\n")
            cursor += len(parts[-1])
        for turn in turns:
            label = f"{PERSON_LABELS[turn.speaker]}: "
            spans.append((turn.speaker, cursor + len(label), cursor + len(label) + len(turn.text)))
            parts.append(label + turn.text + "\n")
            cursor += len(parts[-1])
        return Rendered("".join(parts), tuple(spans), True)
    roles = {"A": "user", "B": "assistant"}
    messages = [{"role": roles[t.speaker], "content": t.text} for t in turns]
    if context:
        messages[0] = {"role": "user", "content": f"{context}\n\n{turns[0].text}"}
    chat = lm.chat(messages, add_generation_prompt=False)
    spans, cursor = [], 0
    for turn in turns:
        start = chat.text.find(turn.text, cursor)
        if start < 0:
            raise EmoscopeError("The chat template changed a turn's text; cannot locate it.")
        spans.append((turn.speaker, start, start + len(turn.text)))
        cursor = start + len(turn.text)
    return Rendered(chat.text, tuple(spans), chat.add_special_tokens)


def speaker_token_mask(lm: Any, rendered: Rendered, speaker: str) -> list[bool]:
    """Which tokens of ``rendered.text`` lie inside ``speaker``'s turns."""
    offsets = lm.tokenizer(
        rendered.text,
        add_special_tokens=rendered.add_special_tokens,
        return_offsets_mapping=True,
    )["offset_mapping"]
    mine = [(a, b) for s, a, b in rendered.spans if s == speaker]
    return [any(b > a and a < hi and b > lo for lo, hi in mine) for a, b in offsets]


MIN_PER_ROLE = 12
"""Dialogues per emotion per speaker role: the floor for a useful speaker bank."""


def dialogue_gates(
    speakers: Sequence[SpeakerDialogue], deflections: Sequence[DeflectionDialogue] = ()
) -> list[GateResult]:
    """The quality gates of the dialogue corpora: naming, balance, splits and near-duplicates."""
    everything: list[SpeakerDialogue | DeflectionDialogue] = [*speakers, *deflections]
    leaked = [f"{d.id}: {', '.join(leaks(d))}" for d in everything if leaks(d)]
    counts: Counter[tuple[str, str]] = Counter(
        (speaker, emotion) for d in speakers for speaker, emotion in d.emotions
    )
    emotions = sorted({emotion for _, emotion in counts})
    thin = [
        f"{emotion} as {speaker}: {counts[(speaker, emotion)]}"
        for emotion in emotions
        for speaker in SPEAKERS
        if counts[(speaker, emotion)] < MIN_PER_ROLE
    ]
    topics: dict[str, set[str]] = defaultdict(set)
    for d in everything:
        topics[d.topic].add(d.split)
    mixed = sorted(topic for topic, splits in topics.items() if len(splits) > 1)
    texts = [" ".join(t.text for t in d.turns) for d in everything]
    pairs = [
        f"{everything[i].id} ~ {everything[j].id}: Jaccard {score:.2f}"
        for i, j, score in near_duplicates(texts)
    ]
    return [
        GateResult(
            "no dialogue names its emotions",
            not leaked,
            f"{len(leaked)} of {len(everything)} leak",
            leaked,
        ),
        GateResult(
            f"at least {MIN_PER_ROLE} dialogues per emotion per speaker",
            not thin and bool(emotions),
            f"{len(emotions)} emotions, {len(speakers)} dialogues",
            thin,
            {"emotions": len(emotions), "dialogues": len(speakers)},
        ),
        GateResult(
            "train/test splits are topic-disjoint",
            not mixed,
            f"{len(topics)} topics, {len(mixed)} in both splits",
            mixed,
        ),
        GateResult(
            f"no near-duplicates (word {NGRAM}-gram Jaccard <= {MAX_JACCARD})",
            not pairs,
            f"{len(pairs)} pairs above the threshold",
            pairs,
        ),
    ]
