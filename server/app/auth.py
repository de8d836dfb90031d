"""Request guards: API keys, the request size limit, CORS.

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

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.app.errors import APIError, error_response
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


class PayloadTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")


class _TooLargeHTTP(StarletteHTTPException):
    # FastAPI turns any exception raised while reading the body into a 400,
    # except HTTPException, which it re-raises: so the oversize signal is one.
    def __init__(self, limit: int):
        super().__init__(413, f"Request body exceeds the limit of {limit} bytes.")


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over ``limit`` bytes, by header or as they stream in."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(PayloadTooLarge(self.limit))(scope, receive, send)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLargeHTTP(self.limit)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLargeHTTP:
            if started:
                raise
            await error_response(PayloadTooLarge(self.limit))(scope, receive, send)




def install_guards(app: FastAPI, settings: Settings) -> None:
    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
