"""Self-generation on SmolLM2: parsing, filtering, and surviving a kill at any moment."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from emoscope.corpus.generate import (
    Cell,
    GenerationPlan,
    generate_corpus,
    parse_dialogues,
    parse_stories,
    plan_cells,
)
from emoscope.corpus.records import load_stories
from emoscope.errors import EmoscopeError, RunDirectoryError
from emoscope.files import iter_complete_jsonl

LONG = "word " * 60


def test_parsing_drops_leaked_duplicate_and_malformed():
    cell = Cell("afraid|x", "afraid", "landlord-letter", "premise", "train")
    good = "She held her breath in the dark hallway and listened to the floor creak. " * 5
    raw = f"[story 1]\n{good}\n[story 2]\nShe was afraid. {LONG}\n[story 3]\n{good}\n[story 4]\ntoo short"
    kept, dropped = parse_stories(cell, raw, [])
    assert len(kept) == 1 and kept[0]["emotion"] == "afraid" and kept[0]["person"] == "third"
    assert dropped == {"leaked": 1, "duplicate": 1, "malformed": 1}


def test_neutral_dialogue_parsing():
    cell = Cell("neutral|x", None, "landlord-letter", "premise", "train")
    raw = (
        "[dialogue 1]\nPerson: How long is a lease notice period?\nAI: It is usually thirty days.\n"
        "Person: Is that written in the lease?\nAI: Yes, in the termination clause.\n"
        "[dialogue 2]\nPerson: Thanks so much!\nAI: Happy to help!\nPerson: ok\nAI: ok"
    )
    kept, dropped = parse_dialogues(cell, raw, [])
    assert len(kept) == 1 and [t["role"] for t in kept[0]["turns"]] == [
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert dropped["emotional"] == 1


def test_plan_covers_each_emotion_with_distinct_topics():
    cells = plan_cells(GenerationPlan(emotions=["happy", "sad"], n_topics=5))
    assert len(cells) == 10 and len({c.key for c in cells}) == 10


def test_generate_on_smollm_end_to_end(smollm, tmp_path):
    plan = GenerationPlan(
        emotions=["happy"], n_topics=2, per_call=2, batch_size=2, max_new_tokens=160
    )
    summary = generate_corpus(smollm, tmp_path, plan, progress=False)
    assert summary["cells_done"] == 2
    lines = list(iter_complete_jsonl(tmp_path / "log.jsonl"))
    assert len(lines) == 2 and all(line["raw"] for line in lines)
    stories = load_stories(tmp_path / "stories.jsonl")  # the corpus format extract reads
    assert len(stories) == summary["kept"] and all(s.emotion == "happy" for s in stories)
    again = generate_corpus(smollm, tmp_path, plan, progress=False)  # nothing left to do
    assert again["cells_done"] == 2 and len(list(iter_complete_jsonl(tmp_path / "log.jsonl"))) == 2
    with pytest.raises(EmoscopeError, match="different kind"):
        generate_corpus(smollm, tmp_path, GenerationPlan(kind="neutral"), progress=False)


def test_interrupted_run_resumes_without_losing_or_repeating_cells(smollm, tmp_path):
    """Ctrl-C after the first batch is on disk, plus the torn line a kill mid-write leaves; the
    resumed run finishes the plan with every cell exactly once, as an uninterrupted run would."""
    plan = GenerationPlan(
        emotions=["calm", "sad"], n_topics=2, per_call=1, batch_size=2, max_new_tokens=40
    )
    planned = [c.key for c in plan_cells(plan)]
    out = tmp_path / "interrupted"
    seen: list[list[str]] = []

    def stop_after_first_batch(entries):
        seen.append([e["cell"] for e in entries])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_corpus(smollm, out, plan, progress=False, on_batch=stop_after_first_batch)
    log = out / "log.jsonl"
    first = list(iter_complete_jsonl(log))
    assert seen == [planned[:2]] and [e["cell"] for e in first] == planned[:2]
    assert len(load_stories(out / "stories.jsonl")) == sum(len(e["items"]) for e in first)
    with log.open("a") as f:  # what a kill in the middle of a write leaves behind
        f.write('{"cell": "calm|half-writ')

    summary = generate_corpus(smollm, out, plan, progress=False)
    entries = list(iter_complete_jsonl(log))
    assert [e["cell"] for e in entries] == planned  # nothing lost, nothing repeated, in order
    assert entries[:2] == first  # finished cells are never redone
    assert summary["cells_done"] == summary["cells_planned"] == len(planned)
    assert len(load_stories(out / "stories.jsonl")) == summary["kept"]
    assert not [p.name for p in out.iterdir() if "partial" in p.name]

    reference = tmp_path / "uninterrupted"
    generate_corpus(smollm, reference, plan, progress=False)
    assert list(iter_complete_jsonl(reference / "log.jsonl")) == entries


def test_a_corrupt_or_foreign_folder_is_refused(tmp_path):
    lm = SimpleNamespace(name="some-model")  # refused before any model call
    plan = GenerationPlan(emotions=["calm"], n_topics=1)
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(RunDirectoryError, match="not valid JSON"):
        generate_corpus(lm, tmp_path, plan, progress=False)
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "log.jsonl").write_text("")
    with pytest.raises(RunDirectoryError, match=r"log\.jsonl but no plan\.json"):
        generate_corpus(lm, orphan, plan, progress=False)
