"""Who may talk to the server: loopback by default, and an API key for anything wider.

The key is checked on every route, in constant time (``hmac.compare_digest``). API clients send
it as a bearer token; a browser opening the dashboard gets the standard password prompt and may
type the key as the password (HTTP Basic), after which it sends the key with every request of
the page by itself.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from emoscope.errors import EmoscopeError
from emoscope.server.errors import error_body

API_KEY_ENV = "EMOSCOPE_API_KEY"


def is_loopback(host: str) -> bool:
    """True for addresses that only this machine can reach."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key."""
    if not is_loopback(host) and not api_key:
        raise EmoscopeError(
            f"Listening on {host} would let other machines use the model and read the "
            f"conversation log; set an API key with --api-key or {API_KEY_ENV} (or keep the "
            "default host 127.0.0.1)."
        )
    if api_key is not None and not api_key.strip():
        raise EmoscopeError("The API key is empty.")


def presented_key(authorization: str | None) -> str | None:
    """The key in an ``Authorization`` header: a bearer token, or the Basic password."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == "bearer":
        return value
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]
    return None


def key_matches(presented: str | None, expected: str) -> bool:
    given = (presented or "").encode("utf-8")
    return hmac.compare_digest(given, expected.encode("utf-8"))


class APIKeyMiddleware:
    """Answer 401 to any HTTP request without the key, before any route runs."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        if key_matches(presented_key(authorization), self.api_key):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        missing = not authorization
        message = (
            "Missing API key: send it as 'Authorization: Bearer KEY'."
            if missing
            else "Wrong API key."
        )
        body = json.dumps(error_body(message, "invalid_request_error", None, "invalid_api_key"))
        api = str(scope.get("path", "")).startswith("/v1/")
        challenge = 'Bearer realm="emoscope"' if api else 'Basic realm="emoscope"'
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", challenge.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})
