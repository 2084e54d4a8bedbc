"""Report of ``emoscope validate-steering``: ``steering.json`` plus a self-contained HTML page.

The page shows generated text, so it goes through the same escaping templates as the
extraction report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from emoscope.files import atomic_write_json
from emoscope.report import plots
from emoscope.report.render import Table, write_page

SAMPLE_CHARS = 120
DELTA_TITLE = "change in log-probability (rows: steered, columns: word)"


def feeling_section(test: dict[str, Any], title: str) -> dict[str, Any]:
    """One "He feels" / "I feel" result: its headline numbers and the word-by-word heatmap."""
    delta = np.array(test["delta_logprob"])
    plot = plots.heatmap(delta, test["words"], DELTA_TITLE, size=6, vmin=-6, vmax=6, annotate=True)
    return {
        "title": title,
        "prompt": test["prompt"],
        "strength": test["strength"],
        "layers": ", ".join(str(layer) for layer in test["layers"]),
        "own_word_rises": test["own_word_rises"],
        "own_word_top": test["own_word_top"],
        "n_words": len(test["words"]),
        "mean_diagonal": f"{test['mean_diagonal']:+.2f}",
        "mean_off_diagonal": f"{test['mean_off_diagonal']:+.2f}",
        "plot": plot,
    }


def dose_section(dose: dict[str, Any]) -> dict[str, Any]:
    """Dose-response curves and, per emotion, its correlations and the extreme samples."""
    headers = ["emotion", "rho (all)", "rho (coherent)", "ppl x2 at (-)", "ppl x2 at (+)"]
    headers += ["sample at -S", "sample at +S"]
    rows = [
        [
            emotion,
            plots.signed(d["spearman_rho"]),
            plots.signed(d["spearman_rho_coherent"]),
            d["perplexity_doubles_at"]["negative"],
            d["perplexity_doubles_at"]["positive"],
            d["samples"][0][:SAMPLE_CHARS],
            d["samples"][-1][:SAMPLE_CHARS],
        ]
        for emotion, d in dose["emotions"].items()
    ]
    return {
        "prompts": dose["prompts"],
        "max_new_tokens": dose["max_new_tokens"],
        "layers": ", ".join(str(layer) for layer in dose["layers"]),
        "plot": plots.dose_curves(dose),
        "table": Table(headers, rows),
    }


def speaker_section(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The speaker and deflection steering checks: one row per condition."""
    if not result:
        return None
    greet = [
        [
            key,
            f"{g['reassurance']:.0%}",
            f"{g['own_words']:.0%}"
            if "own_words" in g
            else " / ".join(f"{g[k]:.0%}" for k in g if k.startswith("own_words:")),
            f"{g['vader']:+.2f}",
            g["samples"][0][:SAMPLE_CHARS],
        ]
        for key, g in result["greeting"].items()
    ]
    deny = [
        [key, f"{d['denial']:.0%}", f"{d['vader']:+.2f}", d["samples"][0][:SAMPLE_CHARS]]
        for key, d in result["deflection"].items()
    ]
    return {
        "strengths": ", ".join(f"{s:g}" for s in result["strengths"]),
        "samples": result["samples_per_prompt"],
        "greeting": Table(
            ["family:emotion:strength", "reassurance", "own words", "VADER", "sample"], greet
        ),
        "deflection": Table(["family:emotion:strength", "denial", "VADER", "sample"], deny)
        if deny
        else None,
    }


def write_steering_report(result: dict[str, Any], out: Path | str) -> Path:
    """Write ``steering.json`` and ``steering.html`` into ``out``; return the page's path."""
    out = Path(out)
    atomic_write_json(out / "steering.json", result)
    feeling_tests = [
        feeling_section(result["he_feels"], "He feels"),
        feeling_section(result["i_feel"], "I feel"),
    ]
    dose = dose_section(result["dose_response"])
    return write_page(
        out / "steering.html",
        "steering.html.j2",
        feeling_tests=feeling_tests,
        dose=dose,
        speakers=speaker_section(result.get("speakers")),
    )
