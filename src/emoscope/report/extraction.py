"""The extraction report: the numbers of ``report.json`` arranged as one self-contained page.

Each function below prepares one section as plain values (strings, numbers, :class:`Table`s and
figures); ``templates/extraction.html.j2`` lays them out, escaping everything but the figures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emoscope.concepts import Norm, human_norms
from emoscope.report import plots
from emoscope.report.families import sections as family_sections
from emoscope.report.render import Styled, Table, mark, pct, write_page

if TYPE_CHECKING:
    from emoscope.vectors import EmotionBank

Report = dict[str, Any]

TARGETS: list[tuple[str, str, float, Callable[[float], str]]] = [
    ("Test-split top-5 accuracy (171-way)", "test_top5", 0.60, pct),
    ("|r(PC1, human valence)|", "pc1_valence_r", 0.80, lambda x: f"{abs(x):.3f}"),
    ("max |r(PC2 or PC3, human arousal)|", "max_pc23_arousal_r", 0.60, lambda x: f"{x:.3f}"),
    ("Implicit prompts: target on top (z-scored)", "implicit_accuracy", 0.75, pct),
]


def summary_rows(summary: dict[str, Any]) -> list[list[str | Styled]]:
    """One row per headline target: measure, value, target, and whether it is met."""
    rows: list[list[str | Styled]] = []
    for label, key, target, fmt in TARGETS:
        value = summary[key]
        rows.append([label, fmt(value), fmt(target), mark(abs(value) >= target)])
    held, total = summary["intensity_directions_held"], summary["intensity_directions_total"]
    rows.append(
        [
            "Intensity templates in expected direction",
            f"{held}/{total}",
            f"{total}/{total}",
            mark(held == total),
        ]
    )
    return rows


def header(report: Report) -> dict[str, Any]:
    model, corpus = report["model"], report["corpus"]
    selection = report["story_variance_selection"]
    return {
        "model": model["model"],
        "family": model["family"],
        "n_layers": model["n_layers"],
        "hidden_size": model["hidden_size"],
        "dtype": model["dtype"],
        "device": model["device"],
        "version": report["emoscope_version"],
        "corpus_sha256": corpus["sha256"][:16],
        "stories": corpus["stories"],
        "train": corpus["train"],
        "test": corpus["test"],
        "neutral_dialogues": corpus["neutral_dialogues"],
        "layer": report["default_layer"],
        "two_thirds": report["two_thirds_layer"],
        "story_variance": f"{selection['story_variance']:.0%}",
        "story_variance_grid": ", ".join(f"{x:.0%}" for x in selection["grid"]),
    }


def summary_table(report: Report) -> Table:
    return Table(["measure", "value", "target", ""], summary_rows(report["summary"]))


def layer_sweep(report: Report, emotions: Sequence[str]) -> dict[str, Any]:
    sweep = report["layer_sweep"]
    headers = ["layer", "test top-1", "test top-5", "raw top-5", "CV top-1", "CV top-5"]
    headers += ["r(PC1,valence)", "neutral PCs", "all projected", "mean norm"]
    rows = [
        [
            r["layer"],
            pct(r["test"]["top1"]),
            pct(r["test"]["top5"]),
            pct(r["test_raw"]["top5"]),
            pct(r["cv_train"]["top1"]),
            pct(r["cv_train"]["top5"]),
            f"{r['pc1_valence_r']:+.3f}",
            r["neutral_components"],
            r["projected_components"],
            f"{r['residual_norm']:.1f}",
        ]
        for r in sweep
    ]
    return {
        "n_emotions": len(emotions),
        "plot": plots.layer_sweep(sweep, report["default_layer"], report["two_thirds_layer"]),
        "table": Table(headers, rows),
    }


def emotion_space(
    report: Report, emotions: Sequence[str], norms: dict[str, Norm]
) -> dict[str, Any]:
    geo = report["geometry"]
    variance = ", ".join(f"PC{i + 1} {pct(v)}" for i, v in enumerate(geo["pca_variance_ratio"][:5]))
    return {
        "layer": report["default_layer"],
        "n_emotions": len(emotions),
        "variance": variance,
        "map": plots.emotion_map_svg(geo["pca_scores"], geo["clusters"], norms),
    }


def against_norms(
    report: Report, emotions: Sequence[str], norms: dict[str, Norm]
) -> dict[str, Any]:
    geo = report["geometry"]
    points = geo["pca_scores"]
    rated = [e for e in emotions if e in norms]
    scatters = [
        plots.norm_scatter(
            [points[e][pc] for e in rated],
            [getattr(norms[e], dim) for e in rated],
            rated,
            f"PC{pc + 1}",
            f"human {dim} (Warriner)",
            geo["norms"][f"pc{pc + 1}_{dim}"]["r"],
        )
        for pc, dim in ((0, "valence"), (1, "arousal"), (2, "arousal"))
    ]
    rows = [
        [key.replace("_", " vs "), f"{v['r']:+.3f}", f"{v['p']:.2g}", v["n"]]
        for key, v in geo["norms"].items()
    ]
    return {
        "n_rated": len(rated),
        "table": Table(["correlation", "r", "p", "n"], rows),
        "scatters": scatters,
    }


def cosine(report: Report, emotions: Sequence[str]) -> dict[str, Any]:
    geo = report["geometry"]
    order = [emotions.index(e) for e in geo["cosine_order"]]
    matrix = np.array(geo["cosine"])[np.ix_(order, order)]
    title = f"layer {report['default_layer']}"
    return {"plot": plots.heatmap(matrix, geo["cosine_order"], title)}


def clusters(report: Report) -> dict[str, Any]:
    groups = report["geometry"]["clusters"]
    rows = [[i + 1, len(members), ", ".join(members)] for i, members in enumerate(groups)]
    return {"k": len(groups), "table": Table(["cluster", "size", "members"], rows)}


def implicit(report: Report) -> dict[str, Any]:
    imp = report["implicit"]
    z = imp["z_scored"]
    rows = [
        [text, p["target"], p["top"], p["rank"]] for text, p in zip(imp["prompts"], z["per_prompt"])
    ]
    matrix, title = np.array(z["mean_matrix"]), "mean z-score"
    plot = plots.heatmap(matrix, imp["targets"], title, size=6, vmin=-3, vmax=3, annotate=True)
    return {
        "n_targets": len(imp["targets"]),
        "correct": z["correct"],
        "n": z["n"],
        "accuracy": pct(z["accuracy"]),
        "accuracy_centred": pct(imp["centred"]["accuracy"]),
        "plot": plot,
        "table": Table(["prompt", "target", "top emotion", "rank of target"], rows),
    }


def intensity(report: Report) -> dict[str, Any]:
    inten = report["intensity"]
    rows = [
        [
            t["id"],
            t["template"],
            emotion,
            trend["expected"],
            f"{trend['rho']:+.2f}",
            mark(trend["holds"]),
        ]
        for t in inten["templates"]
        for emotion, trend in t["trends"].items()
    ]
    return {
        "held": inten["held"],
        "total": inten["total"],
        "table": Table(["template", "text", "emotion", "expected", "rho", ""], rows),
        "plot": plots.intensity_lines(inten["templates"]),
    }


def _tokens(tokens: Sequence[str]) -> str:
    """Tokens joined for reading; a whitespace-only token is shown by its repr so it is visible."""
    return " · ".join(t.strip() or repr(t) for t in tokens)


def logit_lens(report: Report) -> Table:
    rows = [
        [emotion, _tokens(v["top"]), _tokens(v["bottom"])]
        for emotion, v in report["logit_lens"].items()
    ]
    return Table(["emotion", "top tokens", "bottom tokens"], rows)


def stability(report: Report, emotions: Sequence[str]) -> dict[str, Any]:
    geo = report["geometry"]
    names = [str(x) for x in geo["rsa_layers"]]
    plot = plots.heatmap(np.array(geo["rsa"]), names, "RSA", size=5, vmin=0, vmax=1, annotate=True)
    return {
        "n_emotions": len(emotions),
        "mean_offdiag": f"{geo['rsa_mean_offdiag']:.3f}",
        "plot": plot,
    }


def per_emotion(report: Report) -> Table | None:
    """Test-split ranks per emotion, best first; ``None`` when the run has no test split."""
    per = report.get("per_emotion_test") or {}
    if not per:
        return None
    by_mean_rank = sorted(per.items(), key=lambda item: float(np.mean(item[1]["ranks"])))
    rows = [
        [
            emotion,
            f"{np.mean(v['ranks']):.1f}",
            sum(r == 1 for r in v["ranks"]),
            sum(r <= 5 for r in v["ranks"]),
            len(v["ranks"]),
            ", ".join(sorted(set(v["confused_with"]))[:4]),
        ]
        for emotion, v in by_mean_rank
    ]
    headers = ["emotion", "mean rank", "top-1", "top-5", "stories", "confused with"]
    return Table(headers, rows)


def recipe(report: Report) -> dict[str, Table]:
    parameters = [[key, str(value)] for key, value in report["recipe"].items()]
    timings = [[stage, f"{s:.1f}"] for stage, s in report.get("timings", {}).items()]
    return {
        "parameters": Table(["parameter", "value"], parameters),
        "timings": Table(["stage", "seconds"], timings),
    }


def sections(report: Report, bank: EmotionBank) -> dict[str, Any]:
    """Everything the extraction template needs, one entry per section."""
    emotions = list(bank.emotions)
    norms = human_norms(emotions)
    return {
        "header": header(report),
        "summary": summary_table(report),
        "sweep": layer_sweep(report, emotions),
        "space": emotion_space(report, emotions, norms),
        "norms": against_norms(report, emotions, norms),
        "cosine": cosine(report, emotions),
        "clusters": clusters(report),
        "implicit": implicit(report),
        "intensity": intensity(report),
        "logit_lens": logit_lens(report),
        "stability": stability(report, emotions),
        "per_emotion": per_emotion(report),
        "recipe": recipe(report),
        "speakers": family_sections(report),
    }


def write_report(report: Report, bank: EmotionBank, out: Path | str) -> Path:
    """Write ``report.html`` into ``out``: one page that opens offline, every text escaped."""
    return write_page(Path(out) / "report.html", "extraction.html.j2", **sections(report, bank))
