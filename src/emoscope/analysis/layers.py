"""Layer sweep: how well each layer's vectors identify the emotion of held-out stories.

A story is classified by its nearest vector after centring (the largest readout among all the
bank's emotions). The default layer is chosen by cross-validation over topics *within the
training split*, so the test split stays untouched until it is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from emoscope.vectors import build_layers


@dataclass
class Accuracy:
    top1: float
    top5: float
    n: int


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> Accuracy:
    """``scores``: ``[items, emotions]``; ``labels``: the true emotion index of each item."""
    k = min(5, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return Accuracy(
        float((top[:, 0] == labels).float().mean()),
        float((top == labels.unsqueeze(1)).any(dim=1).float().mean()),
        int(labels.numel()),
    )


def nearest_vector_accuracy(
    vectors: torch.Tensor, centre: torch.Tensor, means: torch.Tensor, labels: torch.Tensor
) -> Accuracy:
    return topk_accuracy((means - centre) @ vectors.T, labels)


def topic_folds(topics: Sequence[str], n_folds: int) -> list[torch.Tensor]:
    """Boolean masks that hold out disjoint groups of topics (deterministic)."""
    ordered = sorted(set(topics))
    fold_of = {t: i % n_folds for i, t in enumerate(ordered)}
    assignment = torch.tensor([fold_of[t] for t in topics])
    return [assignment == f for f in range(n_folds)]


def cross_validated_accuracy(
    means: torch.Tensor,
    labels: torch.Tensor,
    topics: Sequence[str],
    n_emotions: int,
    basis: torch.Tensor,
    story_variances: Sequence[float],
    n_folds: int = 5,
) -> dict[float, Accuracy]:
    """Leave-topics-out accuracy on training stories at one layer, for each story-variance level."""
    correct = {v: [0.0, 0.0] for v in story_variances}
    total = 0
    for held in topic_folds(topics, n_folds):
        fit = ~held
        if len(set(labels[fit].tolist())) < n_emotions or not held.any():
            continue
        fitted = build_layers(means[fit], labels[fit], n_emotions, basis, story_variances)
        for variance, layer in zip(story_variances, fitted, strict=True):
            acc = nearest_vector_accuracy(layer.vectors, layer.mean, means[held], labels[held])
            correct[variance][0] += acc.top1 * acc.n
            correct[variance][1] += acc.top5 * acc.n
        total += int(held.sum())
    return {
        v: Accuracy(c1 / max(total, 1), c5 / max(total, 1), total)
        for v, (c1, c5) in correct.items()
    }


def choose(cv: dict[tuple[float, int], Accuracy]) -> tuple[float, int]:
    """The (story variance, layer) pair with the best cross-validated top-1 + top-5 accuracy
    (ties: less denoising, then the earlier layer)."""
    return max(cv, key=lambda key: (round(cv[key].top1 + cv[key].top5, 6), -key[0], -key[1]))
