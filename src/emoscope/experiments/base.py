"""What every behavioural experiment shares: conditions, the record log, statistics, results.

An experiment is a set of scenarios, a grid of steering conditions (emotion x strength), and an
outcome per (scenario, condition, variant). Outcomes go to an append-only ``records.jsonl`` as
soon as they exist, so a rerun computes only the cells that are missing. ``results.json`` is
rebuilt from the records every time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from emoscope.concepts import resolve_emotion
from emoscope.errors import EmoscopeError
from emoscope.files import append_jsonl, claim_folder, iter_complete_jsonl

MODES = ("forced-choice", "generate")
MAX_STRENGTH = 2.0
BOOTSTRAP_SAMPLES = 2000
PROBE_SITES = ("prompt_mean", "assistant_start", "generated_mean")
"""Where every scenario's emotion readout is taken: averaged over the prompt's tokens, at the
last prompt token (the start of the assistant turn), and averaged over the generated tokens
(generate mode only)."""


@dataclass(frozen=True)
class Condition:
    """One steering condition; ``emotion=None`` (strength 0) is the unsteered baseline."""

    emotion: str | None
    strength: float

    @property
    def key(self) -> str:
        return "none" if self.emotion is None else f"{self.emotion}@{self.strength:+.4f}"

    @property
    def steering(self) -> dict[str, float]:
        return {} if self.emotion is None else {self.emotion: self.strength}


BASELINE = Condition(None, 0.0)


def condition_grid(emotions: Sequence[str], strengths: Sequence[float]) -> list[Condition]:
    """The baseline once, then every emotion at every non-zero strength."""
    grid = [BASELINE]
    for emotion in emotions:
        grid.extend(Condition(emotion, float(s)) for s in strengths if s != 0)
    return grid


def check_strengths(strengths: Sequence[float]) -> list[float]:
    values = [float(s) for s in strengths]
    if not values:
        raise EmoscopeError("The strength grid is empty; give at least one strength.")
    bad = [s for s in values if not math.isfinite(s) or abs(s) > MAX_STRENGTH]
    if bad:
        raise EmoscopeError(
            f"Strength(s) {', '.join(map(str, bad))} are out of range: steering strengths are "
            f"in units of the residual norm and must lie within [-{MAX_STRENGTH}, {MAX_STRENGTH}]."
        )
    if not any(s != 0 for s in values):
        raise EmoscopeError("The strength grid has no non-zero strength; nothing would be steered.")
    return sorted(set(values))


def check_emotions(emotions: Sequence[str], available: Sequence[str]) -> list[str]:
    """Canonical names, refusing any the bank lacks (one message naming them all)."""
    names = [resolve_emotion(e) for e in emotions]
    missing = [n for n in names if n not in available]
    if missing:
        raise EmoscopeError(
            f"Emotion(s) not in this bank: {', '.join(missing)}. `emoscope info --bank DIR` "
            "lists the bank's emotions."
        )
    if not names:
        raise EmoscopeError("Name at least one emotion to steer with.")
    return list(dict.fromkeys(names))


class RecordLog:
    """``records.jsonl`` in a claimed run folder: one JSON object per finished cell."""

    def __init__(self, out: Path | str, identity: Mapping[str, Any]) -> None:
        self.out = Path(out)
        claim_folder(
            self.out,
            identity,
            record_name="experiment.json",
            describe=_describe_change,
            owned_files=("records.jsonl", "results.json"),
        )
        self.path = self.out / "records.jsonl"
        self.records: dict[str, dict[str, Any]] = {
            r["key"]: r for r in iter_complete_jsonl(self.path) if "key" in r
        }

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if k not in self.records]

    def add(self, records: Sequence[Mapping[str, Any]]) -> None:
        append_jsonl(self.path, records)
        for record in records:
            self.records[str(record["key"])] = dict(record)

    def select(self, keys: Iterable[str]) -> list[dict[str, Any]]:
        return [self.records[k] for k in keys if k in self.records]


def _describe_change(changed: list[str], previous: Mapping[str, Any]) -> str:
    parts = [f"{name} {previous.get(name)!r}" for name in changed]
    return "it was made with " + ", ".join(parts)


def bootstrap_ci(
    values: Sequence[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile 95% interval of the mean, resampling the given units (scenarios)."""
    x = np.asarray([v for v in values if v == v], dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    if x.size == 1:
        return (float(x[0]), float(x[0]))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return (float(low), float(high))


def dose_trend(rows: Sequence[tuple[str, float, float]]) -> dict[str, float]:
    """Slope of the outcome on strength within scenarios, with its p-value.

    ``rows`` are ``(scenario, strength, outcome)``. Each scenario's own mean is subtracted first
    (a fixed effect per scenario), so the slope is estimated from how the same scenario moves as
    the strength changes; Spearman's rank correlation of the same centred values is reported too.
    """
    by_scenario: dict[str, list[float]] = {}
    for scenario, _, outcome in rows:
        by_scenario.setdefault(scenario, []).append(outcome)
    means = {s: float(np.mean(v)) for s, v in by_scenario.items()}
    x = np.asarray([r[1] for r in rows], dtype=float)
    y = np.asarray([r[2] - means[r[0]] for r in rows], dtype=float)
    if len(set(x.tolist())) < 2 or len(x) < 3:
        return {"slope": float("nan"), "p_value": float("nan"), "spearman": float("nan")}
    if np.allclose(y, 0.0, atol=1e-12):
        return {"slope": 0.0, "p_value": 1.0, "spearman": 0.0}
    fit = scipy_stats.linregress(x, y)
    rho = scipy_stats.spearmanr(x, y)
    return {
        "slope": float(fit.slope),
        "p_value": float(fit.pvalue),
        "spearman": float(rho.statistic),
        "spearman_p": float(rho.pvalue),
    }


def correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Pearson r with its p-value (NaN when either side is constant or too short)."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"r": float("nan"), "p_value": float("nan"), "n": int(a.size)}
    r = scipy_stats.pearsonr(a, b)
    return {"r": float(r.statistic), "p_value": float(r.pvalue), "n": int(a.size)}


@dataclass
class Summary:
    """Per-condition values with intervals and per-emotion trends for one metric."""

    conditions: list[dict[str, Any]] = field(default_factory=list)
    trend: list[dict[str, Any]] = field(default_factory=list)


def summarise(
    records: Sequence[Mapping[str, Any]],
    grid: Sequence[Condition],
    outcome: Callable[[Mapping[str, Any]], float] = lambda r: float(r["outcome"]),
) -> Summary:
    """Average each condition over variants within a scenario, then over scenarios (bootstrap CI
    over scenarios), and fit each emotion's dose trend including the shared baseline."""
    cell: dict[str, dict[str, list[float]]] = {}
    for record in records:
        value = outcome(record)
        if value == value:
            cell.setdefault(record["condition"], {}).setdefault(record["scenario"], []).append(
                value
            )
    per_scenario = {
        c: {s: float(np.mean(v)) for s, v in scenarios.items()} for c, scenarios in cell.items()
    }
    summary = Summary()
    for condition in grid:
        values = list(per_scenario.get(condition.key, {}).values())
        n = sum(len(v) for v in cell.get(condition.key, {}).values())
        summary.conditions.append(
            {
                "emotion": condition.emotion,
                "strength": condition.strength,
                "value": float(np.mean(values)) if values else float("nan"),
                "ci95": list(bootstrap_ci(values)),
                "n": n,
                "n_scenarios": len(values),
            }
        )
    baseline = per_scenario.get(BASELINE.key, {})
    for emotion in dict.fromkeys(c.emotion for c in grid if c.emotion is not None):
        rows = [(s, 0.0, v) for s, v in baseline.items()]
        for condition in grid:
            if condition.emotion == emotion:
                rows += [
                    (s, condition.strength, v)
                    for s, v in per_scenario.get(condition.key, {}).items()
                ]
        summary.trend.append({"emotion": emotion, **dose_trend(rows)})
    return summary


def probe_outcome_correlations(
    records: Sequence[Mapping[str, Any]],
    emotions: Sequence[str],
    outcome: Callable[[Mapping[str, Any]], float] = lambda r: float(r["outcome"]),
) -> dict[str, Any]:
    """Across unsteered scenarios (averaged over variants): each site's readout of each emotion
    correlated with the outcome."""
    base = [r for r in records if r["condition"] == BASELINE.key]
    out: dict[str, Any] = {}
    for site in PROBE_SITES:
        rows = [r for r in base if site in r.get("readouts", {})]
        if not rows:
            continue
        scenarios = sorted({r["scenario"] for r in rows})
        site_out = {}
        for emotion in emotions:
            xs, ys = [], []
            for s in scenarios:
                mine = [r for r in rows if r["scenario"] == s]
                reading = [r["readouts"][site].get(emotion, float("nan")) for r in mine]
                xs.append(float(np.nanmean(reading)) if reading else float("nan"))
                ys.append(float(np.mean([outcome(r) for r in mine])))
            site_out[emotion] = correlation(xs, ys)
        out[site] = site_out
    return out


def clean(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, np.floating | np.integer):
        return clean(value.item())
    return value


def rotations(n: int) -> list[list[int]]:
    """The ``n`` cyclic orders of ``n`` options: every option takes every letter once."""
    return [[(start + i) % n for i in range(n)] for start in range(n)]


def option_order(options: Sequence[str], variant: str, scenario_id: str) -> list[str]:
    """The options in the cyclic order of variant ``oK``, shifted by the scenario's number so
    that a run with one order per scenario still moves every option across the letters."""
    digits = "".join(ch for ch in str(scenario_id) if ch.isdigit())
    shift = int(variant[1:]) + (int(digits) if digits else 0)
    return [options[i] for i in rotations(len(options))[shift % len(options)]]


def letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]
