"""Plots and the HTML section of an experiment run, drawn from ``results.json`` alone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from emoscope.report.plots import PALETTE, png
from emoscope.report.render import Table, write_page


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x)


def dose_plot(results: Mapping[str, Any], metric: str | None = None) -> Any:
    """Outcome against strength per emotion, with the baseline shared and 95% intervals."""
    rows = results["conditions"]
    base = next((r for r in rows if r["emotion"] is None), None)
    emotions = list(dict.fromkeys(r["emotion"] for r in rows if r["emotion"] is not None))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for k, emotion in enumerate(emotions):
        mine = [r for r in rows if r["emotion"] == emotion] + ([base] if base else [])
        mine = sorted(mine, key=lambda r: r["strength"])

        def pick(r: Mapping[str, Any]) -> tuple[float, list[float]]:
            if metric is None:
                return r["value"], r["ci95"]
            return r[metric]["value"], r[metric]["ci95"]

        xs = [r["strength"] for r in mine]
        ys = [pick(r)[0] for r in mine]
        lo = [pick(r)[0] - pick(r)[1][0] if pick(r)[1][0] is not None else 0 for r in mine]
        hi = [pick(r)[1][1] - pick(r)[0] if pick(r)[1][1] is not None else 0 for r in mine]
        ax.errorbar(
            xs,
            ys,
            yerr=[lo, hi],
            marker="o",
            capsize=3,
            label=emotion,
            color=PALETTE[k % len(PALETTE)],
        )
    ax.set_xlabel("steering strength (residual-norm units)")
    ax.set_ylabel(metric or results["metric"])
    ax.set_title(f"{results['experiment']} on {results['model']} ({results['mode']})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return png(fig)


def preference_plot(results: Mapping[str, Any]) -> Any:
    probe, delta = results["probe_elo_r"], results["steer_delta_elo"]
    names = [e for e in delta if probe.get(e) is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.scatter([probe[e] for e in names], [delta[e] for e in names], color=PALETTE[0])
    for e in names:
        left.annotate(e, (probe[e], delta[e]), fontsize=6)
    r = results["r_probe_vs_steer"].get("r")
    left.set_xlabel("probe-Elo correlation")
    left.set_ylabel("Elo change of steered activities")
    left.set_title(f"r = {fmt(r)}")
    cats = results["elo_by_category"]
    right.bar(list(cats), list(cats.values()), color=PALETTE[1])
    right.set_ylabel("mean Elo")
    right.tick_params(axis="x", rotation=45, labelsize=7)
    right.set_title("Elo by category (unsteered)")
    fig.tight_layout()
    return png(fig)


SMOOTHING = 40
"""Tokens in the moving average drawn over each per-token trace."""


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Causal moving average that skips NaN (attention sinks)."""
    kept = np.isfinite(values)
    total = np.convolve(np.where(kept, values, 0.0), np.ones(window))[: len(values)]
    count = np.convolve(kept.astype(float), np.ones(window))[: len(values)]
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def trace_plot(trace: Mapping[str, Any]) -> Any:
    """Per-token readouts of each failure transcript, the decision and pass turns marked."""
    traces = trace["traces"]
    fig, axes = plt.subplots(len(traces), 1, figsize=(9, 1.9 * len(traces)), squeeze=False)
    for ax, t in zip(axes[:, 0], traces):
        for k, emotion in enumerate(trace["emotions"]):
            values = np.array([v if v is not None else np.nan for v in t["tokens"][emotion]])
            ax.plot(values, lw=0.3, alpha=0.3, color=PALETTE[k])
            ax.plot(smooth(values, SMOOTHING), lw=1.2, color=PALETTE[k], label=emotion)
        turns = t["token_turn"]
        for marker, color in (("decision_turn", "red"), ("pass_turn", "green")):
            where = [i for i, n in enumerate(turns) if n == t[marker]]
            if where:
                ax.axvspan(where[0], where[-1], color=color, alpha=0.12)
        ax.set_ylabel(t["id"], fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel(
        f"token (z-scores; lines: {SMOOTHING}-token moving average; red: the turn that hacks; "
        "green: the passing test run)"
    )
    fig.tight_layout()
    return png(fig)


def write_section(results: Mapping[str, Any], out: Path, info: Mapping[str, Any]) -> Path:
    plots = []
    if results["experiment"] == "preferences":
        plots.append(preference_plot(results))
    else:
        plots.append(dose_plot(results))
        for metric in info.get("extra_metrics", ()):
            plots.append(dose_plot(results, metric))
    extras: list[dict[str, Any]] = []
    if "trace" in results and "traces" in results["trace"]:
        plots.append(trace_plot(results["trace"]))
        extras.append(trace_table(results["trace"]))
    conditions = Table(
        ["emotion", "strength", results["metric"], "95% CI", "n"],
        [
            [
                r["emotion"] or "(none)",
                r["strength"],
                fmt(r["value"]),
                f"[{fmt(r['ci95'][0])}, {fmt(r['ci95'][1])}]",
                r["n"],
            ]
            for r in results["conditions"]
        ],
    )
    trend = Table(
        ["emotion", "slope per unit strength", "p-value"],
        [[t["emotion"], fmt(t.get("slope")), fmt(t.get("p_value"))] for t in results["trend"]],
    )
    if "elo" in results:
        extras.append(
            {
                "title": "Elo (unsteered)",
                "text": f"r(probe-Elo correlation, Elo change) = {fmt(results['r_probe_vs_steer'].get('r'))}",
                "table": Table(
                    ["activity", "Elo"],
                    sorted(([k, v] for k, v in results["elo"].items()), key=lambda x: -x[1]),
                ),
            }
        )
    return write_page(
        out,
        "experiment.html.j2",
        name=results["experiment"],
        title=info["title"],
        description=info["description"],
        model=results["model"],
        bank=results["bank"],
        mode=results["mode"],
        quick=results.get("quick", False),
        n_scenarios=results["n_scenarios"],
        layers=results.get("steer_layers"),
        read_layer=results.get("read_layer"),
        plots=plots,
        conditions=conditions,
        trend=trend,
        extras=extras,
    )


def trace_table(trace: Mapping[str, Any]) -> dict[str, Any]:
    rows: list[Sequence[Any]] = []
    for emotion, t in trace["tests"].items():
        rise = t["rise_with_failures"]
        peak = t["peak_at_decision"]
        rows.append(
            [
                emotion,
                fmt(rise.get("slope")),
                fmt(rise.get("p_value")),
                f"{peak['traces']}/{peak['of']} (chance {fmt(peak['chance'])})",
                fmt(t["after_pass_minus_decision"]),
                t["fell_after_pass"],
            ]
        )
    return {
        "title": "Failure trace",
        "text": "Per assistant turn up to the hack: slope of the readout over the attempts "
        "(within transcript), how often the hacking turn is the highest, and the change from "
        "the hacking turn to the first turn after the tests pass.",
        "table": Table(
            [
                "emotion",
                "slope per attempt",
                "p-value",
                "peak at the hack",
                "after pass - hack",
                "transcripts where it fell",
            ],
            rows,
        ),
    }
