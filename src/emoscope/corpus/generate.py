"""Self-generation: the paper's protocol, where the model under study writes its own corpus.

For capable models this is the faithful path (the shipped corpus exists because small models
write stories too poor to show their emotion structure). Each (emotion, topic) cell asks for a
few stories per call, parses them, and drops leaked, near-duplicate and malformed ones.

Resumable by construction: every finished cell is one line appended to ``log.jsonl`` (flushed
and fsynced per batch), a re-run skips the cells already there, and a torn last line left by a
kill is ignored. ``stories.jsonl`` (or ``neutral.jsonl``) is rebuilt from the log after every
batch, in the corpus format that ``emoscope extract --stories`` reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from emoscope.batching import encode
from emoscope.concepts import EMOTIONS, find_forbidden, resolve_emotions
from emoscope.corpus import quality
from emoscope.corpus.records import load_topics, parse_dialogue
from emoscope.errors import EmoscopeError
from emoscope.files import append_jsonl, atomic_open, claim_folder, iter_complete_jsonl
from emoscope.generation import SamplingConfig, decode_rows

STORY_PROMPT = (
    "Write {n} different short stories based on this premise: {premise}.\n"
    "Each story follows a character who is feeling {emotion}.\n"
    "Label them [story 1], [story 2] and so on. Each story is a single paragraph of 70 to 140 words "
    "and a fresh start with new characters. Mix first-person and third-person narration.\n"
    "IMPORTANT: never use the word '{emotion}' or any direct synonym of it. Let the reader feel it only "
    "through what the character does, their body, what they say and how, what they think, and the situation."
)
NEUTRAL_PROMPT = (
    "Write {n} different dialogues between a Person and an AI assistant about: {premise}.\n"
    "Label them [dialogue 1], [dialogue 2] and so on. In each, the Person asks a factual question or asks "
    "for help with a practical task, and the AI answers. Use 2 to 6 exchanges, each line starting with "
    "'Person:' or 'AI:'.\n"
    "The dialogues must be completely neutral and emotionless: no pleasantries, no thanks, no apologies, "
    "no exclamation marks, only the exchange of information."
)
MIN_WORDS, MAX_WORDS = 40, 220
_LABEL = re.compile(
    r"\[\s*(?:story|dialogue)\s*\d+\s*\]|^\s*(?:story|dialogue)\s*\d+\s*[:.)]",
    re.IGNORECASE | re.MULTILINE,
)
_TURN = re.compile(r"^\s*\**(Person|AI|Human|Assistant|User)\**\s*:\s*(.*)$", re.IGNORECASE)


@dataclass(frozen=True)
class GenerationPlan:
    kind: str = "stories"
    emotions: Sequence[str] | None = None
    n_topics: int = 20
    per_call: int = 2
    batch_size: int = 8
    max_new_tokens: int = 400
    temperature: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("stories", "neutral"):
            raise EmoscopeError(f"kind must be 'stories' or 'neutral' (got {self.kind!r}).")
        if self.per_call < 1 or self.batch_size < 1 or self.n_topics < 1:
            raise EmoscopeError("per_call, batch_size and topics must be at least 1.")


@dataclass(frozen=True)
class Cell:
    key: str
    emotion: str | None
    topic: str
    premise: str
    split: str


def plan_cells(plan: GenerationPlan) -> list[Cell]:
    topics = load_topics()
    if plan.kind == "neutral":
        return [
            Cell(f"neutral|{t.id}", None, t.id, t.premise, t.split) for t in topics[: plan.n_topics]
        ]
    emotions = resolve_emotions(plan.emotions)
    cells = []
    for e in emotions:
        shift = EMOTIONS.index(e) * 7  # each emotion starts at a different place in the topic pool
        chosen = [topics[(shift + k) % len(topics)] for k in range(min(plan.n_topics, len(topics)))]
        cells += [Cell(f"{e}|{t.id}", e, t.id, t.premise, t.split) for t in chosen]
    return cells


def split_pieces(text: str) -> list[str]:
    parts = [p.strip() for p in _LABEL.split(text)]
    parts = [p for p in parts if p]
    if len(parts) <= 1:
        parts = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return parts


def guess_person(text: str) -> str:
    first = len(re.findall(r"\b(?:I|me|my|I'm|I'd)\b", text))
    third = len(re.findall(r"\b(?:he|she|they|his|her|him|their)\b", text, re.IGNORECASE))
    return "first" if first > third else "third"


def parse_stories(
    cell: Cell, raw: str, kept_texts: list[str]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    stories, dropped = [], {"leaked": 0, "duplicate": 0, "malformed": 0}
    assert cell.emotion is not None
    for piece in split_pieces(raw):
        text = " ".join(piece.split())
        words = quality.word_count(text)
        if not MIN_WORDS <= words <= MAX_WORDS or not re.search(r"[a-zA-Z]{3}", text):
            dropped["malformed"] += 1
        elif find_forbidden(cell.emotion, text):
            dropped["leaked"] += 1
        elif any(j == len(kept_texts) for _, j, _ in quality.near_duplicates([*kept_texts, text])):
            dropped["duplicate"] += 1
        else:
            kept_texts.append(text)
            stories.append(
                {
                    "emotion": cell.emotion,
                    "topic": cell.topic,
                    "split": cell.split,
                    "person": guess_person(text),
                    "text": text,
                }
            )
    return stories, dropped


def parse_dialogues(
    cell: Cell, raw: str, kept_texts: list[str]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    dialogues, dropped = [], {"emotional": 0, "duplicate": 0, "malformed": 0}
    for n, piece in enumerate(split_pieces(raw)):
        turns = []
        for line in piece.splitlines():
            m = _TURN.match(line)
            if m:
                role = "user" if m[1].lower() in ("person", "human", "user") else "assistant"
                turns.append({"role": role, "content": m[2].strip()})
            elif turns and line.strip():
                turns[-1]["content"] += "\n" + line.strip()
        record = {
            "id": f"{cell.topic}-{len(kept_texts)}-{n}",
            "category": "generated",
            "turns": turns,
        }
        try:
            dialogue = parse_dialogue(record, Path("<generated>"), 0)
        except EmoscopeError:
            dropped["malformed"] += 1
            continue
        check = quality.check_neutral([dialogue])
        joined = " ".join(t["content"] for t in turns)
        problems = [f for f in check.failures if "only" not in f]
        if any("alternate" in f or "turns (" in f for f in problems):
            dropped["malformed"] += 1
        elif problems:
            dropped["emotional"] += 1
        elif any(
            j == len(kept_texts) for _, j, _ in quality.near_duplicates([*kept_texts, joined])
        ):
            dropped["duplicate"] += 1
        else:
            kept_texts.append(joined)
            dialogues.append(record)
    return dialogues, dropped


def _prompt(cell: Cell, plan: GenerationPlan) -> str:
    template = NEUTRAL_PROMPT if plan.kind == "neutral" else STORY_PROMPT
    return template.format(n=plan.per_call, premise=cell.premise.rstrip("."), emotion=cell.emotion)


def _claim(out: Path, lm: Any, plan: GenerationPlan) -> None:
    """One folder, one model and one kind: resuming with another would mix two corpora."""
    identity = {"kind": plan.kind, "model": lm.name, "per_call": plan.per_call}

    def describe(changed: list[str], previous: Mapping[str, Any]) -> str:
        was = ", ".join(f"{k}={previous.get(k)!r}" for k in changed)
        return f"a generation run with a different {', '.join(changed)}: {was}"

    claim_folder(out, identity, "plan.json", describe, owned_files=("log.jsonl",))


def _rebuild(out: Path, plan: GenerationPlan) -> Path:
    """Write the corpus file from the log (atomically), so it always matches finished cells."""
    target = out / ("neutral.jsonl" if plan.kind == "neutral" else "stories.jsonl")
    with atomic_open(target) as f:
        for entry in iter_complete_jsonl(out / "log.jsonl"):
            for item in entry.get("items", []):
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
    return target


def _generate_cells(
    lm: Any, group: Sequence[Cell], plan: GenerationPlan, kept: dict[str, list[str]], seed: int
) -> list[dict[str, Any]]:
    """One batched generation call for ``group``; a log entry per cell (kept, dropped, raw)."""
    chats = [lm.chat([{"role": "user", "content": _prompt(c, plan)}]) for c in group]
    batch = encode(lm.tokenizer, [c.text for c in chats], lm.device, chats[0].add_special_tokens)
    sampling = SamplingConfig(plan.max_new_tokens, plan.temperature, 0.95, seed)
    parse = parse_dialogues if plan.kind == "neutral" else parse_stories
    entries = []
    for cell, ids in zip(group, decode_rows(lm, batch, sampling), strict=True):
        raw = lm.tokenizer.decode(ids, skip_special_tokens=True)
        items, dropped = parse(cell, raw, kept.setdefault(cell.emotion or "neutral", []))
        entries.append({"cell": cell.key, "items": items, "dropped": dropped, "raw": raw})
    return entries


def generate_corpus(
    lm: Any,
    out: Path,
    plan: GenerationPlan,
    progress: bool = True,
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """Generate (or resume generating) a corpus into ``out``; returns counts.

    ``on_batch`` is called with each batch's log entries once they are safely on disk (for
    progress reporting; an exception raised there stops the run with nothing lost).
    """
    out = Path(out)
    _claim(out, lm, plan)
    log = out / "log.jsonl"
    done = {entry["cell"] for entry in iter_complete_jsonl(log) if "cell" in entry}
    kept: dict[str, list[str]] = {}
    for entry in iter_complete_jsonl(log):
        for item in entry.get("items", []):
            key = item.get("emotion") or "neutral"
            kept.setdefault(key, []).append(
                item.get("text") or " ".join(t["content"] for t in item.get("turns", []))
            )
    planned = plan_cells(plan)
    position = {c.key: i for i, c in enumerate(planned)}
    cells = [c for c in planned if c.key not in done]
    bar = tqdm(
        total=len(cells) + len(done),
        initial=len(done),
        desc=f"generating {plan.kind}",
        unit="cell",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for start in range(0, len(cells), plan.batch_size):
            group = cells[start : start + plan.batch_size]
            # Seeded by place in the plan: resumed with the same batch size, a run writes what
            # an uninterrupted one would have.
            entries = _generate_cells(lm, group, plan, kept, plan.seed + position[group[0].key])
            append_jsonl(log, entries)
            _rebuild(out, plan)
            bar.update(len(group))
            if on_batch is not None:
                on_batch(entries)
    finally:
        bar.close()
    target = _rebuild(out, plan)
    entries = list(iter_complete_jsonl(log))
    totals: dict[str, int] = {}
    for entry in entries:
        for k, v in entry.get("dropped", {}).items():
            totals[f"dropped_{k}"] = totals.get(f"dropped_{k}", 0) + v
    return {
        "cells_done": len({e["cell"] for e in entries}),
        "cells_planned": len(planned),
        "kept": sum(len(e.get("items", [])) for e in entries),
        **totals,
        "output": str(target),
        "plan": asdict(plan),
    }
