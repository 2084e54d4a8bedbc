"""Figures for the reports, as self-contained PNG data URIs and inline SVG (no network needed).

These are the only pieces of a report page that are not escaped: they are marked safe here,
where emoscope itself builds them, and every name drawn into the SVG is escaped on the way in.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from markupsafe import Markup, escape

PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
           "#1f77b4", "#8c564b"]  # fmt: skip


def png(fig: Any) -> Markup:
    """The figure as a PNG data URI (base64 only, so nothing in it can break out of an attribute)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Markup("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())


def layer_sweep(sweep: Sequence[dict[str, Any]], default_layer: int, two_thirds: int) -> Markup:
    layers = [s["layer"] for s in sweep]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for split, style, alpha, name in (
        ("test", "-o", 1.0, "test"),
        ("cv_train", "--", 0.6, "train CV"),
    ):
        for k, color in (("top1", PALETTE[0]), ("top5", PALETTE[1])):
            ax.plot(
                layers,
                [s[split][k] for s in sweep],
                style,
                ms=3,
                label=f"{name} {k[:3]}-{k[3:]}",
                color=color,
                alpha=alpha,
            )
    ax.plot(
        layers,
        [abs(s["pc1_valence_r"]) for s in sweep],
        "-s",
        ms=3,
        label="|r(PC1, valence)|",
        color=PALETTE[4],
    )
    ax.axvline(default_layer, color="k", lw=1, label=f"default layer {default_layer}")
    ax.axvline(two_thirds, color="grey", lw=1, ls=":", label=f"2/3 depth ({two_thirds})")
    ax.set_xlabel("layer (output of decoder block)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower center")
    return png(fig)


def heatmap(
    matrix: np.ndarray,
    labels: Sequence[str],
    title: str,
    size: float = 10,
    vmin: float = -1,
    vmax: float = 1,
    col_labels: Sequence[str] | None = None,
    annotate: bool = False,
) -> Markup:
    fig, ax = plt.subplots(figsize=(size, size * (len(labels) / max(1, len(col_labels or labels)))))
    im = ax.imshow(matrix, cmap="RdBu_r", vmin=vmin, vmax=vmax, interpolation="nearest")
    cols = col_labels or labels
    font = 4 if len(labels) > 60 else 8
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=font)
    ax.set_yticks(range(len(labels)), labels, fontsize=font)
    if annotate:
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                ax.text(j, i, f"{matrix[i, j]:.1f}", ha="center", va="center", fontsize=6)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03)
    return png(fig)


def norm_scatter(
    x: Sequence[float], y: Sequence[float], names: Sequence[str], xlabel: str, ylabel: str, r: float
) -> Markup:
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    ax.scatter(x, y, s=10, color=PALETTE[0])
    for xi, yi, n in zip(x, y, names):
        ax.annotate(n, (xi, yi), fontsize=5, alpha=0.7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"r = {r:.2f} (n = {len(x)})", fontsize=9)
    ax.grid(alpha=0.3)
    return png(fig)


def intensity_lines(templates: Sequence[dict[str, Any]]) -> Markup:
    n = len(templates)
    cols = 4
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(12, 2.6 * rows), squeeze=False)
    for ax, t in zip(axes.flat, templates):
        for k, (emotion, trend) in enumerate(t["trends"].items()):
            ax.plot(
                range(len(t["values"])),
                trend["readouts"],
                "-o",
                ms=3,
                color=PALETTE[k],
                label=f"{emotion} (rho {trend['rho']:+.2f})",
            )
        ax.set_xticks(
            range(len(t["values"])), [str(v) for v in t["values"]], fontsize=6, rotation=45
        )
        ax.set_title(t["id"], fontsize=8)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return png(fig)


def signed(x: float | None) -> str:
    """A correlation for display; ``n/a`` where it is undefined (stored as ``null``)."""
    return "n/a" if x is None else f"{x:+.2f}"


def dose_curves(dose: dict[str, Any]) -> Markup:
    """Mean VADER score and perplexity against steering strength, one line per emotion."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for k, (emotion, d) in enumerate(dose["emotions"].items()):
        color = PALETTE[k % len(PALETTE)]
        rho = d["spearman_rho_coherent"]
        axes[0].plot(
            dose["strengths"],
            d["mean_vader"],
            "-o",
            color=color,
            label=f"{emotion} (rho {signed(rho)})",
        )
        axes[1].plot(dose["strengths"], d["perplexity"], "-o", color=color, label=emotion)
    axes[0].set_ylabel("mean VADER compound")
    axes[1].set_ylabel("perplexity under unsteered model")
    axes[1].axhline(2 * dose["baseline_perplexity"], color="grey", ls=":", label="2x baseline")
    for ax in axes:
        ax.set_xlabel("strength (x residual norm)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return png(fig)


def emotion_map_svg(
    points: dict[str, Sequence[float]],
    clusters: Sequence[Sequence[str]],
    norms: dict[str, Any],
    width: int = 760,
    height: int = 560,
) -> Markup:
    """PC1 x PC2 map of every emotion; hover a point for its name, cluster and human norms."""
    cluster_of = {e: i for i, members in enumerate(clusters) for e in members}
    xs = np.array([p[0] for p in points.values()])
    ys = np.array([p[1] for p in points.values()])
    pad = 40

    def sx(x: float) -> float:
        return pad + (x - xs.min()) / max(1e-9, np.ptp(xs)) * (width - 2 * pad)

    def sy(y: float) -> float:
        return height - pad - (y - ys.min()) / max(1e-9, np.ptp(ys)) * (height - 2 * pad)

    parts = [
        f'<svg viewBox="0 0 {width} {height}" class="map">',
        f'<rect width="{width}" height="{height}" fill="#fcfcfc" stroke="#ddd"/>',
        f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle" font-size="12">PC1</text>',
        f'<text x="12" y="{height / 2}" font-size="12" transform="rotate(-90 12 {height / 2})" text-anchor="middle">PC2</text>',
    ]
    for name, (x, y, *_rest) in points.items():
        c = PALETTE[cluster_of.get(name, 0) % len(PALETTE)]
        n = norms.get(name)
        rating = f" | valence {n.valence:.2f}, arousal {n.arousal:.2f}" if n else " | not rated"
        tip = escape(f"{name} (cluster {cluster_of.get(name, 0) + 1}){rating}")
        parts.append(
            f'<g><title>{tip}</title><circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4.5" fill="{c}" fill-opacity="0.85"/>'
            f'<text x="{sx(x) + 5:.1f}" y="{sy(y) + 3:.1f}" font-size="8" fill="#333">{escape(name)}</text></g>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))
