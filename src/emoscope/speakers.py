"""Speaker and deflection vectors: whose emotion a chat carries, and whether it is shown.

From the speaker dialogues (:mod:`emoscope.corpus.dialogues`) each speaker's tokens are averaged
separately, at every layer, in one forward pass per batch. A *family* of vectors is then built
exactly as story vectors are (mean per emotion, minus the mean across emotions, neutral
components projected out), from a choice of rows and labels:

- ``present``: each speaker's tokens, labelled with that speaker's own emotion;
- ``other``: each speaker's tokens, labelled with the *other* speaker's emotion;
- ``present_human`` / ``present_assistant`` / ``other_human`` / ``other_assistant``: the paper's
  2x2 grid in the chat framing, where ``A`` is the user (Human) and ``B`` the assistant: token
  position (whose turns) x conditioned emotion (whose emotion);
- ``felt`` / ``displayed``: the deflection dialogues' speaker ``A``, labelled with the emotion
  felt (set up by the narration) or the one displayed by every word.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from emoscope.activations import NeutralMoments
from emoscope.batching import from_token_lists, padding_id
from emoscope.concepts import EMOTIONS
from emoscope.corpus.dialogues import (
    DeflectionDialogue,
    Rendered,
    SpeakerDialogue,
    speaker_token_mask,
)
from emoscope.errors import EmoscopeError
from emoscope.hooks import ResidualReader
from emoscope.vectors import LayerVectors, Recipe, build_layer

SPEAKER_FAMILIES = (
    "present",
    "other",
    "present_human",
    "present_assistant",
    "other_human",
    "other_assistant",
)
DEFLECTION_FAMILIES = ("felt", "displayed")
FAMILIES = SPEAKER_FAMILIES + DEFLECTION_FAMILIES


def speaker_means(
    lm: Any,
    rendered: Sequence[Rendered],
    layers: Sequence[int] | None = None,
    max_batch: int = 8,
    progress: bool = True,
    speakers: Sequence[str] = ("A", "B"),
    desc: str = "speaker activations",
) -> torch.Tensor:
    """``[dialogues, speakers, layers, hidden]``: the mean residual of each speaker's tokens
    (A's, then B's) in each rendered dialogue, at every requested layer (float32)."""
    layers = list(range(lm.n_layers)) if layers is None else lm.check_layers(layers)
    ids, weights = [], []
    for item in rendered:
        encoded = lm.tokenizer(item.text, add_special_tokens=item.add_special_tokens)
        ids.append(list(encoded["input_ids"]))
        masks = [speaker_token_mask(lm, item, speaker) for speaker in speakers]
        if not all(any(mask) for mask in masks):
            raise EmoscopeError("A rendered dialogue has no tokens for one of its speakers.")
        weights.append(torch.tensor(masks, dtype=torch.float32))
    out = torch.zeros(len(rendered), len(speakers), len(layers), lm.hidden_size)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    pad = padding_id(lm.tokenizer)
    current: dict[str, torch.Tensor] = {}

    def transform(_layer: int, hidden: torch.Tensor) -> torch.Tensor:
        w = current["w"].to(hidden.device)
        return torch.einsum("bsw,bwh->bsh", w, hidden.float()) / w.sum(-1, keepdim=True)

    bar = tqdm(total=len(ids), desc=desc, disable=not progress)
    with ResidualReader(
        lm.model, lm.adapter, layers, transform=transform, stop_after_last=True
    ) as reader:
        for start in range(0, len(order), max_batch):
            items = order[start : start + max_batch]
            batch = from_token_lists([ids[i] for i in items], pad, lm.device)
            w = torch.zeros(len(items), len(speakers), batch.width)
            for row, i in enumerate(items):
                w[row, :, batch.width - len(ids[i]) :] = weights[i]
            current["w"] = w
            reader.clear()
            reader.run(**batch.inputs())
            out[torch.tensor(items)] = torch.stack(
                [reader.last(layer).cpu() for layer in layers], dim=2
            )
            bar.update(len(items))
    bar.close()
    return out


def family_rows(
    dialogues: Sequence[SpeakerDialogue] | Sequence[DeflectionDialogue], family: str
) -> tuple[list[tuple[int, int]], list[str]]:
    """Which ``(dialogue, speaker)`` means a family averages (speaker 0 is A) and their labels."""
    if family not in FAMILIES:
        raise EmoscopeError(f"Unknown vector family '{family}' (use {', '.join(FAMILIES)}).")
    rows: list[tuple[int, int]] = []
    labels: list[str] = []
    for d, dialogue in enumerate(dialogues):
        if family in DEFLECTION_FAMILIES:
            if not isinstance(dialogue, DeflectionDialogue):
                raise EmoscopeError(f"The '{family}' family is built from deflection dialogues.")
            rows.append((d, 0))
            labels.append(dialogue.felt if family == "felt" else dialogue.displayed)
            continue
        if not isinstance(dialogue, SpeakerDialogue):
            raise EmoscopeError(f"The '{family}' family is built from speaker dialogues.")
        own = [dialogue.emotion("A"), dialogue.emotion("B")]
        positions = {"human": [0], "assistant": [1]}.get(family.split("_")[-1], [0, 1])
        for speaker in positions:
            rows.append((d, speaker))
            labels.append(own[speaker] if family.startswith("present") else own[1 - speaker])
    return rows, labels


def build_family(
    means: torch.Tensor,
    dialogues: Sequence[SpeakerDialogue] | Sequence[DeflectionDialogue],
    family: str,
    emotions: Sequence[str],
    layer: int,
    basis: torch.Tensor,
    recipe: Recipe | None = None,
) -> LayerVectors:
    """One family's vectors at one layer index of ``means`` (from :func:`speaker_means`), with
    ``basis`` the neutral components to project out; ``emotions`` fixes the row order."""
    rows, labels = family_rows(dialogues, family)
    missing = sorted(set(emotions) - set(labels))
    if missing:
        raise EmoscopeError(f"No '{family}' examples for: {', '.join(missing)}.")
    keep = [i for i, label in enumerate(labels) if label in emotions]
    index = {e: i for i, e in enumerate(emotions)}
    x = torch.stack([means[rows[i][0], rows[i][1], layer] for i in keep])
    y = torch.tensor([index[labels[i]] for i in keep])
    return build_layer(x, y, len(emotions), basis, recipe or Recipe(story_variance=0.0))


@dataclass
class FamilyBuild:
    """One family at every layer, with what the bank and the report need of it."""

    name: str
    emotions: list[str]
    layers: dict[int, LayerVectors]
    statistics: dict[str, torch.Tensor]
    default_layer: int
    rows: list[dict[str, Any]]
    """Per layer: cross-validated (train topics) and held-out accuracy."""
    info: dict[str, Any]


@dataclass
class FamilyInputs:
    """What building the families reads: per-speaker means and the shared neutral statistics.

    ``chat`` / ``deflection`` are :func:`speaker_means` of the speaker dialogues in the chat
    framing and of the deflection dialogues; ``layers`` is their layer order.
    """

    layers: list[int]
    speakers: Sequence[SpeakerDialogue]
    chat: torch.Tensor
    deflections: Sequence[DeflectionDialogue]
    deflection: torch.Tensor
    bases: dict[int, torch.Tensor]
    neutral: NeutralMoments
    neutral_prompts: torch.Tensor
    """``[prompts, layers, hidden]`` at the assistant colon of neutral prompts."""
    neutral_user: torch.Tensor
    """``[prompts, layers, hidden]`` averaged over the neutral prompts' user tokens."""


