"""Stop sequences over a stream of text pieces.

A stop sequence may arrive split over several tokens, so text that could be the start of one is
held back until it is clear; the reply ends just before the first stop sequence and never shows
any part of it.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed text pieces in order; get back what may be shown and whether a stop was hit.

    Example:
        >>> matcher = StopMatcher(["\\n\\n"])
        >>> matcher.push("Hello\\n"), matcher.push("\\nmore")
        (('Hello', False), ('', True))
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        text = self.pending + piece
        hits = [text.find(stop) for stop in self.stops if stop in text]
        if hits:
            self.pending = ""
            return text[: min(hits)], True
        hold = max((self._overlap(text, stop) for stop in self.stops), default=0)
        self.pending = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """What was held back, once the reply has ended without a stop."""
        rest, self.pending = self.pending, ""
        return rest

    @staticmethod
    def _overlap(text: str, stop: str) -> int:
        """Length of the longest end of ``text`` that begins ``stop``."""
        for size in range(min(len(text), len(stop) - 1), 0, -1):
            if stop.startswith(text[-size:]):
                return size
        return 0
