"""Self-generation: the paper's protocol, where the model under study writes its own corpus.

For capable models this is the faithful path (the shipped corpus exists because small models
write stories too poor to show their emotion structure). Each (emotion, topic) cell asks for a
few stories per call, parses them, and drops leaked, near-duplicate and malformed ones.

Resumable by construction: every finished cell is one line appended to ``log.jsonl`` (flushed
and fsynced per batch), a re-run skips the cells already there, and a torn last line left by a
kill is ignored. ``stories.jsonl`` (or ``neutral.jsonl``) is rebuilt from the log after every
``batch_size`` finished cells, in the corpus format that ``emoscope extract --stories`` reads.
Cells decode on the continuous-batching engine, each with its own seed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from emoscope.batching import from_token_lists, padding_id
from emoscope.concepts import EMOTIONS, find_forbidden, resolve_emotions
from emoscope.corpus import quality
from emoscope.corpus.backends import IdsBackend
from emoscope.corpus.records import load_topics, parse_dialogue
from emoscope.engine import Request, engine_for
from emoscope.errors import EmoscopeError, UnsupportedArchitectureError
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


def _entry(
    lm: Any, cell: Cell, plan: GenerationPlan, ids: list[int], kept: dict[str, list[str]]
) -> dict[str, Any]:
    """A cell's log entry from its generated ids: kept items, drop counts and the raw text."""
    raw = lm.tokenizer.decode(ids, skip_special_tokens=True)
    parse = parse_dialogues if plan.kind == "neutral" else parse_stories
    items, dropped = parse(cell, raw, kept.setdefault(cell.emotion or "neutral", []))
    return {"cell": cell.key, "items": items, "dropped": dropped, "raw": raw}


def _cell_sampling(plan: GenerationPlan, seed: int) -> SamplingConfig:
    return SamplingConfig(plan.max_new_tokens, plan.temperature, 0.95, seed)


def _generated_cells(
    lm: Any,
    cells: Sequence[Cell],
    plan: GenerationPlan,
    seeds: Sequence[int],
    backend: IdsBackend | None = None,
) -> Iterator[tuple[Cell, list[int]]]:
    """Each cell with its generated ids, as soon as it is finished.

    Runs on the continuous-batching engine: ``plan.batch_size`` cells decode at once and a
    finished cell's slot goes to the next one straight away. Each cell has its own seed (its
    place in the plan), so what a cell gets does not depend on the batch size or on resuming.
    A ``backend`` (Ray workers, vLLM) decodes the same prompts with the same settings instead.
    """
    if not cells:
        return
    chats = [lm.chat([{"role": "user", "content": _prompt(c, plan)}]) for c in cells]
    prompts = [
        list(lm.tokenizer(chat.text, add_special_tokens=chat.add_special_tokens)["input_ids"])
        for chat in chats
    ]
    if backend is not None:
        samplings = [_cell_sampling(plan, seed) for seed in seeds]
        for i, ids in backend.generate_ids(prompts, samplings, plan.batch_size):
            yield cells[i], ids
        return
    try:
        engine = engine_for(lm, prompts, plan.max_new_tokens, max_batch=plan.batch_size)
    except UnsupportedArchitectureError:
        for start in range(0, len(cells), plan.batch_size):
            group = range(start, min(start + plan.batch_size, len(cells)))
            batch = from_token_lists(
                [prompts[i] for i in group], padding_id(lm.tokenizer), lm.device
            )
            rows = decode_rows(lm, batch, _cell_sampling(plan, seeds[start]))
            yield from ((cells[i], ids) for i, ids in zip(group, rows, strict=True))
        return
    with engine:
        handles = [
            engine.submit(Request(ids, _cell_sampling(plan, seed), chat=False))
            for ids, seed in zip(prompts, seeds, strict=True)
        ]
        waiting = dict(enumerate(handles))
        while waiting:
            engine.step()
            for i in [i for i, handle in waiting.items() if handle.done]:
                yield cells[i], waiting.pop(i).tokens


def generate_corpus(
    lm: Any,
    out: Path,
    plan: GenerationPlan,
    progress: bool = True,
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
    backend: IdsBackend | None = None,
) -> dict[str, Any]:
    """Generate (or resume generating) a corpus into ``out``; returns counts.

    ``on_batch`` is called with each batch's log entries once they are safely on disk (for
    progress reporting; an exception raised there stops the run with nothing lost).
    ``backend`` decodes elsewhere (:mod:`emoscope.corpus.backends`: Ray workers or vLLM); ``lm``
    then only needs a name, a tokenizer and a chat format.
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
    group: list[dict[str, Any]] = []

    def flush() -> None:
        _rebuild(out, plan)
        bar.update(len(group))
        finished = list(group)
        group.clear()
        if on_batch is not None:
            on_batch(finished)

    try:
        seeds = [plan.seed + position[c.key] for c in cells]
        for cell, ids in _generated_cells(lm, cells, plan, seeds, backend):
            entry = _entry(lm, cell, plan, ids, kept)
            append_jsonl(log, [entry])  # on disk before anything else happens
            group.append(entry)
            if len(group) >= plan.batch_size:
                flush()
        if group:
            flush()
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
