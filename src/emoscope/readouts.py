"""Reading a user's message in a chat: the readout chosen on training prompts, ready to use.

A small model carries a user's implied emotion in the user's own tokens before it moves any of
it to the start of its reply, and vectors learnt from dialogue turns may read it better than
story vectors do. ``emoscope extract`` measures every candidate (family x site x layer) on
implicit user messages of a training split and records the best as ``chat_readout`` in the
bank's manifest; :class:`UserReader` applies it (or any other choice) to new messages, z-scored
against neutral prompts at the same site.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from emoscope.analysis.prompts import SITES, assistant_start_readouts, user_turn_means, z_scores
from emoscope.errors import EmoscopeError
from emoscope.vectors import STORY_FAMILY, EmotionBank


@dataclass
class UserReading:
    """One message's z-scores (against neutral prompts) on every emotion of the family."""

    family: str
    site: str
    layer: int
    emotions: list[str]
    z: torch.Tensor

    def strongest(self, k: int = 3) -> list[tuple[str, float]]:
        order = torch.argsort(self.z, descending=True)[:k].tolist()
        return [(self.emotions[i], float(self.z[i])) for i in order]

    def describe(self) -> str:
        return f"{self.family} vectors, {self.site.replace('_', ' ')}, layer {self.layer}"


class UserReader:
    """Reads a user message with one family at one chat site and layer.

    Defaults come from the bank's ``chat_readout`` (story vectors at the assistant colon and the
    bank's default layer for a bank without one).

    Example:
        >>> reader = UserReader(lm, bank)
        >>> reader.read("My landlord wants me out by Friday and I have nowhere to go.").strongest(3)
    """

    def __init__(
        self,
        lm: Any,
        bank: EmotionBank,
        *,
        family: str | None = None,
        site: str | None = None,
        layer: int | None = None,
        allow_other_model: bool = False,
    ) -> None:
        choice = bank.manifest.get("chat_readout") or {}
        self.family = family or choice.get("family") or STORY_FAMILY
        self.site = site or choice.get("site") or "assistant_colon"
        if self.site not in SITES:
            raise EmoscopeError(f"Unknown chat site '{self.site}' (use {', '.join(SITES)}).")
        bank.check_model(lm, allow_other_model)
        self.view = bank.family(self.family)
        recorded = family is None and site is None and layer is None
        chosen = choice.get("layer") if recorded else layer
        self.layer = self.view.check_layer(chosen)
        prefix = "prompt" if self.site == "assistant_colon" else "user"
        self.mean = self.view.stat(f"{prefix}_score_mean", self.layer)
        self.std = self.view.stat(f"{prefix}_score_std", self.layer)
        self.lm = lm

    @classmethod
    def for_bank(
        cls, lm: Any, bank: EmotionBank, *, allow_other_model: bool = False
    ) -> UserReader | None:
        """The bank's recorded chat readout, or ``None`` for a bank that has none."""
        choice = bank.manifest.get("chat_readout")
        if not choice or (
            choice.get("family") != STORY_FAMILY and choice.get("family") not in bank.families
        ):
            return None
        return cls(lm, bank, allow_other_model=allow_other_model)

    def read(self, message: str) -> UserReading:
        return self.read_many([message])[0]

    def read_many(self, messages: Sequence[str]) -> list[UserReading]:
        if not messages or any(not m.strip() for m in messages):
            raise EmoscopeError("Nothing to read: a user message is empty.")
        read = assistant_start_readouts if self.site == "assistant_colon" else user_turn_means
        states = read(self.lm, list(messages), [self.layer])[:, 0]
        z = z_scores(self.view.scores(states, self.layer), self.mean, self.std)
        return [
            UserReading(self.family, self.site, self.layer, list(self.view.emotions), row)
            for row in z
        ]
