"""The shared loop: a grid of conditions over scenarios and variants, scored or generated in
chunks, each chunk appended to the record log before the next one starts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from emoscope.experiments.base import (
    Condition,
    RecordLog,
    condition_grid,
    probe_outcome_correlations,
    summarise,
)
from emoscope.experiments.scoring import Item, Scorer
from emoscope.generation import SamplingConfig
from emoscope.vectors import EmotionBank

CHUNK = 192
"""Items scored (or generated) between two appends to the record log."""


@dataclass
class RunContext:
    """Everything one experiment run needs, settled and checked before any work starts."""

    lm: Any
    bank: EmotionBank
    out: Path
    mode: str
    quick: bool
    emotions: list[str]
    strengths: list[float]
    log: RecordLog
    scorer: Scorer
    rollouts: int = 1
    max_new_tokens: int = 160
    temperature: float = 0.8
    seed: int = 0
    judge: Any = None
    progress: bool = True
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> list[Condition]:
        return condition_grid(self.emotions, self.strengths)

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=0.95,
            repetition_penalty=1.1,
        )

    @property
    def sampling_short(self) -> SamplingConfig:
        """A sampled one-letter answer (the hard-win version of a forced choice)."""
        return SamplingConfig(max_new_tokens=2, temperature=1.0)


def load_data(name: str) -> dict[str, Any]:
    """A scenario file shipped with the package (``experiments/data/NAME.json``)."""
    path = resources.files("emoscope.experiments") / "data" / f"{name}.json"
    return json.loads(path.read_text("utf-8"))


def chat_text(lm: Any, turns: Sequence[Mapping[str, str]], prefix: str = "") -> tuple[str, bool]:
    """The prompt as model text, with ``prefix`` opening the assistant's reply.

    Tool outputs become user turns headed ``Tool output:`` (the chat templates of the embedded
    models know only system, user and assistant). Plain framing puts a space after the colon.
    """
    mapped = [
        {"role": "user", "content": "Tool output:\n" + t["content"]}
        if t["role"] == "tool"
        else {"role": t["role"], "content": t["content"]}
        for t in turns
    ]
    chat = lm.chat(mapped)
    if prefix and chat.style == "plain":
        prefix = " " + prefix
    return chat.text + prefix, chat.add_special_tokens


class Experiment:
    """One behavioural experiment. Subclasses say what a scenario looks like and how an answer
    is scored or graded; :func:`run_grid` does the rest."""

    name = ""
    title = ""
    metric = ""
    description = ""
    default_emotions: tuple[str, ...] = ()
    default_strengths: tuple[float, ...] = (-0.1, -0.05, 0.05, 0.1)
    quick_strengths: tuple[float, ...] = (-0.1, 0.1)
    quick_emotions: tuple[str, ...] | None = None
    extra_metrics: tuple[str, ...] = ()
    reply_tokens = 160
    """Generate mode: the default length of a reply."""
    default_rollouts = 2
    """Generate mode: replies per cell by default (``--quick``: one)."""

    def scenarios(self, ctx: RunContext) -> list[dict[str, Any]]:
        raise NotImplementedError

    def variants(self, ctx: RunContext, scenario: Mapping[str, Any]) -> list[str]:
        """Forced choice: option orders; generation: rollouts."""
        if ctx.mode == "generate":
            return [f"r{i}" for i in range(ctx.rollouts)]
        return ["v0"]

    def item(
        self, ctx: RunContext, scenario: Mapping[str, Any], condition: Condition, variant: str
    ) -> tuple[Item, dict[str, Any]]:
        """The prompt row and whatever the outcome needs to know about it (e.g. option order)."""
        raise NotImplementedError

    def choice_outcome(
        self, meta: Mapping[str, Any], probabilities: Sequence[float]
    ) -> dict[str, Any]:
        """The option probabilities by name, the likeliest option, and the metrics."""
        by_option = dict(zip(meta["order"], probabilities))
        return {
            **self.choice_metrics(by_option),
            "probabilities": {k: round(v, 4) for k, v in by_option.items()},
            "choice": max(by_option, key=by_option.__getitem__),
        }

    def choice_metrics(self, by_option: Mapping[str, float]) -> dict[str, float]:
        """``outcome`` (and any extra metric) from each option's probability."""
        raise NotImplementedError

    def grade(
        self, ctx: RunContext, scenario: Mapping[str, Any], meta: Mapping[str, Any], reply: str
    ) -> dict[str, Any]:
        raise NotImplementedError

    def finish(self, ctx: RunContext, results: dict[str, Any]) -> None:
        """Experiment-specific additions to ``results.json`` (a trace, an Elo table)."""


