"""Layer sweep: how well each layer's vectors identify the emotion of held-out stories.

A story is classified by its nearest vector after centring (the largest readout among all the
bank's emotions). The default layer is chosen by cross-validation over topics *within the
training split*, so the test split stays untouched until it is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from emoscope.activations import NeutralMoments, TextMeans
from emoscope.analysis.calibration import readout_statistics
from emoscope.analysis.geometry import pca_norm_correlations
from emoscope.corpus.records import Story
from emoscope.vectors import (
    LayerVectors,
    Recipe,
    build_layer,
    build_layers,
    centred_scores,
    covariance_of,
    neutral_basis,
)


@dataclass
class Accuracy:
    top1: float
    top5: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"top1": self.top1, "top5": self.top5, "n": self.n}


@dataclass
class LabelledStories:
    """Per-story mean activations with each story's emotion, split and topic."""

    activations: TextMeans
    emotions: list[str]
    labels: torch.Tensor
    """``[stories]`` index into ``emotions``."""
    is_test: torch.Tensor
    """``[stories]`` bool: held out until the report."""
    topics: list[str]

    @classmethod
    def from_records(
        cls, activations: TextMeans, stories: Sequence[Story], emotions: Sequence[str]
    ) -> LabelledStories:
        index = {e: i for i, e in enumerate(emotions)}
        return cls(
            activations,
            list(emotions),
            torch.tensor([index[s.emotion] for s in stories]),
            torch.tensor([s.split == "test" for s in stories]),
            [s.topic for s in stories],
        )

    @property
    def is_train(self) -> torch.Tensor:
        return ~self.is_test


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
    return topk_accuracy(centred_scores(means, vectors, centre), labels)


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


@dataclass
class VectorSweep:
    """Vectors at every layer, built at the denoising level chosen together with the default layer."""

    recipe: Recipe
    """The run's recipe with ``story_variance`` resolved to the chosen level."""
    default_layer: int
    layers: dict[int, LayerVectors]
    statistics: dict[str, torch.Tensor]
    """Readout calibration (:func:`readout_statistics`) as ``{name}.{layer}``."""
    rows: list[dict[str, Any]]
    """Per layer: held-out and cross-validated accuracy, valence alignment, components."""
    selection: dict[str, Any]
    """How the story-variance level was chosen (the grid and its best score per level)."""


def neutral_bases(neutral: NeutralMoments, recipe: Recipe) -> dict[int, torch.Tensor]:
    """Per layer, the neutral-text components the recipe projects out (over token positions or
    over per-dialogue means)."""
    return {
        layer: neutral_basis(
            neutral.cov[i]
            if recipe.neutral_pca == "tokens"
            else covariance_of(neutral.text_means[:, i]),
            recipe,
        )
        for i, layer in enumerate(neutral.layers)
    }


def sweep_layers(
    stories: LabelledStories,
    neutral: NeutralMoments,
    neutral_prompts: torch.Tensor,
    recipe: Recipe,
    cv_folds: int = 5,
) -> VectorSweep:
    """Choose the story-variance level and default layer by cross-validation on the training
    split, then build every layer's vectors at that level and score them on the test split.

    ``neutral_prompts`` is ``[prompts, layers, hidden]`` (assistant-turn readouts of neutral
    prompts, for calibration); all inputs share the layer order of ``stories.activations``.
    """
    layers = stories.activations.layers
    bases = neutral_bases(neutral, recipe)
    cv = _cross_validate(stories, bases, recipe.story_levels, cv_folds)
    level, default_layer = choose(cv)
    chosen = recipe.with_story_variance(level)
    built: dict[int, LayerVectors] = {}
    statistics: dict[str, torch.Tensor] = {}
    rows = []
    train = stories.is_train
    for i, layer in enumerate(layers):
        x = stories.activations.means[:, i]
        lv = build_layer(
            x[train], stories.labels[train], len(stories.emotions), bases[layer], chosen
        )
        built[layer] = lv
        for name, value in readout_statistics(lv, neutral, i, neutral_prompts[:, i]).items():
            statistics[f"{name}.{layer}"] = value
        rows.append(
            {
                "layer": layer,
                "test": _test_accuracy(lv.vectors, lv.mean, x, stories).as_dict(),
                "test_raw": _test_accuracy(lv.raw, lv.mean, x, stories).as_dict(),
                "cv_train": cv[(level, layer)].as_dict(),
                "pc1_valence_r": pca_norm_correlations(lv.vectors, stories.emotions)["pc1_valence"][
                    "r"
                ],
                "projected_components": lv.n_components,
                "neutral_components": int(bases[layer].shape[1]),
                "residual_norm": float(neutral.mean_norm[i]),
            }
        )
    selection = {
        "story_variance": level,
        "grid": list(recipe.story_levels),
        "cv_by_level": {
            str(v): max((cv[(v, layer)].top1 + cv[(v, layer)].top5) / 2 for layer in layers)
            for v in recipe.story_levels
        },
    }
    return VectorSweep(chosen, default_layer, built, statistics, rows, selection)


def _cross_validate(
    stories: LabelledStories,
    bases: dict[int, torch.Tensor],
    levels: Sequence[float],
    n_folds: int,
) -> dict[tuple[float, int], Accuracy]:
    """Leave-topics-out accuracy on the training split for every (level, layer) pair."""
    train = stories.is_train
    topics = [t for t, keep in zip(stories.topics, train.tolist(), strict=True) if keep]
    cv: dict[tuple[float, int], Accuracy] = {}
    for i, layer in enumerate(stories.activations.layers):
        by_level = cross_validated_accuracy(
            stories.activations.means[train, i],
            stories.labels[train],
            topics,
            len(stories.emotions),
            bases[layer],
            levels,
            n_folds,
        )
        cv.update({(level, layer): acc for level, acc in by_level.items()})
    return cv


def _test_accuracy(
    vectors: torch.Tensor, centre: torch.Tensor, means: torch.Tensor, stories: LabelledStories
) -> Accuracy:
    """Nearest-vector accuracy on the test split (all zero when there is none)."""
    test = stories.is_test
    if not test.any():
        return Accuracy(0, 0, 0)
    return nearest_vector_accuracy(vectors, centre, means[test], stories.labels[test])
