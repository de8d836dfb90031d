"""API keys.

API keys come from the settings. With none configured auth is off (the CLI
then binds to localhost only). ``check_api_key`` is shared with the websocket
layer; HTTP routes use the ``require_api_key`` dependency (``Authorization:
Bearer KEY``).

The key identity handed to the adapter resolver is a short hash of the key,
never the key itself, so it can go into logs and adapter ownership records.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from server.app.errors import APIError
from server.config import Settings


class AuthError(APIError):
    def __init__(self, message: str, code: str):
        super().__init__(401, message, code=code, headers={"WWW-Authenticate": "Bearer"})


def key_identity(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def check_api_key(settings: Settings, key: str | None) -> str | None:
    """The identity of ``key``, None when auth is off; raises ``AuthError`` otherwise."""
    if not settings.api_keys:
        return None
    if not key:
        raise AuthError("You didn't provide an API key (Authorization: Bearer KEY).", "missing_api_key")
    # Compare against every key in constant time so timing does not reveal a prefix.
    matched = False
    for known in settings.api_keys:
        matched |= hmac.compare_digest(known.encode(), key.encode())
    if not matched:
        raise AuthError("Incorrect API key provided.", "invalid_api_key")
    return key_identity(key)


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def require_api_key(request: Request) -> str | None:
    """FastAPI dependency: the caller's key identity (None when auth is off)."""
    settings = request.app.state.dynarank.settings
    return check_api_key(settings, bearer_token(request.headers.get("authorization")))


