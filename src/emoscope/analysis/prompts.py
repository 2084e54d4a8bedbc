"""Readouts at the start of the assistant turn: implicit-emotion prompts and intensity sweeps.

The paper reads emotion probes at the ``:`` of ``Assistant:``, the last prompt token, which
predicts the emotional content of the reply. Readouts are z-scored per emotion against the same
position on neutral prompts, so an emotion that is always high at that position (the paper notes
"loving") does not win every comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from scipy.stats import spearmanr

from emoscope.activations import positions_readout
from emoscope.files import atomic_save_tensors


def assistant_start_readouts(
    lm: Any, user_messages: Sequence[str], layers: Sequence[int] | None = None, style: str = "auto"
) -> torch.Tensor:
    """``[messages, layers, hidden]`` residual at the last prompt token of each single-turn chat."""
    chats = [lm.chat([{"role": "user", "content": m}], style=style) for m in user_messages]
    positions = [c.token_positions(lm.tokenizer)["assistant_colon"] for c in chats]
    add_special = chats[0].add_special_tokens if chats else False
    return positions_readout(
        lm, [c.text for c in chats], positions, layers, add_special_tokens=add_special
    )


@dataclass
class PromptReadouts:
    """Residuals at the start of the assistant turn, each ``[prompts, layers, hidden]``.

    ``neutral`` calibrates the z-scores, ``implicit`` and ``intensity`` are the prompts of the
    evaluation set (see :func:`prompt_readouts`).
    """

    layers: list[int]
    neutral: torch.Tensor
    implicit: torch.Tensor
    intensity: torch.Tensor

    def save(self, path: Path) -> None:
        atomic_save_tensors(
            {"neutral": self.neutral, "implicit": self.implicit, "intensity": self.intensity}, path
        )

    @classmethod
    def load(cls, path: Path, layers: Sequence[int]) -> PromptReadouts:
        data = load_file(str(path))
        return cls(list(layers), data["neutral"], data["implicit"], data["intensity"])


def intensity_texts(templates: Sequence[dict[str, Any]]) -> list[str]:
    """Every filled-in intensity prompt, template by template, value by value."""
    return [t["template"].format(value=v) for t in templates for v in t["values"]]


def prompt_readouts(
    lm: Any, neutral_messages: Sequence[str], prompts: dict[str, Any], layers: Sequence[int]
) -> PromptReadouts:
    """Assistant-turn readouts of neutral user messages and of the evaluation prompts."""
    return PromptReadouts(
        list(layers),
        assistant_start_readouts(lm, neutral_messages, layers),
        assistant_start_readouts(lm, [p["text"] for p in prompts["implicit"]], layers),
        assistant_start_readouts(lm, intensity_texts(prompts["intensity"]), layers),
    )


def z_scores(scores: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (scores - mean) / std.clamp(min=1e-6)


def implicit_accuracy(
    scores: torch.Tensor, targets: Sequence[str], labels: Sequence[str]
) -> dict[str, Any]:
    """How often each prompt's target emotion is the highest among the target emotions.

    ``scores``: ``[prompts, len(targets)]`` readouts of the target emotions.
    """
    index = torch.tensor([targets.index(label) for label in labels])
    winner = scores.argmax(dim=1)
    matrix = np.zeros((len(targets), len(targets)))
    for row, target in enumerate(index.tolist()):
        matrix[target] += scores[row].numpy() / max(1, labels.count(targets[target]))
    return {
        "accuracy": float((winner == index).float().mean()),
        "correct": int((winner == index).sum()),
        "n": len(labels),
        "per_prompt": [
            {
                "target": labels[i],
                "top": targets[int(winner[i])],
                "rank": int((scores[i] > scores[i, index[i]]).sum()) + 1,
            }
            for i in range(len(labels))
        ],
        "mean_matrix": matrix.tolist(),
    }


def intensity_trend(
    values: Sequence[float], readouts: Sequence[float], expected: str
) -> dict[str, Any]:
    rho, p = spearmanr(values, readouts)
    rho = float(rho) if rho == rho else 0.0
    holds = rho > 0 if expected == "increase" else rho < 0
    return {
        "rho": rho,
        "p": float(p) if p == p else 1.0,
        "expected": expected,
        "holds": bool(holds),
        "readouts": [float(r) for r in readouts],
    }


SITES = ("assistant_colon", "user_mean")
"""Where a chat is read: the last prompt token (the ``:`` of ``Assistant:``), or the mean over
the user's message tokens."""


def user_turn_means(
    lm: Any, user_messages: Sequence[str], layers: Sequence[int], progress: bool = False
) -> torch.Tensor:
    """``[messages, layers, hidden]`` residual averaged over each user message's own tokens
    (the template around it left out), in a single-turn chat."""
    from emoscope.corpus.dialogues import SpeakerTurn, render
    from emoscope.speakers import speaker_means

    rendered = [render(lm, [SpeakerTurn("A", m)], "chat") for m in user_messages]
    means = speaker_means(
        lm, rendered, layers, speakers=("A",), progress=progress, desc="user-turn readouts"
    )
    return means[:, 0]


@dataclass
class ChatSites:
    """Implicit prompts read at both chat sites, with the neutral prompts that calibrate them.

    Each tensor is ``[prompts, layers, hidden]``. ``train`` prompts choose the chat readout;
    ``test`` prompts (the evaluation set) report it.
    """

    layers: list[int]
    neutral_colon: torch.Tensor
    neutral_user: torch.Tensor
    test_colon: torch.Tensor
    test_user: torch.Tensor
    train_colon: torch.Tensor
    train_user: torch.Tensor

    def states(self, split: str, site: str) -> torch.Tensor:
        return getattr(self, f"{split}_{'colon' if site == 'assistant_colon' else 'user'}")

    def save(self, path: Path) -> None:
        names = ("neutral_user", "test_user", "train_colon", "train_user")
        atomic_save_tensors({n: getattr(self, n) for n in names}, path)

    @classmethod
    def load(cls, path: Path, readouts: PromptReadouts) -> ChatSites:
        data = load_file(str(path))
        return cls(
            readouts.layers,
            readouts.neutral,
            data["neutral_user"],
            readouts.implicit,
            data["test_user"],
            data["train_colon"],
            data["train_user"],
        )


def chat_site_readouts(
    lm: Any,
    readouts: PromptReadouts,
    neutral_messages: Sequence[str],
    test_messages: Sequence[str],
    train_messages: Sequence[str],
    progress: bool = True,
) -> ChatSites:
    """The user-turn means of the neutral and implicit prompts, and the assistant-colon
    readouts of the training prompts (the rest is in ``readouts``)."""
    layers = readouts.layers
    return ChatSites(
        layers,
        readouts.neutral,
        user_turn_means(lm, neutral_messages, layers, progress),
        readouts.implicit,
        user_turn_means(lm, test_messages, layers, progress),
        assistant_start_readouts(lm, train_messages, layers),
        user_turn_means(lm, train_messages, layers, progress),
    )