def labelled_rows(
    means: torch.Tensor,
    dialogues: Sequence[SpeakerDialogue] | Sequence[DeflectionDialogue],
    family: str,
) -> tuple[torch.Tensor, list[str], list[str], torch.Tensor]:
    """A family's ``[rows, layers, hidden]`` means, their labels and topics, and test flags."""
    rows, labels = family_rows(dialogues, family)
    x = torch.stack([means[d, s] for d, s in rows])
    topics = [dialogues[d].topic for d, _ in rows]
    is_test = torch.tensor([dialogues[d].split == "test" for d, _ in rows])
    return x, labels, topics, is_test


def build_families(
    inputs: FamilyInputs, cv_folds: int = 5, families: Sequence[str] = FAMILIES
) -> dict[str, FamilyBuild]:
    """Every family at every layer from the training dialogues; the default layer of each is
    its best cross-validated (leave-topics-out, training split) top-1 + top-5 accuracy."""
    from emoscope.analysis.calibration import readout_statistics, user_site_statistics
    from emoscope.analysis.layers import choose, cross_validated_accuracy, nearest_vector_accuracy

    out = {}
    for name in families:
        deflection = name in DEFLECTION_FAMILIES
        source = inputs.deflection if deflection else inputs.chat
        dialogues = inputs.deflections if deflection else inputs.speakers
        x, labels, topics, is_test = labelled_rows(source, dialogues, name)
        seen = {label for label, test in zip(labels, is_test.tolist(), strict=True) if not test}
        emotions = [e for e in EMOTIONS if e in seen]
        if len(emotions) < 2:
            raise EmoscopeError(f"The '{name}' family needs training dialogues of 2+ emotions.")
        keep = torch.tensor([label in seen for label in labels])
        x, is_test = x[keep], is_test[keep]
        topics = [t for t, k in zip(topics, keep.tolist(), strict=True) if k]
        y = torch.tensor([emotions.index(label) for label in labels if label in seen])
        train = ~is_test
        train_topics = [t for t, keep in zip(topics, train.tolist(), strict=True) if keep]
        layers: dict[int, LayerVectors] = {}
        statistics: dict[str, torch.Tensor] = {}
        cv = {}
        rows = []
        for i, layer in enumerate(inputs.layers):
            basis = inputs.bases[layer]
            lv = build_layer(x[train, i], y[train], len(emotions), basis, FAMILY_RECIPE)
            layers[layer] = lv
            for key, value in readout_statistics(
                lv, inputs.neutral, i, inputs.neutral_prompts[:, i]
            ).items():
                statistics[f"{key}.{layer}"] = value
            for key, value in user_site_statistics(lv, inputs.neutral_user[:, i]).items():
                statistics[f"{key}.{layer}"] = value
            fold = cross_validated_accuracy(
                x[train, i], y[train], train_topics, len(emotions), basis, [0.0], cv_folds
            )[0.0]
            cv[(0.0, layer)] = fold
            test = (
                nearest_vector_accuracy(lv.vectors, lv.mean, x[is_test, i], y[is_test]).as_dict()
                if is_test.any()
                else None
            )
            rows.append({"layer": layer, "cv_train": fold.as_dict(), "test": test})
        default_layer = choose(cv)[1]
        source_name = "deflection dialogues" if deflection else "speaker dialogues (chat framing)"
        info = {
            "source": source_name,
            "default_layer": default_layer,
            "n_train": int(train.sum()),
            "n_test": int(is_test.sum()),
            "description": FAMILY_DESCRIPTIONS[name],
        }
        out[name] = FamilyBuild(name, emotions, layers, statistics, default_layer, rows, info)
    return out


FAMILY_RECIPE = Recipe(story_variance=0.0)
"""Families follow the paper's recipe: neutral components projected out, no story denoising."""

FAMILY_DESCRIPTIONS = {
    "present": "the emotion of the speaker whose tokens are read",
    "other": "the emotion of the other speaker, read on this speaker's tokens",
    "present_human": "the user's emotion, read on the user's tokens",
    "present_assistant": "the assistant's emotion, read on the assistant's tokens",
    "other_human": "the assistant's emotion, read on the user's tokens",
    "other_assistant": "the user's emotion, read on the assistant's tokens",
    "felt": "the emotion a speaker feels but does not show",
    "displayed": "the emotion a speaker shows while feeling another",
}
