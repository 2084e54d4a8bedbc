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
from typing import Any

import torch
from tqdm.auto import tqdm

from emoscope.batching import from_token_lists, padding_id
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
) -> torch.Tensor:
    """``[dialogues, 2, layers, hidden]``: the mean residual of speaker A's and of speaker B's
    tokens in each rendered dialogue, at every requested layer (float32)."""
    layers = list(range(lm.n_layers)) if layers is None else lm.check_layers(layers)
    ids, weights = [], []
    for item in rendered:
        encoded = lm.tokenizer(item.text, add_special_tokens=item.add_special_tokens)
        ids.append(list(encoded["input_ids"]))
        masks = [speaker_token_mask(lm, item, speaker) for speaker in ("A", "B")]
        if not all(any(mask) for mask in masks):
            raise EmoscopeError("A rendered dialogue has no tokens for one of its speakers.")
        weights.append(torch.tensor(masks, dtype=torch.float32))
    out = torch.zeros(len(rendered), 2, len(layers), lm.hidden_size)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    pad = padding_id(lm.tokenizer)
    current: dict[str, torch.Tensor] = {}

    def transform(_layer: int, hidden: torch.Tensor) -> torch.Tensor:
        w = current["w"].to(hidden.device)
        return torch.einsum("bsw,bwh->bsh", w, hidden.float()) / w.sum(-1, keepdim=True)

    bar = tqdm(total=len(ids), desc="speaker activations", disable=not progress)
    with ResidualReader(
        lm.model, lm.adapter, layers, transform=transform, stop_after_last=True
    ) as reader:
        for start in range(0, len(order), max_batch):
            items = order[start : start + max_batch]
            batch = from_token_lists([ids[i] for i in items], pad, lm.device)
            w = torch.zeros(len(items), 2, batch.width)
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
