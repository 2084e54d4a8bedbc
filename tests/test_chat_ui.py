"""The terminal chat: replies stay intact whatever the width, alerts and means get their own lines.

Terminal runs are checked on the screen a terminal would show: the raw output (with its cursor
moves and line erasing) is replayed by a small terminal model that wraps at the console width.
"""

from __future__ import annotations

import io
import json
import re
from itertools import pairwise
from pathlib import Path

import pytest
from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from conftest import synthetic_bank
from emoscope.chat_ui import MODEL_PROMPT, WrappedReply, alert_summary, line_starts, run_chat
from emoscope.errors import EmoscopeError
from emoscope.generation import SamplingConfig, chat_sampling
from emoscope.monitor import Alert

BAR_CHARACTERS = "█▌▐│·"
ALWAYS = "calm < 50 sigma for 3 tokens"  # holds on every token: fires once per reply, at token 3


def scripted(*lines: str):
    """A ``read_line`` that answers with ``lines`` and then ends the input (Ctrl-D)."""
    answers = iter(lines)

    def read_line(prompt: str) -> str:
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    return read_line


def terminal_screen(raw: str, width: int) -> list[str]:
    """Replay terminal output: text with auto-wrap at ``width``, CR, LF, cursor up, erase line."""
    lines: list[list[str]] = [[]]
    row = col = 0
    wrap_next = False
    for match in re.finditer(r"\x1b\[(\??)([0-9;]*)([A-Za-z])|\r|\n|[^\x1b\r\n]", raw):
        token = match.group()
        if token.startswith("\x1b"):
            private, argument, command = match.groups()
            if private or command == "m":  # cursor visibility, colours
                continue
            if command == "A":
                row, wrap_next = max(0, row - int(argument or 1)), False
            elif command == "K" and argument == "2":
                lines[row] = []
            else:
                raise AssertionError(f"unexpected control sequence {token!r}")
            continue
        if token == "\r":
            col, wrap_next = 0, False
            continue
        width_of = cell_len(token)
        if token == "\n" or wrap_next or col + width_of > width:
            row, col, wrap_next = row + 1, 0, False
            while len(lines) <= row:
                lines.append([])
            if token == "\n":
                continue
        line = lines[row]
        line.extend(" " * (col - len(line)))
        line[col : col + 1] = [token]
        col += width_of
        wrap_next = col >= width
    return ["".join(line).rstrip() for line in lines]


def transcripts(log: Path) -> list[dict]:
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return [r for r in records if r["type"] == "transcript"]


def reply_blocks(lines: list[str]) -> list[list[str]]:
    """Each reply's lines: from its ``model>`` line up to the first alert or mean line."""
    blocks = []
    for start, line in enumerate(lines):
        if line.startswith(MODEL_PROMPT):
            end = next(
                i for i in range(start, len(lines)) if lines[i].startswith(("ALERT ", "mean over"))
            )
            blocks.append(lines[start:end])
    return blocks


def words(text: str) -> list[str]:
    return text.split()


def compact(text: str) -> str:
    """The text without whitespace: what wrapping (which also folds long words) must keep."""
    return re.sub(r"\s", "", text)


def check_transcript(lines: list[str], log: Path, width: int, prompts: list[str]) -> None:
    """Replies intact and alone on their lines, an alert line and a mean after each, one record
    per turn in the log."""
    records = transcripts(log)
    assert [r["turns"][-2]["content"] for r in records] == prompts
    blocks = reply_blocks(lines)
    assert len(blocks) == len(records) == len(prompts)
    for block, record in zip(blocks, records):
        assert record["response"].strip(), "the model said nothing; the test would prove little"
        assert compact("".join(block)) == compact(MODEL_PROMPT + record["response"])
        assert all(cell_len(line) <= width for line in block)
        assert not any(c in line for line in block for c in BAR_CHARACTERS)
        after = lines[lines.index(block[0]) + len(block) :]
        mean = next(i for i, line in enumerate(after) if line.startswith("mean over "))
        alert = " ".join(after[:mean])  # one line, or wrapped over two on a narrow console
        assert re.fullmatch(
            r"ALERT calm < 50\.0 sigma for 3 token\(s\): [+-]\d+\.\d\d \(token 3\)", alert
        )
        assert record["alerts"][0]["step"] == 2 and record["mean_z"] is not None
    assert sum(line.startswith("mean over ") for line in lines) == len(prompts)
    assert compact("".join(lines)).count(str(log)) == 2  # said at the start and at the end


def wrapped_stream(text: str, width: int) -> list[str]:
    """The lines of ``text`` fed to a reply one character at a time, as tokens might split it."""
    reply = WrappedReply(Text(MODEL_PROMPT))
    lines: list[str] = []
    for char in text:
        reply.add(char)
        lines.extend(line.plain for line in reply.finished_lines(width))
    return lines + [line.plain for line in reply.rest(width)]


