"""A side-by-side markdown table of several runs' headline numbers (``emoscope compare``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from emoscope.errors import EmoscopeError
from emoscope.files import read_json

ROWS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    (
        "family, layers, hidden",
        lambda r: f"{r['model']['family']}, {r['model']['n_layers']}, {r['model']['hidden_size']}",
    ),
    ("extraction dtype", lambda r: r["model"]["dtype"]),
    ("default layer (CV on train topics)", lambda r: r["default_layer"]),
    (
        "within-emotion variance projected out",
        lambda r: f"{r['story_variance_selection']['story_variance']:.0%}",
    ),
    (
        "test top-1 / top-5, 171-way (chance 0.6% / 2.9%)",
        lambda r: f"{r['summary']['test_top1']:.1%} / {r['summary']['test_top5']:.1%}",
    ),
    (
        "train-CV top-1 / top-5",
        lambda r: f"{r['summary']['cv_train_top1']:.1%} / {r['summary']['cv_train_top5']:.1%}",
    ),
    ("best test top-5 over layers", lambda r: _best(r)),
    (
        "r(PC1, valence), n",
        lambda r: (
            f"{r['geometry']['norms']['pc1_valence']['r']:+.3f}, {r['geometry']['norms']['pc1_valence']['n']}"
        ),
    ),
    (
        "r(PC2, arousal) / r(PC3, arousal)",
        lambda r: (
            f"{r['geometry']['norms']['pc2_arousal']['r']:+.3f} / {r['geometry']['norms']['pc3_arousal']['r']:+.3f}"
        ),
    ),
    (
        "PC1 / PC2 variance",
        lambda r: (
            f"{r['geometry']['pca_variance_ratio'][0]:.1%} / {r['geometry']['pca_variance_ratio'][1]:.1%}"
        ),
    ),
    (
        "implicit prompts: target on top (z / raw)",
        lambda r: (
            f"{r['implicit']['z_scored']['accuracy']:.1%} / {r['implicit']['centred']['accuracy']:.1%}"
        ),
    ),
    ("intensity directions held", lambda r: f"{r['intensity']['held']}/{r['intensity']['total']}"),
    ("RSA across layers (mean off-diagonal)", lambda r: f"{r['geometry']['rsa_mean_offdiag']:.3f}"),
]


def _best(report: dict[str, Any]) -> str:
    best = max(report["layer_sweep"], key=lambda s: s["test"]["top5"])
    return f"{best['test']['top5']:.1%} (layer {best['layer']})"


def _model_name(report: dict[str, Any]) -> str:
    return report["model"]["model"]


def _load(run: Path | str) -> dict[str, Any]:
    path = Path(run) / "report.json"
    if not path.exists():
        raise EmoscopeError(f"{path} does not exist; run `emoscope extract --out {run}` first.")
    report = read_json(path, "report")
    if not isinstance(report, dict):
        raise EmoscopeError(f"{path} is not an emoscope report; run `emoscope extract` again.")
    return report


def _cell(value: Any) -> str:
    """A markdown table cell: a ``|`` in a model name must not split the row."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _value(
    report: dict[str, Any], run: Path | str, label: str, get: Callable[[dict[str, Any]], Any]
) -> str:
    try:
        return _cell(get(report))
    except (KeyError, IndexError, TypeError):
        raise EmoscopeError(
            f"{Path(run) / 'report.json'} lacks the numbers for '{label}' (written by another "
            "emoscope version?); "
            f"run `emoscope extract --out {run}` again."
        ) from None


def compare(runs: Sequence[Path | str]) -> str:
    """A markdown table with one column per run folder and one row per headline number."""
    if not runs:
        raise EmoscopeError("Name at least one run folder to compare.")
    reports = [_load(run) for run in runs]
    names = [_value(r, run, "model", _model_name) for r, run in zip(reports, runs)]
    lines = ["| measure | " + " | ".join(names) + " |", "|" + " --- |" * (len(reports) + 1)]
    for label, get in ROWS:
        cells = [_value(r, run, label, get) for r, run in zip(reports, runs)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
