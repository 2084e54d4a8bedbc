"""The shipped corpus passes every quality gate, and bad corpus files give precise errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emoscope.concepts import (
    CORE_EMOTIONS,
    EMOTIONS,
    find_forbidden,
    forbidden_words,
    human_norms,
    resolve_emotion,
)
from emoscope.corpus import quality
from emoscope.corpus.card import build_card
from emoscope.corpus.records import (
    load_eval_prompts,
    load_neutral,
    load_stories,
    load_topics,
)
from emoscope.errors import CorpusFormatError, UnknownEmotionError
from emoscope.files import append_jsonl, iter_complete_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stories():
    return load_stories()


def test_the_171_concepts():
    assert len(EMOTIONS) == 171 == len(set(EMOTIONS))
    for quirk in (
        "hope",
        "hopeful",
        "at ease",
        "on edge",
        "worn out",
        "grief-stricken",
        "self-confident",
        "self-conscious",
        "self-critical",
    ):
        assert quirk in EMOTIONS
    assert EMOTIONS[0] == "afraid" and EMOTIONS[-1] == "worthless"
    assert all(forbidden_words(e)[0] == e for e in EMOTIONS)


def test_warriner_norms_match_126_words():
    norms = human_norms()
    assert len(norms) == 126
    assert norms["happy"].valence > 8 and norms["sad"].valence < 2.5
    assert norms["calm"].arousal < norms["excited"].arousal


def test_forbidden_matching_is_whole_word_and_case_insensitive():
    assert find_forbidden("afraid", "She was AFRAID.") == ["AFRAID"]
    assert find_forbidden("sad", "The sadhu sat down.") == []
    assert find_forbidden("at ease", "He stood at  ease") == ["at  ease"]
    assert find_forbidden("self-confident", "She felt self-confident") == ["self-confident"]
    assert find_forbidden("kind", "a kind-hearted man") == []


def test_unknown_emotion_suggests_names():
    with pytest.raises(UnknownEmotionError, match="Did you mean: happy"):
        resolve_emotion("hapy")
    assert resolve_emotion("worn_out") == "worn out"


def test_story_counts_and_splits(stories):
    assert len(stories) >= 2736
    result = quality.check_counts(stories)
    assert result.passed, result.failures[:10]
    test_topics = {t.id for t in load_topics() if t.split == "test"}
    train_topics = {t.id for t in load_topics() if t.split == "train"}
    assert len(test_topics) + len(train_topics) >= 100
    assert {s.topic for s in stories if s.split == "test"} <= test_topics
    assert {s.topic for s in stories if s.split == "train"} <= train_topics


@pytest.mark.parametrize(
    "gate", ["check_leakage", "check_lengths", "check_duplicates", "check_valence"]
)
def test_story_gates(stories, gate):
    result = getattr(quality, gate)(stories)
    assert result.passed, result.failures[:10]


def test_neutral_dialogues_pass():
    dialogues = load_neutral()
    result = quality.check_neutral(dialogues)
    assert result.passed, result.failures[:10]
    assert len(dialogues) >= 400


def test_eval_prompts():
    prompts = load_eval_prompts()
    assert len(prompts["implicit"]) >= 36
    assert prompts["implicit_targets"] == list(CORE_EMOTIONS)
    for p in prompts["implicit"]:
        for target in prompts["implicit_targets"]:
            assert not find_forbidden(target, p["text"]), (p["id"], target)
    assert len(prompts["intensity"]) >= 6
    for t in prompts["intensity"]:
        assert "{value}" in t["template"] and len(t["values"]) >= 5
        assert all(d in ("increase", "decrease") for d in t["expected"].values())
        assert all(e in EMOTIONS for e in t["expected"])


def test_gates_catch_bad_stories(stories):
    leaked = type(stories[0])(
        "afraid", "landlord-letter", "train", "first", "I was afraid " + "word " * 80
    )
    assert not quality.check_leakage([leaked]).passed
    assert not quality.check_lengths(
        [leaked.__class__("sad", "x", "train", "first", "too short")]
    ).passed
    copy = stories[0].__class__(stories[1].emotion, "x", "train", "first", stories[0].text)
    assert not quality.check_duplicates([stories[0], copy]).passed


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = {"emotion": "sad", "topic": "t", "split": "train", "person": "first", "text": "words"}


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("{not json", "<line>"),
        (json.dumps({**GOOD, "emotion": "sadish"}), "emotion"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "text"}), "text"),
        (json.dumps({**GOOD, "split": "dev"}), "split"),
        (json.dumps({**GOOD, "person": "second"}), "person"),
    ],
)
def test_malformed_story_line_names_file_line_and_field(tmp_path, line, field):
    path = _write(tmp_path / "s.jsonl", [json.dumps(GOOD), line])
    with pytest.raises(CorpusFormatError) as info:
        load_stories(path)
    assert info.value.line == 2 and info.value.field == field
    assert str(path) in str(info.value)


def test_append_log_survives_a_torn_last_line(tmp_path):
    log = tmp_path / "out.jsonl"
    append_jsonl(log, [{"a": 1}])
    with log.open("a") as f:
        f.write('{"a": 2, "trunc')  # a kill in the middle of a write
    assert [r["a"] for r in iter_complete_jsonl(log)] == [1]
    append_jsonl(log, [{"a": 3}])
    assert [r["a"] for r in iter_complete_jsonl(log)] == [1, 3]


def test_corpus_card_is_current():
    card = (ROOT / "docs" / "corpus.md").read_text()
    assert card == build_card(), (
        "docs/corpus.md is stale: run `emoscope corpus card --out docs/corpus.md`"
    )


def test_training_implicit_prompts_name_no_emotion_and_repeat_no_test_prompt():
    from emoscope.concepts import find_forbidden
    from emoscope.corpus.records import load_eval_prompts, load_implicit_train

    train = load_implicit_train()
    test = load_eval_prompts()
    targets = test["implicit_targets"]
    assert sorted({p["emotion"] for p in train}) == sorted(targets)
    assert all(sum(p["emotion"] == t for p in train) >= 6 for t in targets)
    leaks = [(p["id"], e) for p in train for e in targets if find_forbidden(e, p["text"])]
    assert not leaks
    test_texts = {p["text"] for p in test["implicit"]}
    assert not test_texts & {p["text"] for p in train}
