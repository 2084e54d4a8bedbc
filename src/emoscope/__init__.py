"""emoscope: find, measure, watch and steer emotion concepts inside causal language models.

The public API is importable from here; heavy modules (torch, transformers) load on first use.
No public name is also the name of a submodule, so importing a submodule can never replace a
function or class reached as ``emoscope.NAME``.

Example:
    >>> import emoscope as es
    >>> lm = es.load_model()
    >>> bank = es.EmotionBank.load("runs/demo", model=lm)
    >>> es.Monitor(lm, bank).score("My dog died this morning.").strongest(3)
"""

from __future__ import annotations

import warnings
from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

if TYPE_CHECKING:  # what editors and type checkers see; at run time these load lazily
    from emoscope.concepts import EMOTIONS, emotion_table, human_norms  # noqa: F401
    from emoscope.engine import Engine, Request  # noqa: F401
    from emoscope.errors import EmoscopeError  # noqa: F401
    from emoscope.experiments import list_experiments, run_experiment  # noqa: F401
    from emoscope.export import export_emotions, read_control_vector  # noqa: F401
    from emoscope.generation import SamplingConfig  # noqa: F401
    from emoscope.hooks import ResidualReader, add_to_residual  # noqa: F401
    from emoscope.models import LoadedModel, load_model, wrap_model  # noqa: F401
    from emoscope.monitor import AlertRule, Monitor, Readout  # noqa: F401
    from emoscope.pipeline import ExtractConfig, extract  # noqa: F401
    from emoscope.readouts import UserReader  # noqa: F401
    from emoscope.steer import Steerer, Steering  # noqa: F401
    from emoscope.vectors import EmotionBank, Recipe  # noqa: F401

_EXPORTS = {
    "EMOTIONS": "emoscope.concepts",
    "emotion_table": "emoscope.concepts",
    "human_norms": "emoscope.concepts",
    "load_model": "emoscope.models",
    "wrap_model": "emoscope.models",
    "LoadedModel": "emoscope.models",
    "EmotionBank": "emoscope.vectors",
    "Recipe": "emoscope.vectors",
    "Monitor": "emoscope.monitor",
    "AlertRule": "emoscope.monitor",
    "Readout": "emoscope.monitor",
    "Steerer": "emoscope.steer",
    "Steering": "emoscope.steer",
    "SamplingConfig": "emoscope.generation",
    "Engine": "emoscope.engine",
    "Request": "emoscope.engine",
    "ExtractConfig": "emoscope.pipeline",
    "extract": "emoscope.pipeline",
    "UserReader": "emoscope.readouts",
    "ResidualReader": "emoscope.hooks",
    "add_to_residual": "emoscope.hooks",
    "export_emotions": "emoscope.export",
    "read_control_vector": "emoscope.export",
    "EmoscopeError": "emoscope.errors",
    "run_experiment": "emoscope.experiments",
    "list_experiments": "emoscope.experiments",
}
_DEPRECATED = {"EmotionVectors": ("EmotionBank", "emoscope.vectors")}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _DEPRECATED:
        new, module = _DEPRECATED[name]
        warnings.warn(f"emoscope.{name} is now emoscope.{new}", DeprecationWarning, stacklevel=2)
        return getattr(import_module(module), new)
    raise AttributeError(f"module 'emoscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
