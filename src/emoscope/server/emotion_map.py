"""The emotion map: every emotion of the bank placed on the first two principal components of
its unit vectors at the default layer, with human valence/arousal and its cluster.

The signs of principal components are arbitrary; the axes are turned so that x rises with human
valence and y with arousal, which keeps the map's orientation the same from bank to bank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from emoscope.analysis.geometry import pca, valence_ordered_clusters
from emoscope.concepts import human_norms
from emoscope.vectors import EmotionBank, unit_rows


def _oriented(axis: np.ndarray, reference: list[float | None]) -> np.ndarray:
    """``axis`` with its sign flipped if it falls with the rated ``reference`` values."""
    rated = [(a, r) for a, r in zip(axis.tolist(), reference) if r is not None]
    if len(rated) < 2:
        return axis
    a, r = np.array(rated).T
    return -axis if float(np.dot(a - a.mean(), r - r.mean())) < 0 else axis


def emotion_map(
    bank: EmotionBank, clusters: Mapping[str, int] | None = None
) -> list[dict[str, Any]]:
    """One row per bank emotion: ``name``, ``valence``, ``arousal`` (None where unrated),
    ``cluster`` and map coordinates ``x``, ``y``."""
    vectors = unit_rows(bank.vectors[bank.default_layer].float())
    coords = np.zeros((len(bank.emotions), 2))
    if len(bank.emotions) > 1:
        scores = pca(vectors, k=2).scores
        coords[:, : scores.shape[1]] = scores
    norms = human_norms(bank.emotions)
    valence = [norms[e].valence if e in norms else None for e in bank.emotions]
    arousal = [norms[e].arousal if e in norms else None for e in bank.emotions]
    x, y = _oriented(coords[:, 0], valence), _oriented(coords[:, 1], arousal)
    if clusters is None:
        clusters = valence_ordered_clusters(vectors, bank.emotions)
    return [
        {
            "name": name,
            "valence": valence[i],
            "arousal": arousal[i],
            "cluster": clusters.get(name),
            "x": round(float(x[i]), 4),
            "y": round(float(y[i]), 4),
        }
        for i, name in enumerate(bank.emotions)
    ]
