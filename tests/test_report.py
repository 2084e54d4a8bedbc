"""HTML reports show a run's numbers and escape every text that comes from a corpus, model or user."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from emoscope.errors import EmoscopeError
from emoscope.report import TARGETS, summary_rows, write_report
from emoscope.report.compare import compare
from emoscope.report.steering import write_steering_report


def hostile(tag: str) -> str:
    return f"<script>alert('{tag}')</script>"


def escaped(tag: str) -> str:
    return f"&lt;script&gt;alert(&#39;{tag}&#39;)&lt;/script&gt;"


def assert_only_escaped(page: str, tags: list[str]) -> None:
    assert "<script" not in page.lower()
    for tag in tags:
        assert escaped(tag) in page, tag


def figures(page: str) -> int:
    return len(re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+"', page))


@pytest.fixture
def run_report(small_run) -> tuple[dict, object]:
    result, _config = small_run
    return copy.deepcopy(result.report), result.bank


def test_extraction_report_shows_the_run_numbers(run_report, tmp_path):
    report, bank = run_report
    path = write_report(report, bank, tmp_path)
    assert path == tmp_path / "report.html"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no partial file left behind
    page = path.read_text(encoding="utf-8")

    summary = report["summary"]
    assert f"<td>{100 * summary['test_top5']:.1f}%</td>" in page
    assert f"Default layer <b>{report['default_layer']}</b>" in page
    assert f"<h1>emoscope report: {report['model']['model']}</h1>" in page
    for sweep in report["layer_sweep"]:
        assert f"<tr><td>{sweep['layer']}</td><td>{100 * sweep['test']['top1']:.1f}%</td>" in page
    held, total = summary["intensity_directions_held"], summary["intensity_directions_total"]
    assert f"<td>{held}/{total}</td>" in page
    for section in ["Summary", "Layer sweep", "Against human norms", "Implicit-emotion prompts",
                    "Intensity templates", "Logit lens", "Stability across layers",
                    "Recipe and timings"]:  # fmt: skip
        assert f"<h2>{section}</h2>" in page, section
    assert "<h2>Emotion space" in page and "<svg" in page
    assert ("<h2>Per-emotion test results</h2>" in page) == bool(report.get("per_emotion_test"))
    # layer sweep, 3 norm scatters, cosine, implicit, intensity, RSA, and the families' grid
    assert figures(page) == 9
    assert "Who feels what" in page and "Chat readouts: which vectors, where" in page
    chat = report["families"]["chat_readouts"]["choice"]
    assert f"layer {chat['layer']}</b>" in page
    for name in report["families"]["summary"]:
        assert f"<tr><td>{name}</td><td>" in page


def test_summary_rows_mark_each_target(run_report):
    report, _bank = run_report
    rows = summary_rows(report["summary"])
    assert len(rows) == len(TARGETS) + 1
    for (_label, key, target, _fmt), row in zip(TARGETS, rows):
        met = abs(report["summary"][key]) >= target
        assert str(row[-1]) == ("met" if met else "not met")


def test_extraction_report_escapes_corpus_model_and_user_text(run_report, tmp_path):
    report, bank = run_report
    report["model"]["model"] = hostile("model")
    report["implicit"]["prompts"][0] = hostile("prompt")
    first_emotion = next(iter(report["logit_lens"]))
    report["logit_lens"][first_emotion]["top"][0] = hostile("token")
    report["intensity"]["templates"][0]["template"] = hostile("template")
    report["recipe"]["note"] = hostile("recipe")
    report["corpus"]["sha256"] = hostile("sha")
    page = write_report(report, bank, tmp_path).read_text(encoding="utf-8")
    assert_only_escaped(page, ["model", "prompt", "token", "template", "recipe"])
    assert "&lt;script&gt;al" in page  # the 16-character hash prefix, escaped too
    assert figures(page) == 9  # the figures themselves are still real images


def test_extraction_report_escapes_emotion_names(run_report, tmp_path):
    """Emotion names reach the emotion map, cluster lists and tables; a custom bank could hold any."""
    report, bank = run_report
    name = "happy"
    renamed = "<b onmouseover=alert(1)>happy</b>"
    text = json.dumps(report).replace(json.dumps(name), json.dumps(renamed))
    report = json.loads(text)
    fake_bank = SimpleNamespace(emotions=[renamed if e == name else e for e in bank.emotions])
    page = write_report(report, fake_bank, tmp_path).read_text(encoding="utf-8")
    assert "<b onmouseover" not in page
    assert "&lt;b onmouseover=alert(1)&gt;happy&lt;/b&gt;" in page
    map_svg = page[page.index("<svg") : page.index("</svg>")]
    assert "&lt;b onmouseover=alert(1)&gt;happy&lt;/b&gt;" in map_svg


def steering_result(prompt: str, sample: str) -> dict:
    words = ["happy", "sad"]
    feeling = {
        "prompt": prompt,
        "strength": 0.5,
        "layers": [3],
        "words": words,
        "delta_logprob": [[1.5, -0.25], [-0.5, 2.0]],
        "own_word_rises": 2,
        "own_word_top": 2,
        "mean_diagonal": 1.75,
        "mean_off_diagonal": -0.25,
        "diagonal_minus_off": 2.0,
    }
    strengths = [-0.3, 0.0, 0.3]
    dose = {
        "strengths": strengths,
        "layers": [3],
        "prompts": 2,
        "max_new_tokens": 5,
        "baseline_perplexity": 4.0,
        "emotions": {
            e: {
                "mean_vader": [-0.2, 0.0, 0.4],
                "perplexity": [5.0, 4.0, 9.0],
                "spearman_rho": 1.0,
                "spearman_rho_coherent": 0.5,
                "coherent_strengths": strengths[:2],
                "perplexity_doubles_at": {"negative": None, "positive": 0.25},
                "samples": [sample, "plain text", "more text"],
            }
            for e in words
        },
    }
    summary = {
        "he_feels_own_word_rises": 2,
        "he_feels_diagonal_minus_off": 2.0,
        "i_feel_own_word_rises": 2,
        "dose_rho": {e: 0.5 for e in words},
    }
    return {
        "summary": summary,
        "he_feels": feeling,
        "i_feel": dict(feeling, prompt="How do you feel? / I feel"),
        "dose_response": dose,
    }


def test_steering_report_escapes_prompts_and_samples(tmp_path):
    result = steering_result(hostile("prompt"), hostile("sample"))
    path = write_steering_report(result, tmp_path / "steering")
    assert path == tmp_path / "steering" / "steering.html"
    assert json.loads((path.parent / "steering.json").read_text()) == result
    page = path.read_text(encoding="utf-8")
    assert_only_escaped(page, ["prompt", "sample"])
    flat = " ".join(page.split())
    assert "own word rises for 2/2" in flat and "mean diagonal +1.75, off-diagonal -0.25" in flat
    assert "<td>0.25</td>" in page  # perplexity doubles at +0.25
    assert figures(page) == 3  # two feeling heatmaps and the dose-response curves


def write_run(folder: Path, report: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_compare_puts_runs_side_by_side(run_report, tmp_path):
    report, _bank = run_report
    other = copy.deepcopy(report)
    other["model"]["model"] = "other|model"
    other["summary"]["test_top5"] = 0.123
    first = write_run(tmp_path / "a", report)
    second = write_run(tmp_path / "b", other)
    table = compare([first, second])
    lines = table.splitlines()
    assert lines[0] == f"| measure | {report['model']['model']} | other\\|model |"
    top = next(line for line in lines if line.startswith("| test top-1 / top-5"))
    cells = [c.strip() for c in top.strip("|").split(" | ")]
    assert cells[1].endswith(f" / {report['summary']['test_top5']:.1%}")
    assert cells[2].endswith(" / 12.3%")
    layer_row = next(line for line in lines if line.startswith("| default layer"))
    assert layer_row.count(f" {report['default_layer']} |") == 2


def test_compare_names_the_missing_report(run_report, tmp_path):
    report, _bank = run_report
    first = write_run(tmp_path / "a", report)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EmoscopeError, match=r"empty/report\.json does not exist.*emoscope extract"):
        compare([first, empty])
    del report["geometry"]
    old = write_run(tmp_path / "old", report)
    with pytest.raises(EmoscopeError, match=r"old/report\.json lacks the numbers for"):
        compare([first, old])
