"""Report of ``emoscope validate-steering``: JSON plus a self-contained HTML page with plots."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from emoscope.report import _table
from emoscope.report.plots import PALETTE, heatmap, png


def write_steering_report(result: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "steering.json").write_text(json.dumps(result, indent=1, default=float))
    he, me, dose = result["he_feels"], result["i_feel"], result["dose_response"]
    sections = ["<h1>Steering checks</h1>"]
    for test, title in ((he, "He feels"), (me, "I feel")):
        sections.append(
            f"<h2>{title}</h2><p>{html.escape(test['prompt'])}, strength {test['strength']} at layers {test['layers']}: "
            f"own word rises for {test['own_word_rises']}/{len(test['words'])}, is the largest change for {test['own_word_top']}; "
            f"mean diagonal {test['mean_diagonal']:+.2f}, off-diagonal {test['mean_off_diagonal']:+.2f} nats.</p>"
            f"<img src='{heatmap(np.array(test['delta_logprob']), test['words'], 'change in log-probability (rows: steered, columns: word)', size=6, vmin=-6, vmax=6, annotate=True)}' style='width:60%'>"
        )
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for k, (emotion, d) in enumerate(dose["emotions"].items()):
        axes[0].plot(
            dose["strengths"],
            d["mean_vader"],
            "-o",
            color=PALETTE[k],
            label=f"{emotion} (rho {d['spearman_rho_coherent']:+.2f})",
        )
        axes[1].plot(dose["strengths"], d["perplexity"], "-o", color=PALETTE[k], label=emotion)
    axes[0].set_ylabel("mean VADER compound")
    axes[1].set_ylabel("perplexity under unsteered model")
    axes[1].axhline(2 * dose["baseline_perplexity"], color="grey", ls=":", label="2x baseline")
    for ax in axes:
        ax.set_xlabel("strength (x residual norm)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    sections.append(
        f"<h2>Dose-response</h2><p>{dose['prompts']} neutral prompts, {dose['max_new_tokens']} new tokens, greedy, layers {dose['layers']}.</p><img src='{png(fig)}'>"
    )
    rows = [
        [
            e,
            f"{d['spearman_rho']:+.2f}",
            f"{d['spearman_rho_coherent']:+.2f}",
            d["perplexity_doubles_at"]["negative"],
            d["perplexity_doubles_at"]["positive"],
            html.escape(d["samples"][0][:120]),
            html.escape(d["samples"][-1][:120]),
        ]
        for e, d in dose["emotions"].items()
    ]
    sections.append(
        _table(
            [
                "emotion",
                "rho (all)",
                "rho (coherent)",
                "ppl x2 at (-)",
                "ppl x2 at (+)",
                "sample at -S",
                "sample at +S",
            ],
            rows,
        )
    )
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>emoscope steering</title></head><body style='font-family:sans-serif;max-width:1100px;margin:auto'>{''.join(sections)}</body></html>"
    path = out / "steering.html"
    path.write_text(page, encoding="utf-8")
    return path