def test_wrapping_is_greedy_and_finished_lines_never_change():
    width = 20
    text = (
        "A reply that goes on for a while, with words of all sizes, and emoji 😀😀 too.\n\n"
        "A second paragraph after a blank line."
    )
    lines = wrapped_stream(text, width)
    assert words(" ".join(lines)) == words(MODEL_PROMPT + text)
    assert all(cell_len(line) <= width for line in lines)
    assert "" in lines  # the blank line between the paragraphs survives
    for line, following in pairwise(lines):
        if line and following:  # greedy: the next line's first word would not have fitted
            assert cell_len(line) + 1 + cell_len(following.split()[0]) > width, (line, following)

    folded = wrapped_stream("a supercalifragilisticexpialidociousandthensome word", width)
    assert folded == [
        f"{MODEL_PROMPT}a",
        "supercalifragilistic",
        "expialidociousandthe",
        "nsome word",
    ]
    assert line_starts("short", 20) == [] and line_starts("abcdef", 4) == [4]


def test_alerts_are_summarised_one_line_per_rule():
    often = [
        Alert("sad > 1.0 sigma for 2 token(s)", 0, step, "sad", 1.0 + step) for step in range(7)
    ]
    once = Alert("gap:afraid > 2.0", 0, 7, "afraid", 2.5)
    lines = [line.plain for line in alert_summary([*often, once])]
    assert lines == [
        "ALERT sad > 1.0 sigma for 2 token(s): 7 times (tokens 1, 2, 3, 4, 5, ...), peak +7.00 "
        "(token 7)",
        "ALERT gap:afraid > 2.0: +2.50 (whole reply)",
    ]


def test_plain_output_keeps_replies_intact(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    console = Console(record=True, width=80, file=io.StringIO())
    log = tmp_path / "chat.jsonl"
    prompts = ["hello there", "and now?"]
    status = run_chat(
        lm,
        synthetic_bank(lm),
        show=["happy", "sad", "calm"],
        alerts=[ALWAYS],
        sampling=SamplingConfig(60, stop_at_eos=False, repetition_penalty=1.3),
        log=log,
        console=console,
        read_line=scripted(*prompts),
    )
    assert status == 0
    output = console.export_text()
    assert "\x1b" not in console.file.getvalue()  # not a terminal: no escape codes at all
    for record in transcripts(log):
        assert f"\n{MODEL_PROMPT}{record['response']}\n" in output  # streamed as it came
    check_transcript(output.splitlines(), log, 10_000, prompts)
    assert "you> hello there" in output  # the user's side is in the transcript too


@pytest.mark.parametrize("width", [80, 44])
def test_live_terminal_screen_keeps_replies_intact(tiny_lm, tmp_path, width):
    lm = tiny_lm("llama")
    stream = io.StringIO()
    console = Console(width=width, file=stream, force_terminal=True, color_system="256")
    log = tmp_path / "chat.jsonl"
    prompts = ["hello there", "tell me more"]
    run_chat(
        lm,
        synthetic_bank(lm),
        show=["happy", "sad", "calm", "afraid"],
        alerts=[ALWAYS],
        sampling=SamplingConfig(80, stop_at_eos=False, repetition_penalty=1.3),
        log=log,
        console=console,
        read_line=scripted(*prompts),
    )
    raw = stream.getvalue()
    assert "token 40" in raw and "\x1b[1A" in raw  # the live region was drawn and redrawn
    screen = terminal_screen(raw, width)
    check_transcript(screen, log, width, prompts)
    assert not any(line.startswith("token ") for line in screen)  # the live region is gone
    assert len(reply_blocks(screen)[0]) >= 3  # the reply really wrapped


def test_alert_on_an_emotion_not_shown_is_refused(tiny_lm):
    lm = tiny_lm("llama")
    with pytest.raises(EmoscopeError, match="not being monitored"):
        run_chat(
            lm,
            synthetic_bank(lm),
            show=["happy"],
            alerts=["calm > 1"],
            sampling=SamplingConfig(4),
            console=Console(file=io.StringIO()),
            read_line=scripted("hi"),
        )


def test_real_model_chat_on_a_terminal(smollm, small_run, tmp_path):
    result, _config = small_run
    stream = io.StringIO()
    console = Console(width=80, file=stream, force_terminal=True, color_system="256")
    log = tmp_path / "chat.jsonl"
    prompts = ["My dog died this morning.", "Tell me about your day."]
    run_chat(
        smollm,
        result.bank,
        show=["happy", "sad", "calm", "desperate", "afraid", "angry"],
        alerts=[ALWAYS],
        sampling=chat_sampling(smollm, max_new_tokens=48, seed=0),
        log=log,
        console=console,
        read_line=scripted(*prompts),
    )
    screen = terminal_screen(stream.getvalue(), 80)
    check_transcript(screen, log, 80, prompts)
    records = transcripts(log)
    assert records[1]["turns"][1]["content"] == records[0]["response"]  # a real conversation
    assert all(len(r["response"].split()) >= 10 for r in records)
