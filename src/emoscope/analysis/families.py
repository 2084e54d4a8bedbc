"""Validation of the speaker and deflection families, and the choice of the chat readout.

- chat readouts: story and speaker families read on implicit user messages at both chat sites
  (the assistant colon, the user-turn mean), per layer; the best on the *training* prompts
  becomes the bank's default chat readout, and the evaluation prompts report it;
- the 2x2 grid: cosines between present/other x Human/Assistant vectors of the same emotion;
- RSA of each family's similarity structure against the story bank's on the same emotions;
- deflection: cosine to the story vectors, the norm left outside the story subspace, and what
  story vectors read where an emotion is hidden;
- framing: present-speaker vectors from ``Person 1/2`` dialogues against the chat framing;
- valence/arousal decodability from the top principal components, for every family.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from emoscope.analysis import geometry
from emoscope.analysis.layers import nearest_vector_accuracy
from emoscope.analysis.prompts import SITES, ChatSites, implicit_accuracy, z_scores
from emoscope.speakers import (
    DEFLECTION_FAMILIES,
    FAMILY_RECIPE,
    FamilyBuild,
    labelled_rows,
)
from emoscope.vectors import STORY_FAMILY, EmotionBank, build_layer

GRID = ("present_human", "present_assistant", "other_human", "other_assistant")
CHAT_CANDIDATES = (STORY_FAMILY, "present", "other", "present_human", "other_assistant")
"""Families tried as the chat readout (those whose emotions cover the implicit targets)."""
STORY_SUBSPACE_VARIANCE = 0.99


def site_scores(
    view: EmotionBank, states: torch.Tensor, index: int, layer: int, site: str
) -> torch.Tensor:
    """Readouts at a chat site, z-scored against the same site on neutral prompts."""
    prefix = "prompt" if site == "assistant_colon" else "user"
    scores = view.scores(states[:, index], layer)
    return z_scores(
        scores, view.stat(f"{prefix}_score_mean", layer), view.stat(f"{prefix}_score_std", layer)
    )


def _mrr(result: dict[str, Any]) -> float:
    return float(np.mean([1.0 / p["rank"] for p in result["per_prompt"]]))


def chat_readouts(
    bank: EmotionBank,
    sites: ChatSites,
    targets: Sequence[str],
    test_labels: Sequence[str],
    train_labels: Sequence[str],
) -> dict[str, Any]:
    """Implicit-prompt accuracy (target on top among ``targets``) of every candidate family at
    both sites and every layer; the choice maximises training accuracy (then training mean
    reciprocal rank), and only then is its test accuracy looked at.

    Readouts are z-scored against neutral prompts at the same site, which a monitor can do for
    one message at a time; ``test_set_centred`` is the accuracy when the readouts are instead
    centred across the test messages themselves (needs the whole set, so it is reported for
    comparison only)."""
    candidates = []
    scored: dict[tuple[str, str, int], torch.Tensor] = {}
    for family in [f for f in CHAT_CANDIDATES if f == STORY_FAMILY or f in bank.families]:
        view = bank.family(family)
        if not set(targets) <= set(view.emotions):
            continue
        rows = [view.emotions.index(t) for t in targets]
        for site in SITES:
            for index, layer in enumerate(sites.layers):
                train = site_scores(view, sites.states("train", site), index, layer, site)[:, rows]
                test = site_scores(view, sites.states("test", site), index, layer, site)[:, rows]
                scored[(family, site, layer)] = test
                tr = implicit_accuracy(train, targets, train_labels)
                te = implicit_accuracy(test, targets, test_labels)
                raw = view.scores(sites.states("test", site)[:, index], layer)[:, rows]
                centred = implicit_accuracy(raw - raw.mean(dim=0), targets, test_labels)
                candidates.append(
                    {
                        "family": family,
                        "site": site,
                        "layer": layer,
                        "train": tr["accuracy"],
                        "train_mrr": _mrr(tr),
                        "test": te["accuracy"],
                        "test_mrr": _mrr(te),
                        "test_set_centred": centred["accuracy"],
                    }
                )
    if not candidates:
        return {}
    choice = max(candidates, key=lambda c: (round(c["train"], 6), round(c["train_mrr"], 6)))
    best_of: dict[str, dict[str, Any]] = {}
    for c in candidates:
        key = f"{c['family']}@{c['site']}"
        if key not in best_of or (c["train"], c["train_mrr"]) > (
            best_of[key]["train"],
            best_of[key]["train_mrr"],
        ):
            best_of[key] = c
    agreement = _agreement(scored, best_of)
    return {
        "targets": list(targets),
        "n_train": len(train_labels),
        "n_test": len(test_labels),
        "choice": choice,
        "best_by_family_site": best_of,
        "story_vs_present_agreement": agreement,
        "candidates": candidates,
    }


def _agreement(
    scored: dict[tuple[str, str, int], torch.Tensor], best_of: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """How often the story and present-speaker readouts pick the same top target on the test
    prompts, each at its own best training layer, per site."""
    out = {}
    for site in SITES:
        story, present = best_of.get(f"{STORY_FAMILY}@{site}"), best_of.get(f"present@{site}")
        if story is None or present is None:
            continue
        a = scored[(STORY_FAMILY, site, story["layer"])].argmax(dim=1)
        b = scored[("present", site, present["layer"])].argmax(dim=1)
        out[site] = float((a == b).float().mean())
    return out


def mean_cosine(a: EmotionBank, b: EmotionBank, layer: int) -> float:
    """Mean cosine between two families' vectors of the same emotion (those both have)."""
    common = [e for e in a.emotions if e in b.emotions]
    va = a.vectors[layer][[a.emotions.index(e) for e in common]]
    vb = b.vectors[layer][[b.emotions.index(e) for e in common]]
    return float(torch.nn.functional.cosine_similarity(va, vb, dim=1).mean())


