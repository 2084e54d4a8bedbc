"""Per-token telemetry of one reply: text piece, z-scores, strongest emotions and alerts.

Built on the engine's thread, the only thread that touches the tokenizer, from each
:class:`~emoscope.engine.TokenEvent`; what reaches the web handlers is plain JSON-ready data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from emoscope.engine import TokenEvent
from emoscope.monitor import AlertRule, AlertTracker, IncrementalDecoder

DECIMALS = 4


def number(value: float) -> float | None:
    """A score as JSON carries it: rounded, and ``None`` where undefined (attention sinks)."""
    return round(value, DECIMALS) if math.isfinite(value) else None


def strongest(names: Sequence[str], values: Sequence[float], k: int) -> list[list[Any]]:
    """The ``k`` highest ``[name, value]`` pairs, undefined values left out."""
    ranked = sorted(
        ((v, n) for n, v in zip(names, values) if math.isfinite(v)), key=lambda p: -p[0]
    )
    return [[n, round(v, DECIMALS)] for v, n in ranked[:k]]


@dataclass(frozen=True)
class TokenUpdate:
    """One reply token as the API reports it."""

    index: int
    token_id: int
    text: str
    scores: dict[str, float | None]
    top: list[list[Any]]
    alerts: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    reason: str | None = None

    def entry(self) -> dict[str, Any]:
        """The token's ``emoscope.tokens`` entry."""
        return {"index": self.index, "text": self.text, "scores": self.scores, "top": self.top}

    def record(self) -> dict[str, Any]:
        """The token as the log stores it."""
        return {**self.entry(), "token_id": self.token_id}


class ReplyReader:
    """Reads one request's token events into :class:`TokenUpdate` objects.

    The engine reads every bank emotion when ``top_k > 0`` (the strongest ones need them all),
    else only the reported ones, else nothing: :attr:`monitored` is what to ask it for.
    """

    def __init__(
        self,
        tokenizer: Any,
        bank_emotions: Sequence[str],
        emotions: Sequence[str],
        top_k: int,
        rules: Sequence[AlertRule] = (),
    ) -> None:
        self.emotions, self.top_k = list(emotions), top_k
        names = list(bank_emotions) if top_k > 0 else self.emotions
        self.monitored: list[int] | None = (
            [list(bank_emotions).index(n) for n in names] if names else None
        )
        self._names = names
        self._columns = [names.index(e) for e in self.emotions]
        self._tracker = AlertTracker(rules, self.emotions, 1) if rules else None
        self._decoder = IncrementalDecoder(tokenizer)
        self._tokenizer = tokenizer

    def read(self, event: TokenEvent) -> TokenUpdate:
        text = self._decoder.push(event.token_id)
        if event.finished:
            text += self._rest()
        values = event.z if event.z is not None else event.scores
        scores: dict[str, float | None] = {}
        top: list[list[Any]] = []
        alerts: list[dict[str, Any]] = []
        if values is not None:
            row = values.float().tolist()
            scores = {e: number(row[c]) for e, c in zip(self.emotions, self._columns)}
            if self.top_k and not event.sink:
                top = strongest(self._names, row, self.top_k)
            if self._tracker is not None and event.z is not None:
                z = event.z[self._columns].unsqueeze(0)
                fired = self._tracker.update(z, event.index, torch.ones(1, dtype=torch.bool))
                alerts = [
                    {
                        "rule": alert.rule,
                        "emotion": alert.emotion,
                        "value": round(alert.value, DECIMALS),
                        "token_index": event.index,
                        "time": alert.time,
                    }
                    for alert in fired
                ]
        return TokenUpdate(
            event.index,
            event.token_id,
            text,
            scores,
            top,
            alerts,
            event.finished,
            event.reason,
        )

    def _rest(self) -> str:
        """Text the decoder held back (an unfinished character) once the reply has ended."""
        decoder = self._decoder
        full = self._tokenizer.decode(decoder.ids, skip_special_tokens=True)
        rest, decoder.text = full[len(decoder.text) :], full
        return rest
