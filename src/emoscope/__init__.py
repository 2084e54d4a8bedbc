"""emoscope: find, measure, watch and steer emotion concepts inside causal language models.

The public API is importable from here; heavy modules (torch, transformers) load on first use.

Example:
    >>> import emoscope as es
    >>> lm = es.load_model()
    >>> bank = es.EmotionVectors.load("runs/demo", model=lm)
    >>> es.Monitor(lm, bank).score("My dog died this morning.").top(3)[-1]
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "EMOTIONS": "emoscope.concepts",
    "human_norms": "emoscope.concepts",
    "load_model": "emoscope.models",
    "wrap_model": "emoscope.models",
    "LoadedModel": "emoscope.models",
    "EmotionVectors": "emoscope.vectors",
    "Recipe": "emoscope.vectors",
    "Monitor": "emoscope.monitor",
    "AlertRule": "emoscope.monitor",
    "Readout": "emoscope.monitor",
    "Steerer": "emoscope.steer",
    "Steering": "emoscope.steer",
    "SamplingConfig": "emoscope.generation",
    "ExtractConfig": "emoscope.extract",
    "extract": "emoscope.extract",
    "ResidualReader": "emoscope.hooks",
    "add_to_residual": "emoscope.hooks",
    "export_emotions": "emoscope.export",
    "read_control_vector": "emoscope.export",
    "EmoscopeError": "emoscope.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'emoscope' has no attribute {name!r}")