def grid_report(bank: EmotionBank, layer: int) -> dict[str, Any]:
    """The 2x2 grid's cosine matrix at ``layer``, and within- vs across-group means per layer."""
    names = [f for f in GRID if f in bank.families]
    if len(names) < len(GRID):
        return {}
    views = {f: bank.family(f) for f in names}

    def summary(lay: int) -> dict[str, float]:
        within = [
            mean_cosine(views["present_human"], views["present_assistant"], lay),
            mean_cosine(views["other_human"], views["other_assistant"], lay),
        ]
        across = [
            mean_cosine(views[p], views[o], lay)
            for p in ("present_human", "present_assistant")
            for o in ("other_human", "other_assistant")
        ]
        return {
            "layer": lay,
            "within": float(np.mean(within)),
            "across": float(np.mean(across)),
            "across_abs": float(np.mean(np.abs(across))),
            "present_vs_other": mean_cosine(bank.family("present"), bank.family("other"), lay),
        }

    return {
        "layer": layer,
        "families": names,
        "matrix": [[mean_cosine(views[a], views[b], layer) for b in names] for a in names],
        "summary": summary(layer),
        "by_layer": [summary(lay) for lay in bank.layers],
    }


def rsa_report(bank: EmotionBank) -> dict[str, Any]:
    """Each family's similarity structure against the story bank's on the same emotions, at the
    family's default layer."""
    out = {}
    for family in bank.families:
        view = bank.family(family)
        common = [e for e in view.emotions if e in bank.emotions]
        if len(common) < 4:
            continue
        layer = view.default_layer
        rows = [bank.emotions.index(e) for e in common]
        story = geometry.cosine_matrix(bank.vectors[layer][rows])
        mine = geometry.cosine_matrix(view.vectors[layer][[view.emotions.index(e) for e in common]])
        out[family] = {
            "layer": layer,
            "n_emotions": len(rows),
            "rsa": geometry.structure_agreement(mine, story),
            "same_emotion_cosine": mean_cosine(view, bank, layer),
        }
    return out


def story_subspace(
    vectors: torch.Tensor, variance: float = STORY_SUBSPACE_VARIANCE
) -> torch.Tensor:
    """``[hidden, k]`` orthonormal directions that hold ``variance`` of the story vectors' energy."""
    _, s, vt = torch.linalg.svd(vectors.double(), full_matrices=False)
    share = (s**2).cumsum(0) / (s**2).sum()
    k = int((share < variance).sum()) + 1
    return vt[:k].T.float()


