"""Norm-calibrated steering with emotion vectors.

The vector added at layer ``l`` is ``s * (average residual norm at l) * unit_vector``, so a
strength ``s`` means the same thing on every model and layer, in the paper's units: about 0.5 for
a few tokens, about 0.05-0.1 throughout a long rollout. The average norm is measured on the
neutral corpus when the bank is built and stored with it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import torch

from emoscope.batching import Batch
from emoscope.engine import Request, engine_for, row_sampling
from emoscope.errors import EmoscopeError, UnsupportedArchitectureError
from emoscope.generation import SamplingConfig, decode_rows
from emoscope.hooks import (
    PassTracker,
    PositionRule,
    add_to_residual,
    all_positions,
    positions_before,
    positions_from,
)
from emoscope.vectors import EmotionBank

MAX_STRENGTH = 2.0
POSITIONS = ("all", "prompt", "response")


@dataclass(frozen=True)
class Steering:
    """What to add: emotions with strengths, at which layers and token positions.

    Args:
        emotions: ``{"happy": 0.3, "calm": -0.1}``; strengths in units of the layer's average
            residual norm.
        layers: one layer (``19``) or a band (``[17, 18, 19]``); ``None`` means the bank's
            steering layer (:attr:`EmotionBank.steer_layer`), the one default every caller uses.
        positions: ``all``, ``prompt``, ``response`` or ``(start, end)``, a span of token
            indices counted from each sequence's first token (prompt and reply together).
        force: allow strengths above 2.0, which usually destroy coherence.
    """

    emotions: Mapping[str, float]
    _: KW_ONLY
    layers: int | Sequence[int] | None = None
    positions: str | tuple[int, int] = "all"
    force: bool = False
    extra: Mapping[int, torch.Tensor] = field(default_factory=dict)
    """Raw vectors by layer added as they are (e.g. imported control vectors)."""

    def __post_init__(self) -> None:
        if isinstance(self.layers, int):
            object.__setattr__(self, "layers", (self.layers,))
        elif self.layers is not None:
            layers = tuple(self.layers)
            if not layers or not all(isinstance(x, int) for x in layers):
                raise EmoscopeError(
                    f"layers must be a layer number, a non-empty list of them, or None (got {self.layers!r})."
                )
            object.__setattr__(self, "layers", layers)
        for emotion, strength in self.emotions.items():
            if not isinstance(strength, int | float) or strength != strength:
                raise EmoscopeError(
                    f"Strength for '{emotion}' must be a number (got {strength!r})."
                )
            if abs(strength) > MAX_STRENGTH and not self.force:
                raise EmoscopeError(
                    f"Strength {strength} for '{emotion}' is outside the sane range "
                    f"[-{MAX_STRENGTH}, {MAX_STRENGTH}] (units of the residual norm); pass force=True "
                    "(--force) if you really want it."
                )
        if isinstance(self.positions, str) and self.positions not in POSITIONS:
            raise EmoscopeError(
                f"positions must be one of {', '.join(POSITIONS)} or a (start, end) span."
            )
        if not isinstance(self.positions, str):
            start, end = self.positions
            if not 0 <= start < end:
                raise EmoscopeError(f"Token span {self.positions} must satisfy 0 <= start < end.")


def steering_layers(bank: EmotionBank, steering: Steering) -> list[int]:
    """The layers a steering acts on: its own, or the bank's one default steering layer."""
    if steering.layers is None:
        return [bank.steer_layer]
    return list(steering.layers)  # type: ignore[arg-type]


def steering_vectors(bank: EmotionBank, steering: Steering) -> dict[int, torch.Tensor]:
    """``{layer: vector}``: the sum over emotions of strength x residual norm x unit vector."""
    # Only ready-made vectors: nothing to add at the emotion layers (not even zeros).
    chosen = steering_layers(bank, steering) if steering.emotions else []
    layers = [bank.check_layer(layer) for layer in chosen]
    out: dict[int, torch.Tensor] = {}
    for layer in layers:
        total = torch.zeros(bank.hidden_size)
        for emotion, strength in steering.emotions.items():
            total += float(strength) * bank.residual_norm(layer) * bank.vector(emotion, layer)
        out[layer] = total
    for layer, vector in steering.extra.items():
        out[layer] = out.get(layer, torch.zeros(vector.shape[-1])) + vector.float()
    return out


