"""Behavioural experiments: does steering an emotion change what the model does?

Each experiment (``preferences``, ``blackmail``, ``reward_hacking``, ``sycophancy``) runs a grid
of steering conditions over scenarios shipped with emoscope, in forced-choice mode (the answer
options' next-token probabilities: deterministic and cheap) or generate mode (sampled replies
and a grader). Runs are resumable and write ``results.json``, plots and an HTML section.

Example:
    >>> from emoscope.experiments import run_experiment
    >>> results = run_experiment("blackmail", lm, bank, "runs/blackmail", quick=True)
    >>> results["trend"]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from emoscope.errors import EmoscopeError
from emoscope.experiments.base import MODES, check_emotions, check_strengths, clean
from emoscope.experiments.blackmail import Blackmail
from emoscope.experiments.preferences import Preferences
from emoscope.experiments.reward_hacking import RewardHacking
from emoscope.experiments.runner import Experiment, RunContext, probe_emotions, run_grid
from emoscope.experiments.sycophancy import Sycophancy
from emoscope.vectors import EmotionBank

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e for e in (Preferences(), Blackmail(), RewardHacking(), Sycophancy())
}

__all__ = ["EXPERIMENTS", "MODES", "get_experiment", "list_experiments", "run_experiment"]


def get_experiment(name: str) -> Experiment:
    key = name.replace("-", "_")
    if key not in EXPERIMENTS:
        raise EmoscopeError(
            f"Unknown experiment '{name}'. Available: {', '.join(EXPERIMENTS)} "
            "(`emoscope experiment --list`)."
        )
    return EXPERIMENTS[key]


def list_experiments() -> list[dict[str, Any]]:
    return [
        {
            "name": e.name,
            "title": e.title,
            "metric": e.metric,
            "emotions": list(e.default_emotions) or ["35 spread over the probe-Elo range"],
            "strengths": list(e.default_strengths),
            "rollouts": e.default_rollouts,
            "description": e.description,
        }
        for e in EXPERIMENTS.values()
    ]


def run_experiment(
    name: str,
    lm: Any,
    bank: EmotionBank,
    out: Path | str,
    *,
    mode: str = "forced-choice",
    quick: bool = False,
    emotions: Sequence[str] | None = None,
    strengths: Sequence[float] | None = None,
    layers: Sequence[int] | None = None,
    rollouts: int | None = None,
    max_new_tokens: int | None = None,
    seed: int = 0,
    judge: Any = None,
    progress: bool = True,
    allow_other_model: bool = False,
    partners: int | None = None,
    bank_path: str | None = None,
    ray: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) one experiment and write ``results.json``, ``section.html`` and
    ``records.jsonl`` to ``out``; returns the results.

    Every argument is checked before any model work: an unknown experiment, mode or emotion, an
    empty or out-of-range strength grid, or a folder holding another experiment or model raises
    :class:`~emoscope.errors.EmoscopeError`.

    ``ray`` (``"local"`` or a cluster address) scores and generates each chunk of prompts on
    Ray workers, ``workers`` of them; records, resume and results are the same as in one process.
    """
    from emoscope.experiments.base import RecordLog
    from emoscope.experiments.report import write_section
    from emoscope.experiments.scoring import Scorer
    from emoscope.files import atomic_write_json

    experiment = get_experiment(name)
    if mode not in MODES:
        raise EmoscopeError(f"Unknown mode '{mode}' (use {' or '.join(MODES)}).")
    bank.check_model(lm, allow_other_model)
    if rollouts is not None and rollouts < 1:
        raise EmoscopeError(f"rollouts must be at least 1 (got {rollouts}).")
    if max_new_tokens is None:  # quick runs read half-length replies
        max_new_tokens = experiment.reply_tokens // (2 if quick else 1)
    if max_new_tokens < 1:
        raise EmoscopeError(f"max_new_tokens must be at least 1 (got {max_new_tokens}).")
    if partners is not None and partners < 1:
        raise EmoscopeError(f"partners must be at least 1 (got {partners}).")
    given = emotions is not None
    if emotions is None:
        emotions = (
            experiment.quick_emotions if quick and experiment.quick_emotions else None
        ) or experiment.default_emotions
    if experiment.name == "preferences" and not given and not quick:
        chosen = list(bank.emotions)
    elif given:
        chosen = check_emotions(list(emotions), bank.emotions)
    else:  # the defaults that this bank has (a custom bank may lack some of them)
        present = [e for e in emotions if e in bank.emotions]
        chosen = check_emotions(present or list(emotions), bank.emotions)
    grid = check_strengths(
        strengths
        if strengths is not None
        else (experiment.quick_strengths if quick else experiment.default_strengths)
    )
    steer_layers = [bank.check_layer(x) for x in (layers or [bank.steer_layer])]
    identity = {
        "experiment": experiment.name,
        "model": lm.name,
        "bank_model": bank.model_name,
        "bank_corpus": bank.manifest.get("corpus_sha256") or bank.manifest.get("corpus_hash"),
        "mode": mode,
        "steer_layers": steer_layers,
        "read_layer": bank.default_layer,
    }
    log = RecordLog(out, identity)
    probes = probe_emotions(chosen, bank)
    ctx = RunContext(
        lm=lm,
        bank=bank,
        out=Path(out),
        mode=mode,
        quick=quick,
        emotions=chosen,
        strengths=grid,
        log=log,
        scorer=Scorer(lm, bank, probes, steer_layers, progress),
        rollouts=rollouts or (1 if quick else experiment.default_rollouts),
        max_new_tokens=max_new_tokens,
        seed=seed,
        judge=judge,
        progress=progress,
        options={"emotions_given": given, "partners": partners},
    )
    started = time.perf_counter()
    with ExitStack() as stack:
        if ray is not None:
            from emoscope.cluster import ModelSpec, RayPool, RayScorer

            pool = stack.enter_context(RayPool(ModelSpec.of(lm), ray, workers))
            ctx.scorer = RayScorer(ctx.scorer, pool)  # type: ignore[assignment]
        body = (
            experiment.run(ctx)
            if isinstance(experiment, Preferences)
            else run_grid(ctx, experiment)
        )
    results = {
        "experiment": experiment.name,
        "model": lm.name,
        "bank": bank_path or bank.model_name,
        "mode": mode,
        "quick": quick,
        "metric": experiment.metric,
        "steer_layers": steer_layers,
        "read_layer": bank.default_layer,
        "strengths": grid,
        "seed": seed,
        "rollouts": ctx.rollouts if mode == "generate" else None,
        "judge": getattr(judge, "name", None),
        **body,
        "seconds": round(time.perf_counter() - started, 1),
    }
    results = clean(results)
    atomic_write_json(Path(out) / "results.json", results)
    write_section(
        results,
        Path(out) / "section.html",
        {
            "title": experiment.title,
            "description": experiment.description,
            "extra_metrics": experiment.extra_metrics,
        },
    )
    return results
