"""The bounds that keep one shared engine answering: every request is checked against them
before it reaches the engine, so a single client cannot exhaust memory or starve the others."""

from __future__ import annotations

from dataclasses import dataclass

from emoscope.errors import EmoscopeError


@dataclass(frozen=True)
class ServerLimits:
    """What one server accepts.

    Args:
        max_batch: requests generating at once (the engine's KV-cache slots).
        max_queue: requests allowed to wait for a slot; one more is answered 429.
        context_tokens: cache length of one slot: prompt plus reply must fit in it.
        max_new_tokens: the largest ``max_tokens`` a request may ask for.
        default_new_tokens: ``max_tokens`` of a request that names none.
        max_body_bytes: the largest request body read.
        max_strength: the largest absolute steering strength per emotion (units of the
            layer's average residual norm).
        max_alert_rules: alert rules per request.
        max_stop: stop strings per request (OpenAI allows four).
    """

    max_batch: int = 8
    max_queue: int = 32
    context_tokens: int = 2048
    max_new_tokens: int = 512
    default_new_tokens: int = 256
    max_body_bytes: int = 1 << 20
    max_strength: float = 1.0
    max_alert_rules: int = 16
    max_stop: int = 4

    def __post_init__(self) -> None:
        whole = {
            "max_batch": self.max_batch,
            "context_tokens": self.context_tokens,
            "max_new_tokens": self.max_new_tokens,
            "default_new_tokens": self.default_new_tokens,
            "max_body_bytes": self.max_body_bytes,
        }
        for name, value in whole.items():
            if value < 1:
                raise EmoscopeError(f"{name} must be >= 1 (got {value}).")
        if self.max_queue < 0 or self.max_alert_rules < 0 or self.max_stop < 0:
            raise EmoscopeError("max_queue, max_alert_rules and max_stop must be >= 0.")
        if self.context_tokens < 2:
            raise EmoscopeError("context_tokens must be >= 2 (a prompt token and a reply token).")
        if not self.max_strength > 0:
            raise EmoscopeError(f"max_strength must be > 0 (got {self.max_strength}).")

    @property
    def max_in_flight(self) -> int:
        """Requests running or waiting at once; beyond this the server answers 429."""
        return self.max_batch + self.max_queue