def span_rule(start: int, end: int, padding: torch.Tensor) -> PositionRule:
    """Token indices ``start <= i < end`` of every row, counted from its first real token."""

    def rule(first: int, length: int, device: torch.device) -> torch.Tensor | None:
        index = torch.arange(first, first + length, device=device).unsqueeze(0) - padding.to(
            device
        ).unsqueeze(1)
        weight = ((index >= start) & (index < end)).float()
        return weight if bool(weight.any()) else None

    return rule


def position_rule(positions: str | tuple[int, int], batch: Batch) -> PositionRule:
    if positions == "all":
        return all_positions
    if positions == "prompt":
        return positions_before(batch.width)
    if positions == "response":
        return positions_from(batch.width)
    start, end = positions  # type: ignore[misc]
    return span_rule(start, end, batch.padding)


class Steerer:
    """Apply a bank's emotion vectors to its model.

    Example:
        >>> steerer = Steerer(lm, bank)
        >>> steerer.generate(["Tell me about your day."], steering=Steering({"happy": 0.3}))
    """

    def __init__(self, lm: Any, bank: EmotionBank, *, allow_other_model: bool = False) -> None:
        bank.check_model(lm, allow_other_model)
        self.lm, self.bank = lm, bank

    @contextmanager
    def apply(
        self, steering: Steering | None, batch: Batch | None = None
    ) -> Iterator[PassTracker | None]:
        """Hooks that add the steering vectors while the block runs (removed on exit).

        ``batch`` is needed for ``prompt``, ``response`` and span positions (it fixes the prompt
        width and each row's padding). ``steering=None`` adds nothing, so callers need no branch.
        """
        if steering is None:
            yield None
            return
        if steering.positions != "all" and batch is None:
            raise EmoscopeError(
                "Steering by prompt/response/span positions needs the batch being run."
            )
        rule = all_positions if batch is None else position_rule(steering.positions, batch)
        vectors = steering_vectors(self.bank, steering)
        with add_to_residual(self.lm.model, self.lm.adapter, vectors, rule) as tracker:
            yield tracker

    def encode(self, prompts: Sequence[str], chat: bool = True) -> Batch:
        return self.lm.encode_prompts(prompts, chat)

    def generate_rows(
        self,
        batch: Batch,
        *,
        steering: Steering | None = None,
        sampling: SamplingConfig | None = None,
    ) -> list[list[int]]:
        """Generated ids of an already-encoded batch, steered (or plain with ``None``).

        Runs on the continuous-batching :class:`~emoscope.engine.Engine`; a model the engine
        cannot drive falls back to the static decoding loop with the same results.
        """
        sampling = sampling or SamplingConfig()
        prompts = batch.rows()
        try:
            engine = engine_for(
                self.lm, prompts, sampling.max_new_tokens, bank=self.bank, allow_other_model=True
            )
        except UnsupportedArchitectureError:
            with self.apply(steering, batch):
                return decode_rows(self.lm, batch, sampling)
        with engine:
            handles = engine.generate(
                [
                    Request(ids, row_sampling(sampling, row), chat=False, steering=steering)
                    for row, ids in enumerate(prompts)
                ]
            )
        return [handle.tokens for handle in handles]

    def generate(
        self,
        prompts: Sequence[str],
        *,
        steering: Steering | None = None,
        sampling: SamplingConfig | None = None,
        chat: bool = True,
    ) -> list[str]:
        """Steered (or, with ``steering=None``, plain) batched generation; returns the replies."""
        rows = self.generate_rows(self.encode(prompts, chat), steering=steering, sampling=sampling)
        return [self.lm.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
