"""ASGI middleware: the request size limit, CORS, and per-request metrics and access log."""

from __future__ import annotations

import time

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.app.errors import APIError, error_response
from server.config import Settings
from server.observability.metrics import Metrics, log_event


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



class RequestMetrics:
    """ASGI middleware: latency histogram per route template, and one access log line per request."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def tracking_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            # Route templates keep the label set bounded; unmatched paths share one label.
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.request_latency.labels(endpoint, scope["method"], str(status)).observe(elapsed)
            log_event("request", method=scope["method"], path=scope["path"], status=status,
                      duration_ms=round(elapsed * 1000, 1))


def install_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    # Outermost, so rejected (413) requests are timed and logged too.
    app.add_middleware(RequestMetrics, metrics=metrics)
