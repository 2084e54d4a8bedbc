"""Two-speaker and deflection dialogue records: strict parsing, the naming gate, both framings
and the tokens of each speaker."""

from __future__ import annotations

import json

import pytest

from emoscope.corpus.dialogues import (
    leaks,
    load_deflection_dialogues,
    load_speaker_dialogues,
    render,
    speaker_token_mask,
)
from emoscope.errors import CorpusFormatError, EmoscopeError

TURNS = [
    {"speaker": "A", "text": "Did you see the river this morning?"},
    {"speaker": "B", "text": "Only from the bridge, on my way in."},
    {"speaker": "A", "text": "It came right up to the benches."},
    {"speaker": "B", "text": "They closed the lower path at noon."},
    {"speaker": "A", "text": "My shoes are still wet from it."},
    {"speaker": "B", "text": "Mine too, a little."},
]


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def speaker_record(**changes):
    record = {
        "id": "sp1",
        "topic": "river",
        "split": "train",
        "emotions": {"A": "afraid", "B": "calm"},
        "turns": TURNS,
    }
    return record | changes


def test_records_load_and_bad_lines_name_file_line_and_field(tmp_path):
    good = load_speaker_dialogues(write(tmp_path / "s.jsonl", [speaker_record()]))
    assert good[0].emotion("A") == "afraid" and good[0].turns[1].speaker == "B"
    bad = [
        (speaker_record(emotions={"A": "afraid"}), "emotions"),
        (speaker_record(emotions={"A": "afraid", "B": "grumpyish"}), "B"),
        (speaker_record(turns=TURNS[:4]), "turns"),
        (speaker_record(turns=[TURNS[1], *TURNS[1:]]), "turns"),
        (speaker_record(split="dev"), "split"),
    ]
    for record, field in bad:
        with pytest.raises(CorpusFormatError, match=field):
            load_speaker_dialogues(write(tmp_path / "bad.jsonl", [speaker_record(), record]))
    deflection = {
        "id": "df1",
        "topic": "river",
        "split": "test",
        "felt": "sad",
        "displayed": "cheerful",
        "context": "The first speaker's old house by the river was sold last week.",
        "turns": TURNS,
    }
    loaded = load_deflection_dialogues(write(tmp_path / "d.jsonl", [deflection]))
    assert loaded[0].felt == "sad" and loaded[0].displayed == "cheerful"
    with pytest.raises(EmoscopeError, match="does not exist"):
        load_speaker_dialogues(tmp_path / "missing")


def test_the_naming_gate_finds_either_speakers_emotion(tmp_path):
    named = [*TURNS[:5], {"speaker": "B", "text": "I feel calm about it, honestly."}]
    dialogue = load_speaker_dialogues(write(tmp_path / "s.jsonl", [speaker_record(turns=named)]))[0]
    assert leaks(dialogue) == ["calm"]


@pytest.mark.parametrize("framing", ["person", "chat"])
def test_each_speakers_tokens_are_found_in_both_framings(smollm, tmp_path, framing):
    dialogue = load_speaker_dialogues(write(tmp_path / "s.jsonl", [speaker_record()]))[0]
    rendered = render(smollm, dialogue.turns, framing)
    for speaker, start, end in rendered.spans:
        assert rendered.text[start:end] in {t["text"] for t in TURNS if t["speaker"] == speaker}
    ids = smollm.tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens)
    for speaker in ("A", "B"):
        mask = speaker_token_mask(smollm, rendered, speaker)
        words = smollm.tokenizer.decode(
            [t for t, keep in zip(ids["input_ids"], mask, strict=True) if keep]
        )
        assert "river" in words if speaker == "A" else "bridge" in words
        assert ("bridge" in words) == (speaker == "B")
    if framing == "person":
        assert rendered.text.startswith("Person 1: Did you see")
    else:
        assert "Person 1" not in rendered.text
    with pytest.raises(EmoscopeError, match="framing"):
        render(smollm, dialogue.turns, "narrated")


def test_the_shipped_dialogue_corpora_pass_every_gate():
    from emoscope.concepts import human_norms
    from emoscope.corpus.dialogues import dialogue_gates

    speakers, deflections = load_speaker_dialogues(), load_deflection_dialogues()
    results = dialogue_gates(speakers, deflections)
    assert all(r.passed for r in results), [(r.name, r.failures[:3]) for r in results]
    emotions = {emotion for d in speakers for _, emotion in d.emotions}
    core = {"happy", "sad", "afraid", "angry", "calm", "desperate", "loving", "guilty", "proud"}
    assert len(emotions) >= 45 and core <= emotions and emotions - core <= set(human_norms())
    pairs = {(d.felt, d.displayed) for d in deflections}
    assert len({felt for felt, _ in pairs}) >= 12 and len(pairs) >= 48
    assert all(sum(d.felt == f and d.displayed == s for d in deflections) >= 6 for f, s in pairs)
