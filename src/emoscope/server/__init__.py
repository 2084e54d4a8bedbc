"""``emoscope serve``: an OpenAI-compatible chat server with per-token emotion telemetry,
steering, alerts and a conversation log, plus the dashboard.

The web part needs the optional extra (``pip install 'emoscope[serve]'``); the log
(:mod:`emoscope.server.db`) reads without it.

Example:
    >>> from emoscope.server import create_app
    >>> app = create_app(lm, bank, "emoscope.db")     # a FastAPI app; run it with uvicorn
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from emoscope.errors import MissingPackageError

if TYPE_CHECKING:
    from emoscope.server.app import create_app, serve
    from emoscope.server.limits import ServerLimits

__all__ = ["ServerLimits", "create_app", "require_server_packages", "serve"]


def require_server_packages() -> None:
    """Fail with the install command when the ``serve`` extra is missing."""
    for package in ("fastapi", "uvicorn"):
        if importlib.util.find_spec(package) is None:
            raise MissingPackageError(
                f"The server needs the package '{package}'. Install it with: "
                "pip install 'emoscope[serve]'"
            )


def __getattr__(name: str) -> Any:
    if name in ("create_app", "serve"):
        require_server_packages()
        from emoscope.server import app

        return getattr(app, name)
    if name == "ServerLimits":
        from emoscope.server.limits import ServerLimits

        return ServerLimits
    raise AttributeError(f"module 'emoscope.server' has no attribute {name!r}")
