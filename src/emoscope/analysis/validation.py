"""Validation of a finished bank: does it read what it should, and is its geometry meaningful?

- implicit prompts: is a prompt's implied emotion the highest readout among the targets?
- intensity sweeps: does the expected emotion's readout follow the number in the prompt?
- geometry: similarity structure, clusters, principal axes against human norms, layer-to-layer
  similarity;
- logit lens: which output tokens each core emotion's direction promotes;
- per-emotion ranks of the true emotion on held-out stories.

All of it is at one layer (the default layer) unless stated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from emoscope.analysis import geometry
from emoscope.analysis.layers import LabelledStories
from emoscope.analysis.logit_lens import logit_lens
from emoscope.analysis.prompts import (
    PromptReadouts,
    implicit_accuracy,
    intensity_trend,
    z_scores,
)
from emoscope.concepts import CORE_EMOTIONS, human_norms
from emoscope.vectors import EmotionBank

MAX_RSA_LAYERS = 14


@dataclass
class Analysis:
    """The validation sections of the report, each a JSON-ready dictionary."""

    implicit: dict[str, Any]
    intensity: dict[str, Any]
    geometry: dict[str, Any]
    logit_lens: dict[str, Any]
    per_emotion_test: dict[str, Any]

    def as_report(self) -> dict[str, Any]:
        return {
            "implicit": self.implicit,
            "intensity": self.intensity,
            "geometry": self.geometry,
            "logit_lens": self.logit_lens,
            "per_emotion_test": self.per_emotion_test,
        }


def analyse(
    lm: Any,
    bank: EmotionBank,
    stories: LabelledStories,
    readouts: PromptReadouts,
    prompts: dict[str, Any],
    layer: int,
) -> Analysis:
    """Every validation number for the report, at ``layer`` unless stated."""
    return Analysis(
        implicit=implicit_report(bank, readouts, prompts, layer),
        intensity=intensity_report(bank, readouts, prompts["intensity"], layer),
        geometry=geometry_report(bank, layer),
        logit_lens=core_logit_lens(lm, bank, layer),
        per_emotion_test=per_emotion_test(bank, stories, layer),
    )


def implicit_report(
    bank: EmotionBank, readouts: PromptReadouts, prompts: dict[str, Any], layer: int
) -> dict[str, Any]:
    """The target among the implicit targets, centred and z-scored against neutral prompts."""
    emotions = bank.emotions
    targets = [t for t in prompts["implicit_targets"] if t in emotions]
    rows = torch.tensor([emotions.index(t) for t in targets])
    usable = [i for i, p in enumerate(prompts["implicit"]) if p["emotion"] in targets]
    labels = [prompts["implicit"][i]["emotion"] for i in usable]
    implicit_readouts = readouts.implicit[usable]

    def at(index: int, lay: int) -> tuple[dict[str, Any], dict[str, Any]]:
        scores = bank.scores(implicit_readouts[:, index], lay)[:, rows]
        mean = bank.stat("prompt_score_mean", lay)[rows]
        std = bank.stat("prompt_score_std", lay)[rows]
        return (
            implicit_accuracy(z_scores(scores, mean, std), targets, labels),
            implicit_accuracy(scores, targets, labels),
        )

    by_layer = {lay: at(index, lay) for index, lay in enumerate(readouts.layers)}
    return {
        "targets": targets,
        "layer": layer,
        "z_scored": by_layer[layer][0],
        "centred": by_layer[layer][1],
        "by_layer": [
            {"layer": lay, "z_scored": z["accuracy"], "centred": c["accuracy"]}
            for lay, (z, c) in by_layer.items()
        ],
        "prompts": [prompts["implicit"][i]["text"] for i in usable],
    }


def intensity_report(
    bank: EmotionBank, readouts: PromptReadouts, templates: list[dict[str, Any]], layer: int
) -> dict[str, Any]:
    """Spearman of each expected emotion's readout with the number filled into the template."""
    emotions = bank.emotions
    index = readouts.layers.index(layer)
    out = []
    offset = held = total = 0
    for t in templates:
        n = len(t["values"])
        scores = bank.scores(readouts.intensity[offset : offset + n, index], layer)
        offset += n
        trends = {}
        for emotion, direction in t["expected"].items():
            if emotion not in emotions:
                continue
            trend = intensity_trend(
                t["values"], scores[:, emotions.index(emotion)].tolist(), direction
            )
            trends[emotion] = trend
            held += trend["holds"]
            total += 1
        out.append(
            {"id": t["id"], "template": t["template"], "values": t["values"], "trends": trends}
        )
    return {"layer": layer, "templates": out, "held": held, "total": total}


