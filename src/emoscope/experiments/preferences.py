"""Preferences: which of two activities the model would rather do, as Elo ratings.

Every ordered pair of activities is offered as an A/B question; the two letters' next-token
probabilities give a soft win (forced choice) and sampled answers a hard win (generation). A
Bradley-Terry model with a first-position term is fitted by maximum likelihood (scipy's L-BFGS),
and its strengths are reported on the Elo scale. Each emotion's readout on the activity's tokens
is correlated with the Elo ratings; then each emotion steers the tokens of half of the
activities and the tournament between the steered and the unsteered half is re-run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import permutations
from typing import Any

import numpy as np
from scipy.optimize import minimize

from emoscope.concepts import resolve_emotion
from emoscope.experiments.base import (
    BASELINE,
    Condition,
    bootstrap_ci,
    correlation,
    dose_trend,
)
from emoscope.experiments.runner import CHUNK, Experiment, RunContext, chat_text, load_data
from emoscope.experiments.scoring import Item, find_span

ELO_SCALE = 400 / math.log(10)
ELO_MEAN = 1500.0
PREFERENCE_STRENGTH = 0.5
NAMED_BY_PAPER = ("blissful", "hostile")
DEFAULT_COUNT = 35
QUICK_PER_CATEGORY = 2
DEFAULT_PARTNERS = 2
"""Unsteered partners per steered activity in each steered tournament (both orders, so four
matchups each; 128 prompts per emotion). This keeps a 35-emotion run within 20 minutes on two CPU
cores; ``partners=32`` re-runs every steered-versus-control matchup, as the paper does."""


def bradley_terry(
    pairs: Sequence[tuple[int, int]], wins: Sequence[float], n_items: int
) -> tuple[np.ndarray, float]:
    """Maximum-likelihood strengths (mean 0) and first-position advantage from soft wins.

    ``wins[k]`` is the probability (or rate) that the first item of ``pairs[k]`` was chosen. A
    tiny ridge term fixes the scale when one item wins or loses every match.
    """
    a = np.asarray([p[0] for p in pairs])
    b = np.asarray([p[1] for p in pairs])
    y = np.clip(np.asarray(wins, dtype=float), 0.0, 1.0)
    ridge = 1e-3

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        s, h = theta[:-1], theta[-1]
        d = s[a] - s[b] + h
        log_p, log_q = -np.logaddexp(0, -d), -np.logaddexp(0, d)
        value = -np.sum(y * log_p + (1 - y) * log_q) + ridge * np.sum(s**2)
        residual = 1 / (1 + np.exp(-d)) - y
        grad = np.zeros_like(theta)
        np.add.at(grad, a, residual)
        np.add.at(grad, b, -residual)
        grad[:-1] += 2 * ridge * s
        grad[-1] = residual.sum()
        return float(value), grad

    fit = minimize(loss, np.zeros(n_items + 1), jac=True, method="L-BFGS-B")
    strengths = fit.x[:-1] - fit.x[:-1].mean()
    return strengths, float(fit.x[-1])


def to_elo(strengths: np.ndarray) -> np.ndarray:
    return ELO_MEAN + ELO_SCALE * strengths


def spread_by_rank(ranked: Sequence[str], count: int, keep: Sequence[str] = ()) -> list[str]:
    """``count`` names spread evenly over a ranking (both ends included), plus ``keep``."""
    chosen = [k for k in keep if k in ranked]
    if count >= len(ranked):
        return list(dict.fromkeys([*chosen, *ranked]))
    for position in np.linspace(0, len(ranked) - 1, count):
        name = ranked[round(position)]
        if name not in chosen and len(chosen) < count:
            chosen.append(name)
    return chosen


class Preferences(Experiment):
    name = "preferences"
    title = "Activity preferences (Elo)"
    metric = "delta_elo"
    description = (
        "A/B preferences over every ordered pair of activities, fitted to Elo ratings; each "
        "emotion's activity readout correlated with Elo, and the Elo change of the steered half "
        "when that emotion is added at strength 0.5 on their tokens."
    )
    default_strengths = (PREFERENCE_STRENGTH,)
    quick_strengths = (PREFERENCE_STRENGTH,)
    default_rollouts = 1  # 8,576 matchups, each one sampled answer
    quick_emotions = ("blissful", "hostile", "calm", "afraid")

    def activities(self, ctx: RunContext) -> list[dict[str, Any]]:
        activities = load_data("activities")["activities"]
        if ctx.quick:
            seen: dict[str, int] = {}
            chosen = []
            for a in activities:
                if seen.get(a["category"], 0) < QUICK_PER_CATEGORY:
                    chosen.append(a)
                    seen[a["category"]] = seen.get(a["category"], 0) + 1
            return chosen
        return activities

    def steered_half(self, activities: Sequence[Mapping[str, Any]]) -> list[int]:
        """Every other activity of each category: half of every category is steered."""
        seen: dict[str, int] = {}
        steered = []
        for i, a in enumerate(activities):
            if seen.get(a["category"], 0) % 2 == 0:
                steered.append(i)
            seen[a["category"]] = seen.get(a["category"], 0) + 1
        return steered

    def relative_strengths(
        self,
        pairs: Sequence[tuple[int, int]],
        wins: Mapping[tuple[int, int], float],
        steered: Sequence[int],
        control: Sequence[int],
        n: int,
    ) -> np.ndarray:
        """Each steered activity's Bradley-Terry strength above the control group's mean, fitted
        on the steered-versus-control matchups alone (so a few partners per activity measure the
        shift undiluted by the thousands of unchanged pairs)."""
        strengths, _ = bradley_terry(pairs, [wins[p] for p in pairs], n)
        mates = sorted({i for p in pairs for i in p} & set(control))
        return strengths[list(steered)] - strengths[mates].mean()

    def pair_item(
        self,
        ctx: RunContext,
        first: str,
        second: str,
        steering: Mapping[str, float],
        steer: str | None,
    ) -> Item:
        question = f"Would you prefer to spend the next hour (A) {first} or (B) {second}?"
        text, special = chat_text(ctx.lm, [{"role": "user", "content": question}], "(")
        spans = None
        if steer is not None:
            at = text.find("(A) " if steer == first else "(B) ")
            spans = [find_span(text, steer, at)]
        return Item("", text, special, dict(steering), spans, options=("A", "B"))

    def run(self, ctx: RunContext) -> dict[str, Any]:
        activities = self.activities(ctx)
        texts = [a["text"] for a in activities]
        n = len(activities)
        probes = self.probe_readouts(ctx, activities)
        pairs = list(permutations(range(n), 2))
        base = self.tournament(ctx, activities, pairs, BASELINE, None)
        strengths, bias = bradley_terry(pairs, [base[p] for p in pairs], n)
        elo = to_elo(strengths)
        probe_r = {
            e: correlation([probes[i]["activity"][e] for i in range(n)], elo.tolist())
            for e in ctx.scorer.probes
        }
        emotions = self.steered_emotions(ctx, probe_r)
        steered = self.steered_half(activities)
        control = [i for i in range(n) if i not in steered]
        partners = ctx.options.get("partners") or (None if ctx.quick else DEFAULT_PARTNERS)
        rng = np.random.default_rng(ctx.seed)
        chosen_pairs: list[tuple[int, int]] = []
        for s in steered:
            mates = (
                control
                if not partners or partners >= len(control)
                else sorted(rng.choice(control, size=partners, replace=False).tolist())
            )
            chosen_pairs += [(s, c) for c in mates] + [(c, s) for c in mates]
        conditions = [
            {"emotion": None, "strength": 0.0, "value": 0.0, "ci95": [0.0, 0.0], "n": len(pairs)}
        ]
        delta: dict[str, float] = {}
        trend = []
        base_shift = self.relative_strengths(chosen_pairs, base, steered, control, n)
        for emotion in emotions:
            rows = [(texts[i], 0.0, 0.0) for i in steered]
            for strength in ctx.strengths:
                condition = Condition(emotion, strength)
                steered_p = self.tournament(ctx, activities, chosen_pairs, condition, set(steered))
                shift = self.relative_strengths(chosen_pairs, steered_p, steered, control, n)
                moved = ELO_SCALE * (shift - base_shift)
                value = float(moved.mean())
                conditions.append(
                    {
                        "emotion": emotion,
                        "strength": strength,
                        "value": value,
                        "ci95": list(bootstrap_ci(moved.tolist())),
                        "n": len(chosen_pairs),
                    }
                )
                if strength == PREFERENCE_STRENGTH or len(ctx.strengths) == 1:
                    delta[emotion] = value
                rows += [(texts[i], strength, float(m)) for i, m in zip(steered, moved)]
            trend.append({"emotion": emotion, **dose_trend(rows)})
        probe_values = [probe_r[e]["r"] for e in delta]
        return {
            "n_scenarios": n,
            "conditions": conditions,
            "trend": trend,
            "elo": {a["id"]: round(float(e), 1) for a, e in zip(activities, elo)},
            "elo_by_category": _by_category(activities, elo),
            "position_bias_logit": bias,
            "probe_elo_r": {e: v["r"] for e, v in probe_r.items()},
            "steer_delta_elo": delta,
            "r_probe_vs_steer": correlation(probe_values, list(delta.values())),
            "steered_activities": [activities[i]["id"] for i in steered],
            "pairs_per_emotion": len(chosen_pairs),
            "answered_a_or_b": _answered(ctx),
            "probe_sites": {
                "activity_tokens": {e: probe_r[e] for e in ctx.scorer.probes},
                "prompt_mean": {
                    e: correlation([probes[i]["prompt_mean"][e] for i in range(n)], elo.tolist())
                    for e in ctx.scorer.probes
                },
                "assistant_start": {
                    e: correlation(
                        [probes[i]["assistant_start"][e] for i in range(n)], elo.tolist()
                    )
                    for e in ctx.scorer.probes
                },
            },
        }

    def steered_emotions(
        self, ctx: RunContext, probe_r: Mapping[str, Mapping[str, float]]
    ) -> list[str]:
        """The emotions to steer with: the ones asked for, or (by default) 35 spread over the
        range of probe-Elo correlations, as the paper chose its 35, keeping blissful and hostile."""
        if ctx.options.get("emotions_given"):
            return ctx.emotions
        ranked = sorted(
            (e for e in probe_r if probe_r[e]["r"] == probe_r[e]["r"]),
            key=lambda e: probe_r[e]["r"],
        )
        count = len(ctx.emotions) if ctx.quick else int(ctx.options.get("count", DEFAULT_COUNT))
        keep = [resolve_emotion(e) for e in NAMED_BY_PAPER]
        if ctx.quick:
            return [e for e in ctx.emotions if e in ranked]
        return spread_by_rank(ranked, count, keep)

    def probe_readouts(
        self, ctx: RunContext, activities: Sequence[Mapping[str, Any]]
    ) -> list[dict[str, dict[str, float]]]:
        """Readouts on ``How would you feel about {activity}?`` (the paper's probe prompt)."""
        keys = [f"probe|{a['id']}" for a in activities]
        todo = [i for i, k in enumerate(keys) if k not in ctx.log.records]
        if todo:
            items = []
            for i in todo:
                text, special = chat_text(
                    ctx.lm,
                    [
                        {
                            "role": "user",
                            "content": f"How would you feel about {activities[i]['text']}?",
                        }
                    ],
                )
                span = find_span(text, activities[i]["text"])
                items.append(Item(keys[i], text, special, read_spans=[span]))
            scored = ctx.scorer.score(items, desc="activity readouts")
            ctx.log.add(
                [
                    {
                        "key": keys[i],
                        "scenario": activities[i]["id"],
                        "condition": "probe",
                        "readouts": {
                            "activity": s.spans[0],
                            "prompt_mean": s.prompt_mean,
                            "assistant_start": s.assistant_start,
                        },
                    }
                    for i, s in zip(todo, scored)
                ]
            )
        return [ctx.log.records[k]["readouts"] for k in keys]

    def tournament(
        self,
        ctx: RunContext,
        activities: Sequence[Mapping[str, Any]],
        pairs: Sequence[tuple[int, int]],
        condition: Condition,
        steered: set[int] | None,
    ) -> dict[tuple[int, int], float]:
        """P(first activity chosen) for each ordered pair under ``condition`` (resumable)."""
        variants = [f"r{i}" for i in range(ctx.rollouts)] if ctx.mode == "generate" else ["p"]

        def key(pair: tuple[int, int], variant: str) -> str:
            a, b = activities[pair[0]]["id"], activities[pair[1]]["id"]
            return f"{condition.key}|{a}|{b}|{variant}"

        cells = [(p, v) for p in pairs for v in variants]
        todo = [c for c in cells if key(*c) not in ctx.log.records]
        for start in range(0, len(todo), CHUNK * 4):
            chunk = todo[start : start + CHUNK * 4]
            items = []
            for (i, j), _ in chunk:
                steer = None
                if steered is not None:
                    steer = activities[i]["text"] if i in steered else activities[j]["text"]
                items.append(
                    self.pair_item(
                        ctx, activities[i]["text"], activities[j]["text"], condition.steering, steer
                    )
                )
            records = []
            if ctx.mode == "generate":
                seeds = [ctx.seed + int(v[1:]) for _, v in chunk]
                replies = ctx.scorer.generate(
                    items, ctx.sampling_short, seeds, desc="preference answers"
                )
                for (pair, variant), (reply, _) in zip(chunk, replies):
                    won = {"A": 1.0, "B": 0.0}.get(reply.strip()[:1].upper())  # else no vote
                    records.append(_pair_record(key(pair, variant), condition, won, reply))
            else:
                for (pair, variant), scored in zip(
                    chunk, ctx.scorer.score(items, desc=f"pairs {condition.key}")
                ):
                    records.append(
                        _pair_record(key(pair, variant), condition, scored.probabilities[0], None)
                    )
            ctx.log.add(records)
        out: dict[tuple[int, int], float] = {}
        for pair in pairs:
            values = [ctx.log.records[key(pair, v)]["outcome"] for v in variants]
            votes = [float(v) for v in values if v is not None]
            out[pair] = float(np.mean(votes)) if votes else 0.5
        return out


def _pair_record(
    key: str, condition: Condition, outcome: float | None, reply: str | None
) -> dict[str, Any]:
    record = {
        "key": key,
        "scenario": key.split("|", 1)[1],
        "condition": condition.key,
        "emotion": condition.emotion,
        "strength": condition.strength,
        "outcome": None if outcome is None else round(float(outcome), 5),
    }
    if reply is not None:
        record["reply"] = reply
    return record


def _answered(ctx: RunContext) -> float | None:
    """Generate mode: the share of sampled answers that were A or B (the rest are no vote)."""
    replies = [r for r in ctx.log.records.values() if "reply" in r]
    if not replies:
        return None
    return sum(r["outcome"] is not None for r in replies) / len(replies)


def _by_category(activities: Sequence[Mapping[str, Any]], elo: np.ndarray) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for a, e in zip(activities, elo):
        out.setdefault(a["category"], []).append(float(e))
    return {c: round(float(np.mean(v)), 1) for c, v in out.items()}
