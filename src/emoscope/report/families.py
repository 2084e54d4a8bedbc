"""The report's sections on speaker and deflection families and on the chat readout.

Plain tables from ``report["families"]`` (see :mod:`emoscope.analysis.families`); ``None`` when
the run built no families, so the page simply leaves the sections out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from emoscope.report import plots
from emoscope.report.render import Table, mark, pct

Report = dict[str, Any]


def _acc(entry: dict[str, Any] | None) -> str:
    return "-" if not entry else f"{pct(entry['top1'])} / {pct(entry['top5'])}"


def family_table(section: Report) -> Table:
    rows = [
        [
            name,
            s["description"],
            s["emotions"],
            f"{s['n_train']} / {s['n_test']}",
            s["default_layer"],
            _acc(s["cv_train"]),
            _acc(s["test"]),
            pct(s["chance_top1"]),
        ]
        for name, s in section["summary"].items()
    ]
    headers = ["family", "reads", "emotions", "rows train / test", "default layer"]
    headers += ["CV top-1 / top-5", "test top-1 / top-5", "chance top-1"]
    return Table(headers, rows)


def chat_table(chat: Report) -> dict[str, Any]:
    best = chat["best_by_family_site"]
    rows = [
        [
            c["family"],
            c["site"].replace("_", " "),
            c["layer"],
            pct(c["train"]),
            pct(c["test"]),
            f"{c['test_mrr']:.2f}",
            pct(c["test_set_centred"]) if "test_set_centred" in c else "-",
        ]
        for c in sorted(best.values(), key=lambda c: (-c["train"], -c["train_mrr"]))
    ]
    by_layer: dict[str, dict[int, float]] = {}
    for c in chat["candidates"]:
        by_layer.setdefault(f"{c['family']} @ {c['site'].replace('_', ' ')}", {})[c["layer"]] = c[
            "test"
        ]
    layers = sorted({c["layer"] for c in chat["candidates"]})
    layer_rows = [[name, *[pct(v[layer]) for layer in layers]] for name, v in by_layer.items()]
    choice = chat["choice"]
    return {
        "choice": f"{choice['family']} vectors, {choice['site'].replace('_', ' ')}, layer {choice['layer']}",
        "choice_train": pct(choice["train"]),
        "choice_test": pct(choice["test"]),
        "target": mark(choice["test"] >= 0.5),
        "n_train": chat["n_train"],
        "n_test": chat["n_test"],
        "n_targets": len(chat["targets"]),
        "table": Table(
            [
                "family",
                "site",
                "best train layer",
                "train",
                "test",
                "test MRR",
                "test, centred across the set",
            ],
            rows,
        ),
        "by_layer": Table(["family @ site (test accuracy)", *map(str, layers)], layer_rows),
        "agreement": ", ".join(
            f"{site.replace('_', ' ')} {pct(v)}"
            for site, v in chat["story_vs_present_agreement"].items()
        ),
    }


def grid_section(grid: Report) -> dict[str, Any]:
    names = grid["families"]
    s = grid["summary"]
    plot = plots.heatmap(
        np.array(grid["matrix"]),
        names,
        f"layer {grid['layer']}",
        size=5,
        vmin=-1,
        vmax=1,
        annotate=True,
    )
    rows = [
        [r["layer"], f"{r['within']:.2f}", f"{r['across']:+.2f}", f"{r['present_vs_other']:+.2f}"]
        for r in grid["by_layer"]
    ]
    return {
        "layer": grid["layer"],
        "within": f"{s['within']:.2f}",
        "across": f"{s['across_abs']:.2f}",
        "within_met": mark(s["within"] >= 0.6),
        "across_met": mark(s["across_abs"] <= 0.3),
        "plot": plot,
        "table": Table(["layer", "within groups", "across groups", "present vs other"], rows),
    }


def rsa_table(rsa: Report, framing: Report) -> Table:
    rows = [
        [name, r["layer"], r["n_emotions"], f"{r['rsa']:.2f}", f"{r['same_emotion_cosine']:+.2f}"]
        for name, r in rsa.items()
    ]
    if framing:
        rows.append(
            [
                "present (Person 1/2 vs chat framing)",
                framing["layer"],
                "",
                f"{framing['rsa']:.2f}",
                f"{framing['same_emotion_cosine']:+.2f}",
            ]
        )
    return Table(
        ["family", "layer", "emotions", "RSA with story vectors", "same-emotion cosine"], rows
    )


def framing_table(framing: Report) -> Table | None:
    if not framing:
        return None
    rows = [
        [key.replace("_", " "), _acc(framing[key])]
        for key in (
            "chat_vectors_on_chat_test",
            "person_vectors_on_chat_test",
            "person_vectors_on_person_test",
            "chat_vectors_on_person_test",
        )
    ]
    return Table(["present-speaker vectors -> test turns", "top-1 / top-5"], rows)


def deflection_section(deflection: Report) -> dict[str, Any] | None:
    if not deflection:
        return None
    rows = [
        [
            family,
            d["layer"],
            pct(d["norm_left"]),
            pct(d["random_direction_norm_left"]),
            d["story_subspace_dims"],
            f"{d['cosine_to_story']:+.2f}",
            mark(d["norm_left"] >= 0.5),
        ]
        for family, d in deflection.items()
        if family != "hidden_emotion_test"
    ]
    hidden = deflection["hidden_emotion_test"]
    return {
        "table": Table(
            [
                "family",
                "layer",
                "norm left outside the story subspace",
                "a random direction",
                "story subspace dims (99%)",
                "cosine to story vector",
                ">= 50%",
            ],
            rows,
        ),
        "hidden": Table(
            ["on the test deflection turns", "share"],
            [
                ["felt vectors read the felt emotion", pct(hidden["felt_family_reads_felt"])],
                ["story vectors read the felt emotion", pct(hidden["story_reads_felt"])],
                ["story vectors read the displayed emotion", pct(hidden["story_reads_displayed"])],
                ["chance (felt vectors)", pct(hidden["chance_felt_family"])],
            ],
        ),
        "n": hidden["n"],
    }


def decodability_table(section: Report) -> Table:
    rows = []
    for family, d in section.items():
        at = d["at_default"]
        if "valence" not in at:
            continue
        rows.append(
            [
                family,
                d["default_layer"],
                at["k"],
                f"{at['valence']['ridge_cv_r']:.2f}",
                f"{at['valence']['best_single_pc_r']:.2f} (PC{at['valence']['best_single_pc']})",
                f"{at['arousal']['ridge_cv_r']:.2f}",
                f"{at['arousal']['best_single_pc_r']:.2f} (PC{at['arousal']['best_single_pc']})",
            ]
        )
    headers = ["family", "layer", "top PCs", "valence: ridge CV r", "best single PC"]
    headers += ["arousal: ridge CV r", "best single PC"]
    return Table(headers, rows)


def sections(report: Report) -> dict[str, Any] | None:
    section = report.get("families")
    if not section:
        return None
    return {
        "families": family_table(section),
        "chat": chat_table(section["chat_readouts"]) if section.get("chat_readouts") else None,
        "grid": grid_section(section["grid"]) if section.get("grid") else None,
        "rsa": rsa_table(section.get("rsa") or {}, section.get("framing") or {}),
        "framing": framing_table(section.get("framing") or {}),
        "deflection": deflection_section(section.get("deflection") or {}),
        "decodability": decodability_table(section.get("decodability") or {}),
    }