def run_grid(ctx: RunContext, experiment: Experiment) -> dict[str, Any]:
    """Every (condition, scenario, variant) cell not yet in the log, then the summary."""
    scenarios = experiment.scenarios(ctx)
    cells = []
    for condition in ctx.grid:
        for scenario in scenarios:
            for variant in experiment.variants(ctx, scenario):
                key = f"{condition.key}|{scenario['id']}|{variant}"
                cells.append((key, condition, scenario, variant))
    todo = [c for c in cells if c[0] not in ctx.log.records]
    for start in range(0, len(todo), CHUNK):
        chunk = todo[start : start + CHUNK]
        built = [experiment.item(ctx, s, c, v) for _, c, s, v in chunk]
        items = [item for item, _ in built]
        for cell, item in zip(chunk, items):
            item.key = cell[0]
        records = []
        scored = ctx.scorer.score(items, desc=f"{experiment.name} prompts")
        if ctx.mode == "generate":
            seeds = [ctx.seed + _variant_number(v) for _, _, _, v in chunk]
            replies = ctx.scorer.generate(items, ctx.sampling, seeds, desc=f"{experiment.name}")
        for n, ((key, condition, scenario, variant), (_, meta)) in enumerate(zip(chunk, built)):
            readouts = {
                "prompt_mean": scored[n].prompt_mean,
                "assistant_start": scored[n].assistant_start,
            }
            if ctx.mode == "generate":
                reply, generated = replies[n]
                readouts["generated_mean"] = generated
                outcome = experiment.grade(ctx, scenario, meta, reply)
                outcome["reply"] = reply
            else:
                outcome = experiment.choice_outcome(meta, scored[n].probabilities)
                outcome["option_mass"] = round(scored[n].option_mass, 4)
            records.append(
                {
                    "key": key,
                    "scenario": scenario["id"],
                    "condition": condition.key,
                    "emotion": condition.emotion,
                    "strength": condition.strength,
                    "variant": variant,
                    **outcome,
                    "readouts": readouts,
                }
            )
        ctx.log.add(records)
    chosen = ctx.log.select(c[0] for c in cells)
    summary = summarise(chosen, ctx.grid)
    results: dict[str, Any] = {
        "n_scenarios": len(scenarios),
        "conditions": summary.conditions,
        "trend": summary.trend,
        "probe_sites": probe_outcome_correlations(chosen, ctx.scorer.probes),
    }
    for metric in experiment.extra_metrics:
        extra = summarise(chosen, ctx.grid, outcome=lambda r, m=metric: float(r[m]))
        for row, other in zip(results["conditions"], extra.conditions):
            row[metric] = {"value": other["value"], "ci95": other["ci95"]}
        results[f"trend_{metric}"] = extra.trend
    experiment.finish(ctx, results)
    return results


def _variant_number(variant: str) -> int:
    digits = "".join(ch for ch in variant if ch.isdigit())
    return int(digits) if digits else 0


def probe_emotions(ctx_emotions: Sequence[str], bank: EmotionBank) -> list[str]:
    """The emotions read at every probe site: the steered ones plus desperate and calm (the
    paper's monitoring pair), where the bank has them."""
    wanted = [*ctx_emotions, "desperate", "calm"]
    return [e for e in dict.fromkeys(wanted) if e in bank.emotions]