def geometry_report(bank: EmotionBank, layer: int) -> dict[str, Any]:
    """Similarity structure, clusters and principal axes of the vectors at ``layer``."""
    emotions = bank.emotions
    vectors = bank.vectors[layer]
    sim = geometry.cosine_matrix(vectors)
    clusters = geometry.kmeans_clusters(vectors, k=min(10, len(emotions)))
    p = geometry.pca(vectors, k=5)
    norms = human_norms(emotions)
    layers = bank.layers
    if len(layers) > MAX_RSA_LAYERS:
        layers = [layers[round(i)] for i in np.linspace(0, len(layers) - 1, MAX_RSA_LAYERS)]
    rsa_layers, rsa = geometry.representational_similarity(
        {lay: geometry.cosine_matrix(bank.vectors[lay]) for lay in layers}
    )
    by_cluster: dict[int, list[str]] = {}
    for e, c in zip(emotions, clusters, strict=True):
        by_cluster.setdefault(c, []).append(e)
    valence_of = {
        c: float(np.mean([norms[e].valence for e in members if e in norms] or [5.0]))
        for c, members in by_cluster.items()
    }
    return {
        "layer": layer,
        "cosine_order": [emotions[i] for i in geometry.cluster_order(sim)],
        "pca_variance_ratio": p.explained.tolist(),
        "pca_scores": {e: p.scores[i, :3].tolist() for i, e in enumerate(emotions)},
        "norms": geometry.norm_correlations(p.scores, emotions, norms),
        "n_rated": len(norms),
        "clusters": [
            sorted(by_cluster[c]) for c in sorted(by_cluster, key=lambda c: -valence_of[c])
        ],
        "nearest": geometry.nearest_neighbours(sim, emotions, 3),
        "rsa_layers": rsa_layers,
        "rsa": rsa.tolist(),
        "rsa_mean_offdiag": float((rsa.sum() - np.trace(rsa)) / max(1, rsa.size - len(rsa))),
        "opposites": {e: emotions[int(np.argmin(sim[i]))] for i, e in enumerate(emotions)},
        "cosine": sim.round(4).tolist(),
    }


def core_logit_lens(lm: Any, bank: EmotionBank, layer: int, k: int = 10) -> dict[str, Any]:
    """Top and bottom tokens of the core emotions present in the bank."""
    names = [e for e in CORE_EMOTIONS if e in bank.emotions]
    rows = [bank.emotions.index(e) for e in names]
    lens = logit_lens(lm, bank.vectors[layer][rows], k=k)
    return dict(zip(names, lens, strict=True))


def per_emotion_test(bank: EmotionBank, stories: LabelledStories, layer: int) -> dict[str, Any]:
    """Rank of the true emotion for each test story, summarised per emotion."""
    test = torch.nonzero(stories.is_test).flatten().tolist()
    if not test:
        return {}
    scores = bank.scores(stories.activations.at(layer)[test], layer)
    out: dict[str, Any] = {}
    for row, i in enumerate(test):
        emotion = stories.emotions[int(stories.labels[i])]
        true = bank.emotions.index(emotion)
        rank = int((scores[row] > scores[row, true]).sum()) + 1
        entry = out.setdefault(emotion, {"ranks": [], "confused_with": []})
        entry["ranks"].append(rank)
        if rank > 1:
            entry["confused_with"].append(bank.emotions[int(scores[row].argmax())])
    return out
