"""Geometry of the bank: similarity structure, clusters, principal axes and human norms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.cluster.vq import kmeans2
from scipy.spatial.distance import squareform
from scipy.stats import pearsonr

from emoscope.concepts import Norm, human_norms


def cosine_matrix(vectors: torch.Tensor) -> np.ndarray:
    v = vectors.double()
    v = v / v.norm(dim=1, keepdim=True)
    return (v @ v.T).numpy()


def cluster_order(similarity: np.ndarray) -> list[int]:
    """Leaf order of average-linkage hierarchical clustering on cosine distance."""
    distance = np.clip(1.0 - similarity, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    tree = linkage(squareform(distance, checks=False), method="average")
    return [int(i) for i in leaves_list(tree)]


def kmeans_clusters(
    vectors: torch.Tensor, k: int = 10, seed: int = 0, restarts: int = 20
) -> list[int]:
    """k-means on the unit vectors (best of several seeded restarts, by inertia)."""
    x = (vectors / vectors.norm(dim=1, keepdim=True)).double().numpy()
    best_labels, best_inertia = None, np.inf
    rng = np.random.default_rng(seed)
    for _ in range(restarts):
        centroids, labels = kmeans2(x, k, minit="++", seed=int(rng.integers(1 << 31)))
        inertia = float(((x - centroids[labels]) ** 2).sum())
        if inertia < best_inertia and len(set(labels.tolist())) == k:
            best_labels, best_inertia = labels, inertia
    assert best_labels is not None
    return [int(c) for c in best_labels]


def valence_ordered_clusters(
    vectors: torch.Tensor, emotions: Sequence[str], k: int = 10
) -> dict[str, int]:
    """Each emotion's k-means cluster, numbered 1.. by falling mean human valence, so that
    cluster 1 is the most pleasant wherever it is shown."""
    labels = kmeans_clusters(vectors, k=min(k, len(emotions)))
    norms = human_norms(emotions)
    members: dict[int, list[str]] = {}
    for emotion, label in zip(emotions, labels):
        members.setdefault(label, []).append(emotion)

    def mean_valence(label: int) -> float:
        rated = [norms[e].valence for e in members[label] if e in norms]
        return sum(rated) / len(rated) if rated else 5.0

    order = sorted(members, key=lambda label: -mean_valence(label))
    return {e: n for n, label in enumerate(order, start=1) for e in members[label]}


@dataclass
class PCA:
    components: np.ndarray
    """``[k, hidden]``"""
    scores: np.ndarray
    """``[emotions, k]``"""
    explained: np.ndarray
    """variance ratio of each component"""


def pca(vectors: torch.Tensor, k: int = 5) -> PCA:
    x = vectors.double().numpy()
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    var = s**2
    return PCA(vt[:k], x @ vt[:k].T, var[:k] / var.sum())


def correlate(values: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    if len(values) < 3:
        return {"r": float("nan"), "p": float("nan"), "n": len(values)}
    r, p = pearsonr(values, reference)
    return {"r": float(r), "p": float(p), "n": len(values)}


def norm_correlations(
    scores: np.ndarray, emotions: Sequence[str], norms: Mapping[str, Norm], n_pcs: int = 3
) -> dict[str, Any]:
    """Pearson r of each of the first PCs with human valence, arousal and dominance."""
    rated = [i for i, e in enumerate(emotions) if e in norms]
    out: dict[str, Any] = {}
    for pc in range(min(n_pcs, scores.shape[1])):
        for dim in ("valence", "arousal", "dominance"):
            ref = [getattr(norms[emotions[i]], dim) for i in rated]
            out[f"pc{pc + 1}_{dim}"] = correlate([float(scores[i, pc]) for i in rated], ref)
    return out


def pca_norm_correlations(
    vectors: torch.Tensor, emotions: Sequence[str], n_pcs: int = 3
) -> dict[str, Any]:
    """:func:`norm_correlations` of the bank's own first principal components (``[emotions,
    hidden]`` vectors), against the human norms of the emotions rated."""
    return norm_correlations(pca(vectors, k=n_pcs).scores, emotions, human_norms(emotions), n_pcs)


def representational_similarity(matrices: Mapping[int, np.ndarray]) -> tuple[list[int], np.ndarray]:
    """Cosine similarity between layers' off-diagonal similarity structures."""
    layers = sorted(matrices)
    upper = np.triu_indices(next(iter(matrices.values())).shape[0], k=1)
    flat = np.stack([matrices[layer][upper] for layer in layers])
    flat = flat - flat.mean(axis=1, keepdims=True)
    flat = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    return layers, flat @ flat.T


def nearest_neighbours(
    similarity: np.ndarray, emotions: Sequence[str], k: int = 3
) -> dict[str, list[str]]:
    out = {}
    for i, e in enumerate(emotions):
        order = np.argsort(-similarity[i])
        out[e] = [emotions[j] for j in order if j != i][:k]
    return out


def decodability(
    vectors: torch.Tensor,
    emotions: Sequence[str],
    k: int = 20,
    folds: int = 10,
    alpha: float = 1.0,
    n_single: int = 10,
) -> dict[str, Any]:
    """How well human valence and arousal can be read off the top-``k`` principal components.

    A ridge regression on the standardised PC scores, cross-validated over the rated emotions
    (``folds`` interleaved folds), gives Pearson r of held-out predictions; beside it, the best
    single PC among the first ``n_single`` (|r|), as the report has always shown. Arousal can be
    spread over several components without any one of them tracking it.
    """
    norms = human_norms(emotions)
    rated = [i for i, e in enumerate(emotions) if e in norms]
    k = max(1, min(k, len(emotions) - 2))
    scores = pca(vectors, k=k).scores[rated]
    scores = (scores - scores.mean(axis=0)) / scores.std(axis=0).clip(min=1e-12)
    out: dict[str, Any] = {"k": int(scores.shape[1]), "n": len(rated), "alpha": alpha}
    if len(rated) < max(5, folds):
        return out
    fold_of = np.arange(len(rated)) % folds
    for dim in ("valence", "arousal"):
        y = np.array([getattr(norms[emotions[i]], dim) for i in rated])
        predicted = np.zeros_like(y)
        for f in range(folds):
            fit, held = fold_of != f, fold_of == f
            x, target = scores[fit], y[fit] - y[fit].mean()
            weights = np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ target)
            predicted[held] = scores[held] @ weights + y[fit].mean()
        singles = [
            abs(correlate(scores[:, j].tolist(), y.tolist())["r"])
            for j in range(min(n_single, scores.shape[1]))
        ]
        out[dim] = {
            "ridge_cv_r": correlate(predicted.tolist(), y.tolist())["r"],
            "best_single_pc_r": float(max(singles)),
            "best_single_pc": int(np.argmax(singles)) + 1,
        }
    return out


def structure_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r between the off-diagonal entries of two similarity matrices (RSA)."""
    upper = np.triu_indices(a.shape[0], k=1)
    return float(np.corrcoef(a[upper], b[upper])[0, 1])
