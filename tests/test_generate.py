"""Self-generation on SmolLM2: parsing, filtering, and surviving a kill at any moment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emoscope.corpus.generate import (
    Cell,
    GenerationPlan,
    generate_corpus,
    parse_dialogues,
    parse_stories,
    plan_cells,
)
from emoscope.corpus.records import iter_complete_jsonl, load_stories
from emoscope.errors import EmoscopeError

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


def test_kill_mid_run_then_resume(smollm, tmp_path):
    out = tmp_path / "gen"
    cmd = [
        sys.executable,
        "-m",
        "emoscope.cli",
        "corpus",
        "generate",
        "--model",
        "smollm2-135m-instruct",
        "--out",
        str(out),
        "--emotions",
        "calm,sad",
        "--topics",
        "2",
        "--batch-size",
        "1",
        "--max-new-tokens",
        "60",
        "--no-progress",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    log = out / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 1):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(iter_complete_jsonl(log)))
    assert 1 <= finished < 4
    with log.open("a") as f:  # what a kill in the middle of a write leaves behind
        f.write('{"cell": "calm|half-writ')
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    cells = [entry["cell"] for entry in iter_complete_jsonl(log)]
    assert sorted(cells) == sorted(set(cells)) and len(cells) == 4
    load_stories(out / "stories.jsonl")
    assert not list(Path(out).glob("*.partial-*"))
    assert json.loads(log.read_text().splitlines()[-1])["cell"] in cells