def deflection_report(
    bank: EmotionBank, means: torch.Tensor, dialogues: Sequence[Any]
) -> dict[str, Any]:
    """Deflection vectors against the story vectors, and what each reads on hidden emotions."""
    if not all(f in bank.families for f in DEFLECTION_FAMILIES):
        return {}
    out: dict[str, Any] = {}
    for family in DEFLECTION_FAMILIES:
        view = bank.family(family)
        layer = view.default_layer
        basis = story_subspace(bank.vectors[layer])
        v = view.vectors[layer]
        left = (v - (v @ basis) @ basis.T).norm(dim=1) / v.norm(dim=1)
        out[family] = {
            "layer": layer,
            "story_subspace_dims": int(basis.shape[1]),
            "norm_left": float(left.mean()),
            "norm_left_by_emotion": dict(zip(view.emotions, left.tolist(), strict=True)),
            "random_direction_norm_left": float(np.sqrt(1 - basis.shape[1] / v.shape[1])),
            "cosine_to_story": mean_cosine(view, bank, layer),
        }
    felt = bank.family("felt")
    layer = felt.default_layer
    x, felt_labels, _, is_test = labelled_rows(means, dialogues, "felt")
    _, shown_labels, _, _ = labelled_rows(means, dialogues, "displayed")
    index = bank.layers.index(layer)
    test = torch.nonzero(is_test).flatten().tolist()
    pool = [e for e in bank.emotions if e in {*felt_labels, *shown_labels}]
    rows = [bank.emotions.index(e) for e in pool]
    story_top = bank.scores(x[test, index], layer)[:, rows].argmax(dim=1).tolist()
    felt_top = felt.scores(x[test, index], layer).argmax(dim=1).tolist()
    out["hidden_emotion_test"] = {
        "layer": layer,
        "n": len(test),
        "felt_family_reads_felt": float(
            np.mean(
                [felt.emotions[t] == felt_labels[i] for t, i in zip(felt_top, test, strict=True)]
            )
        ),
        "story_reads_felt": float(
            np.mean([pool[t] == felt_labels[i] for t, i in zip(story_top, test, strict=True)])
        ),
        "story_reads_displayed": float(
            np.mean([pool[t] == shown_labels[i] for t, i in zip(story_top, test, strict=True)])
        ),
        "chance_felt_family": 1 / len(felt.emotions),
    }
    return out


def framing_report(
    bank: EmotionBank,
    person: torch.Tensor,
    chat: torch.Tensor,
    dialogues: Sequence[Any],
    bases: dict[int, torch.Tensor],
) -> dict[str, Any]:
    """Present-speaker vectors built from the ``Person 1/2`` framing against the chat framing's:
    same-emotion cosine, RSA, and each framing's vectors classifying the other's test turns."""
    if "present" not in bank.families:
        return {}
    view = bank.family("present")
    layer = view.default_layer
    index = bank.layers.index(layer)
    xp, labels, _, is_test = labelled_rows(person, dialogues, "present")
    xc, _, _, _ = labelled_rows(chat, dialogues, "present")
    keep = torch.tensor([e in view.emotions for e in labels])
    xp, xc, is_test = xp[keep], xc[keep], is_test[keep]
    y = torch.tensor([view.emotions.index(e) for e in labels if e in view.emotions])
    train = ~is_test
    built = build_layer(xp[train, index], y[train], len(view.emotions), bases[layer], FAMILY_RECIPE)
    cos = torch.nn.functional.cosine_similarity(built.vectors, view.vectors[layer], dim=1)
    vectors = {
        "person": (built.vectors, built.mean),
        "chat": (view.vectors[layer], view.stat("mean", layer)),
    }
    turns = {"person": xp[is_test, index], "chat": xc[is_test, index]}
    out: dict[str, Any] = {
        "layer": layer,
        "same_emotion_cosine": float(cos.mean()),
        "rsa": geometry.structure_agreement(
            geometry.cosine_matrix(built.vectors), geometry.cosine_matrix(view.vectors[layer])
        ),
    }
    for source, (v, centre) in vectors.items():
        for target, x in turns.items():
            accuracy = nearest_vector_accuracy(v, centre, x, y[is_test])
            out[f"{source}_vectors_on_{target}_test"] = accuracy.as_dict()
    return out


def decodability_report(bank: EmotionBank) -> dict[str, Any]:
    """Valence/arousal decodability per layer for the story vectors and every family with
    enough rated emotions."""
    out = {}
    for family in [STORY_FAMILY, *bank.families]:
        view = bank.family(family)
        if len(view.emotions) < 20:
            continue
        by_layer = [
            {"layer": layer, **geometry.decodability(view.vectors[layer], view.emotions)}
            for layer in view.layers
        ]
        default = next(r for r in by_layer if r["layer"] == view.default_layer)
        out[family] = {
            "default_layer": view.default_layer,
            "at_default": default,
            "by_layer": by_layer,
        }
    return out


def family_summary(builds: dict[str, FamilyBuild]) -> dict[str, Any]:
    """Per family: emotions, default layer and its accuracy, and the per-layer rows."""
    out = {}
    for name, build in builds.items():
        row = next(r for r in build.rows if r["layer"] == build.default_layer)
        out[name] = {
            "emotions": len(build.emotions),
            "default_layer": build.default_layer,
            "cv_train": row["cv_train"],
            "test": row["test"],
            "chance_top1": 1 / len(build.emotions),
            **{k: v for k, v in build.info.items() if k != "default_layer"},
            "by_layer": build.rows,
        }
    return out
