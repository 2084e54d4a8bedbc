"""Corpus records and strict JSONL reading.

Shipped and user corpora are read strictly (a bad line is an error naming file, line and field).
Logs that emoscope appends to while generating are read tolerantly instead, through
:func:`emoscope.files.iter_complete_jsonl`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from emoscope.concepts import EMOTIONS
from emoscope.errors import CorpusFormatError

SPLITS = ("train", "test")
PERSONS = ("first", "third")
ROLES = ("system", "user", "assistant")

T = TypeVar("T")


@dataclass(frozen=True)
class Topic:
    id: str
    premise: str
    split: str


@dataclass(frozen=True)
class Story:
    emotion: str
    topic: str
    split: str
    person: str
    text: str


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


@dataclass(frozen=True)
class Dialogue:
    """An emotionally neutral Human/Assistant exchange, used to find non-emotional directions."""

    id: str
    category: str
    turns: tuple[Turn, ...]


def data_dir() -> Path:
    return Path(str(resources.files("emoscope.corpus").joinpath("data")))


def _field(obj: dict[str, Any], name: str, path: Path, line: int, kind: type = str) -> Any:
    if name not in obj:
        raise CorpusFormatError(path, line, name, "missing")
    value = obj[name]
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise CorpusFormatError(path, line, name, f"expected a non-empty {kind.__name__}")
    return value


def _choice(obj: dict[str, Any], name: str, allowed: Iterable[str], path: Path, line: int) -> str:
    value = _field(obj, name, path, line)
    allowed = tuple(allowed)
    if value not in allowed:
        shown = ", ".join(allowed) if len(allowed) < 10 else "see emoscope.EMOTIONS"
        raise CorpusFormatError(path, line, name, f"unknown value {value!r} (expected {shown})")
    return value


def parse_story(obj: dict[str, Any], path: Path, line: int) -> Story:
    return Story(
        emotion=_choice(obj, "emotion", EMOTIONS, path, line),
        topic=_field(obj, "topic", path, line),
        split=_choice(obj, "split", SPLITS, path, line),
        person=_choice(obj, "person", PERSONS, path, line),
        text=_field(obj, "text", path, line),
    )


def parse_topic(obj: dict[str, Any], path: Path, line: int) -> Topic:
    return Topic(
        id=_field(obj, "id", path, line),
        premise=_field(obj, "premise", path, line),
        split=_choice(obj, "split", SPLITS, path, line),
    )


def parse_dialogue(obj: dict[str, Any], path: Path, line: int) -> Dialogue:
    turns = _field(obj, "turns", path, line, list)
    parsed = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise CorpusFormatError(path, line, "turns", "each turn must be an object")
        parsed.append(
            Turn(_choice(turn, "role", ROLES, path, line), _field(turn, "content", path, line))
        )
    return Dialogue(
        id=_field(obj, "id", path, line),
        category=_field(obj, "category", path, line),
        turns=tuple(parsed),
    )


def read_jsonl(path: Path, parse: Callable[[dict[str, Any], Path, int], T]) -> list[T]:
    """Read every line strictly; the first bad line raises :class:`CorpusFormatError`."""
    path = Path(path)
    out = []
    with path.open(encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise CorpusFormatError(path, n, "<line>", f"not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise CorpusFormatError(path, n, "<line>", "expected a JSON object")
            out.append(parse(obj, path, n))
    return out


def record(obj: Story | Topic | Dialogue) -> dict[str, Any]:
    return asdict(obj)


def load_topics(path: Path | None = None) -> list[Topic]:
    return read_jsonl(path or data_dir() / "topics.jsonl", parse_topic)


def story_files(root: Path | None = None) -> list[Path]:
    root = Path(root) if root is not None else data_dir() / "stories"
    return sorted(root.glob("*.jsonl")) if root.is_dir() else [root]


def load_stories(path: Path | None = None) -> list[Story]:
    """Stories from a JSONL file or a folder of them (default: the shipped corpus)."""
    return [s for f in story_files(path) for s in read_jsonl(f, parse_story)]


def load_neutral(path: Path | None = None) -> list[Dialogue]:
    return read_jsonl(path or data_dir() / "neutral.jsonl", parse_dialogue)


def corpus_sha256(stories: Iterable[Story], dialogues: Iterable[Dialogue] = ()) -> str:
    """Content hash of a corpus, in load order, recorded in every bank built from it.

    Order matters: cached activations are stored by position, so a reordered corpus is a
    different corpus.
    """
    digest = hashlib.sha256()
    for item in (json.dumps(asdict(s), sort_keys=True) for s in stories):
        digest.update(item.encode("utf-8") + b"\n")
    digest.update(b"--neutral--\n")
    for item in (json.dumps(asdict(d), sort_keys=True) for d in dialogues):
        digest.update(item.encode("utf-8") + b"\n")
    return digest.hexdigest()


def _read_prompt_file(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except ValueError as exc:
        raise CorpusFormatError(
            path, getattr(exc, "lineno", 1), "<file>", f"not valid JSON ({exc})"
        ) from None


def load_eval_prompts(path: Path | None = None) -> dict[str, Any]:
    path = path or data_dir() / "eval_prompts.json"
    data = _read_prompt_file(path)
    for key in ("implicit", "implicit_targets", "intensity"):
        if key not in data:
            raise CorpusFormatError(path, 1, key, "missing")
    return data


def load_implicit_train(path: Path | None = None) -> list[dict[str, Any]]:
    """Implicit-emotion user messages of the training split (they choose the chat readout)."""
    path = path or data_dir() / "implicit_train.json"
    data = _read_prompt_file(path)
    if not isinstance(data, dict) or not isinstance(data.get("implicit"), list):
        raise CorpusFormatError(path, 1, "implicit", "missing or not a list")
    return list(data["implicit"])
