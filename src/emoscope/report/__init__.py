"""The extraction report: one self-contained HTML page (opens offline) beside ``report.json``."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from emoscope.concepts import human_norms
from emoscope.report import plots
from emoscope.vectors import EmotionVectors

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .5em;text-align:left}
th{background:#f4f4f4}.ok{color:#1a7f37;font-weight:600}.miss{color:#b42318;font-weight:600}
img{max-width:100%}.map{width:100%;height:auto}.small{font-size:.8em;color:#666}code{background:#f4f4f4;padding:0 .2em}
"""


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _mark(ok: bool) -> str:
    return '<span class="ok">met</span>' if ok else '<span class="miss">not met</span>'


TARGETS = [
    ("Test-split top-5 accuracy (171-way)", "test_top5", 0.60, _pct),
    ("|r(PC1, human valence)|", "pc1_valence_r", 0.80, lambda x: f"{abs(x):.3f}"),
    ("max |r(PC2 or PC3, human arousal)|", "max_pc23_arousal_r", 0.60, lambda x: f"{x:.3f}"),
    ("Implicit prompts: target on top (z-scored)", "implicit_accuracy", 0.75, _pct),
]


def summary_rows(summary: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for label, key, target, fmt in TARGETS:
        value = summary[key]
        rows.append([label, fmt(value), fmt(target), _mark(abs(value) >= target)])
    held, total = summary["intensity_directions_held"], summary["intensity_directions_total"]
    rows.append(
        [
            "Intensity templates in expected direction",
            f"{held}/{total}",
            f"{total}/{total}",
            _mark(held == total),
        ]
    )
    return rows


def write_report(report: dict[str, Any], bank: EmotionVectors, out: Path) -> Path:
    s = report["summary"]
    geo = report["geometry"]
    layer = report["default_layer"]
    emotions = bank.emotions
    norms = human_norms(emotions)
    sections = []
    model = report["model"]
    sections.append(
        f"<h1>emoscope report: {html.escape(model['model'])}</h1>"
        f"<p class='small'>{model['family']} family, {model['n_layers']} layers, hidden {model['hidden_size']}, "
        f"{model['dtype']} on {model['device']}; emoscope {report['emoscope_version']}; corpus sha256 "
        f"<code>{report['corpus']['sha256'][:16]}</code>; {report['corpus']['stories']} stories "
        f"({report['corpus']['train']} train / {report['corpus']['test']} test, topic-disjoint), "
        f"{report['corpus']['neutral_dialogues']} neutral dialogues. Default layer <b>{layer}</b> "
        f"(chosen by cross-validation within the training split; 2/3 depth is layer {report['two_thirds_layer']}). "
        f"Within-emotion story variance projected out: {report['story_variance_selection']['story_variance']:.0%} "
        f"(chosen from {', '.join(f'{x:.0%}' for x in report['story_variance_selection']['grid'])} by the same cross-validation).</p>"
    )
    sections.append(
        "<h2>Summary</h2>" + _table(["measure", "value", "target", ""], summary_rows(s))
    )
    sections.append(
        "<h2>Layer sweep</h2><p>Nearest-vector classification of held-out stories over all "
        f"{len(emotions)} emotions, and the PC1-valence correlation, at every layer.</p>"
        f"<img src='{plots.layer_sweep(report['layer_sweep'], layer, report['two_thirds_layer'])}'>"
        + _table(
            [
                "layer",
                "test top-1",
                "test top-5",
                "raw top-5",
                "CV top-1",
                "CV top-5",
                "r(PC1,valence)",
                "neutral PCs",
                "all projected",
                "mean norm",
            ],
            [
                [
                    r["layer"],
                    _pct(r["test"]["top1"]),
                    _pct(r["test"]["top5"]),
                    _pct(r["test_raw"]["top5"]),
                    _pct(r["cv_train"]["top1"]),
                    _pct(r["cv_train"]["top5"]),
                    f"{r['pc1_valence_r']:+.3f}",
                    r["neutral_components"],
                    r["projected_components"],
                    f"{r['residual_norm']:.1f}",
                ]
                for r in report["layer_sweep"]
            ],
        )
    )
    pts = geo["pca_scores"]
    sections.append(
        f"<h2>Emotion space (layer {layer})</h2><p>PCA of the {len(emotions)} vectors; explained variance "
        + ", ".join(f"PC{i + 1} {_pct(v)}" for i, v in enumerate(geo["pca_variance_ratio"][:5]))
        + ". Colours are k-means clusters; hover a point for its human ratings.</p>"
        + plots.emotion_map_svg(pts, geo["clusters"], norms)
    )
    rated = [e for e in emotions if e in norms]
    scatter = []
    for pc, dim in ((0, "valence"), (1, "arousal"), (2, "arousal")):
        r = geo["norms"][f"pc{pc + 1}_{dim}"]
        scatter.append(
            plots.norm_scatter(
                [pts[e][pc] for e in rated],
                [getattr(norms[e], dim) for e in rated],
                rated,
                f"PC{pc + 1}",
                f"human {dim} (Warriner)",
                r["r"],
            )
        )
    sections.append(
        "<h2>Against human norms</h2><p>Warriner et al. (2013) ratings for the "
        f"{len(rated)} emotion words they rate.</p>"
        + _table(
            ["correlation", "r", "p", "n"],
            [
                [k.replace("_", " vs "), f"{v['r']:+.3f}", f"{v['p']:.2g}", v["n"]]
                for k, v in geo["norms"].items()
            ],
        )
        + "".join(f"<img src='{img}' style='width:32%'>" for img in scatter)
    )
    order = [emotions.index(e) for e in geo["cosine_order"]]
    cos = np.array(geo["cosine"])[np.ix_(order, order)]
    sections.append(
        f"<h2>Cosine similarity (hierarchical order)</h2><img src='{plots.heatmap(cos, geo['cosine_order'], f'layer {layer}')}'>"
    )
    sections.append(
        "<h2>k-means clusters (k = 10), ordered by mean human valence</h2>"
        + _table(
            ["cluster", "size", "members"],
            [[i + 1, len(c), ", ".join(c)] for i, c in enumerate(geo["clusters"])],
        )
    )
    imp = report["implicit"]
    sections.append(
        f"<h2>Implicit-emotion prompts</h2><p>Readout at the start of the assistant turn, z-scored against neutral prompts: "
        f"target on top among the {len(imp['targets'])} targets in {imp['z_scored']['correct']}/{imp['z_scored']['n']} prompts "
        f"({_pct(imp['z_scored']['accuracy'])}); without z-scoring {_pct(imp['centred']['accuracy'])}. Rows: target; columns: readout (mean z).</p>"
        f"<img src='{plots.heatmap(np.array(imp['z_scored']['mean_matrix']), imp['targets'], 'mean z-score', size=6, vmin=-3, vmax=3, annotate=True)}' style='width:60%'>"
        + _table(
            ["prompt", "target", "top emotion", "rank of target"],
            [
                [html.escape(t), p["target"], p["top"], p["rank"]]
                for t, p in zip(imp["prompts"], imp["z_scored"]["per_prompt"])
            ],
        )
    )
    inten = report["intensity"]
    rows = [
        [
            t["id"],
            html.escape(t["template"]),
            e,
            tr["expected"],
            f"{tr['rho']:+.2f}",
            _mark(tr["holds"]),
        ]
        for t in inten["templates"]
        for e, tr in t["trends"].items()
    ]
    sections.append(
        f"<h2>Intensity templates</h2><p>{inten['held']}/{inten['total']} expected directions hold (Spearman rho of the readout with the number).</p>"
        + _table(["template", "text", "emotion", "expected", "rho", ""], rows)
        + f"<img src='{plots.intensity_lines(inten['templates'])}'>"
    )
    sections.append(
        "<h2>Logit lens</h2><p>Tokens each direction promotes and suppresses through the final norm and unembedding.</p>"
        + _table(
            ["emotion", "top tokens", "bottom tokens"],
            [
                [
                    e,
                    html.escape(" · ".join(t.strip() or repr(t) for t in v["top"])),
                    html.escape(" · ".join(t.strip() or repr(t) for t in v["bottom"])),
                ]
                for e, v in report["logit_lens"].items()
            ],
        )
    )
    rsa = np.array(geo["rsa"])
    names = [str(x) for x in geo["rsa_layers"]]
    sections.append(
        f"<h2>Stability across layers</h2><p>Representational similarity of the 171x171 cosine structure between layers "
        f"(mean off-diagonal {geo['rsa_mean_offdiag']:.3f}).</p><img src='{plots.heatmap(rsa, names, 'RSA', size=5, vmin=0, vmax=1, annotate=True)}' style='width:50%'>"
    )
    per = report.get("per_emotion_test", {})
    if per:
        rows = sorted(
            (
                [
                    e,
                    f"{np.mean(v['ranks']):.1f}",
                    sum(r == 1 for r in v["ranks"]),
                    sum(r <= 5 for r in v["ranks"]),
                    len(v["ranks"]),
                    ", ".join(sorted(set(v["confused_with"]))[:4]),
                ]
                for e, v in per.items()
            ),
            key=lambda r: float(r[1]),
        )
        sections.append(
            "<h2>Per-emotion test results</h2>"
            + _table(["emotion", "mean rank", "top-1", "top-5", "stories", "confused with"], rows)
        )
    sections.append(
        "<h2>Recipe and timings</h2>"
        + _table(
            ["parameter", "value"], [[k, html.escape(str(v))] for k, v in report["recipe"].items()]
        )
        + _table(
            ["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in report.get("timings", {}).items()]
        )
    )
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>emoscope report</title><style>{STYLE}</style></head><body>{''.join(sections)}</body></html>"
    path = Path(out) / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
