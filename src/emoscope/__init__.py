"""emoscope: find, measure, watch and steer emotion concepts inside causal language models."""

from __future__ import annotations

__version__ = "0.1.0"
