"""ASGI middleware: browser access (Host and Origin checks), the request size limit, JSON body checks
(encoding, nesting), CORS, and per-request metrics and access log."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.websockets import WebSocketClose

from server.app.errors import APIError, error_response
from server.config import Settings
from server.json_depth import MAX_JSON_DEPTH, json_too_deep
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


def _json_content(headers: Headers) -> bool:
    """Whether FastAPI would parse this body as JSON: no content type, application/json or application/*+json."""
    content_type = headers.get("content-type")
    if content_type is None:
        return True
    mime = content_type.partition(";")[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


def json_body_problem(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> APIError | None:
    """Why a JSON body is refused before it is parsed: not UTF-8, or nested deeper than ``max_depth``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return APIError(400, f"The request body is not valid UTF-8 (byte {exc.start}); JSON must be UTF-8.",
                        code="invalid_encoding")
    if json_too_deep(text, max_depth):
        return APIError(400, f"The request body's JSON is nested deeper than {max_depth} levels.",
                        code="invalid_json")
    return None


class JSONBodyCheck:
    """ASGI middleware: a JSON request body must be UTF-8 and nested at most ``max_depth`` levels.

    The body is read whole (handlers read JSON bodies whole anyway), scanned, and handed on unchanged;
    a bad one gets a 400 before ``json.loads``, whose recursion a deep document exhausts. Large bodies
    are scanned in a worker thread so the event loop keeps serving.
    """

    THREAD_ABOVE = 256 * 1024  # bytes

    def __init__(self, app, max_depth: int = MAX_JSON_DEPTH):
        self.app = app
        self.max_depth = max_depth

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS")
                or not _json_content(Headers(scope=scope))):
            return await self.app(scope, receive, send)
        chunks, last = [], None
        while True:
            last = await receive()
            if last["type"] != "http.request":
                break
            chunks.append(last.get("body", b""))
            if not last.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and last["type"] == "http.request":
            if len(body) > self.THREAD_ABOVE:
                problem = await asyncio.to_thread(json_body_problem, body, self.max_depth)
            else:
                problem = json_body_problem(body, self.max_depth)
            if problem is not None:
                return await error_response(problem)(scope, receive, send)
        pending = [{"type": "http.request", "body": body, "more_body": last["type"] != "http.request"}]
        if last["type"] != "http.request":
            pending.append(last)  # the client left while sending: the app sees that after the body

        async def replay():
            return pending.pop(0) if pending else await receive()

        await self.app(scope, replay, send)


# Without API keys the server binds to loopback, and any web page the user opens could otherwise reach it:
# a foreign Origin is refused (cross-site requests and websockets), and so is a foreign Host (DNS
# rebinding: a page whose own name resolves to 127.0.0.1 is same-origin with the server).
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(value: str) -> str:
    """The name in a Host header or URL authority: ``"Example.COM:8000"`` -> ``"example.com"``,
    ``"[::1]:8000"`` -> ``"::1"``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def is_loopback(name: str) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):  # *.localhost never leaves the machine
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class BrowserGuard:
    """ASGI middleware: Host and Origin checks for HTTP requests and websocket upgrades.

    - Without API keys: the Host must name this machine (a loopback name, ``--host`` or
      ``--allowed-hosts``), and an Origin, when the client sends one (browsers do), must be a loopback
      origin, an allowed one (``--allowed-origins``, ``--cors-origins``) or the Host itself. HTTP gets 403
      ``host_not_allowed`` / ``origin_not_allowed``.
    - With API keys the key check guards HTTP; websocket upgrades still need an allowed Origin.
    - A refused websocket is closed before it is accepted (code 1008; the HTTP upgrade answers 403).

    Clients that send no Origin (the Python client, the VS Code extension, curl) are not affected.
    """

    def __init__(self, app, settings: Settings):
        self.app = app
        self.keyless = not settings.api_keys
        self.origins = frozenset(settings.allowed_origins) | {o.lower().rstrip("/") for o in settings.cors_origins}
        self.hosts = LOOPBACK_NAMES | {host_name(settings.host)} | {host_name(h) for h in settings.allowed_hosts}

    def host_allowed(self, host: str) -> bool:
        name = host_name(host)
        return name in self.hosts or is_loopback(name)

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        origin = origin.strip().lower().rstrip("/")
        if origin in self.origins or "*" in self.origins:
            return True
        try:
            parts = urlsplit(origin)
            name = parts.hostname
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not name:
            return False
        # Same origin as the address the request was sent to (a page this server served, e.g. /dashboard).
        return is_loopback(name) or (host is not None and parts.netloc == host.strip().lower())

    def refusal(self, scope) -> tuple[str, str] | None:
        headers = Headers(scope=scope)
        host, origin = headers.get("host"), headers.get("origin")
        if self.keyless and host is not None and not self.host_allowed(host):
            message = (f"Host {host!r} is not served: without API keys only localhost, 127.0.0.1, [::1], --host "
                       "and --allowed-hosts are (DNS rebinding protection; docs/api.md, Browser access).")
            return "host_not_allowed", message
        if origin is not None and (self.keyless or scope["type"] == "websocket") \
                and not self.origin_allowed(origin, host):
            message = (f"Origin {origin!r} may not use this server; allow it with --allowed-origins "
                       "(docs/api.md, Browser access).")
            return "origin_not_allowed", message
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        refused = self.refusal(scope)
        if refused is None:
            return await self.app(scope, receive, send)
        code, message = refused
        log_event("request_refused", type=scope["type"], path=scope["path"], reason=code)
        if scope["type"] == "websocket":
            return await WebSocketClose(code=1008, reason=code)(scope, receive, send)
        await error_response(APIError(403, message, code=code))(scope, receive, send)


def install_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    # add_middleware wraps: the last added runs first. Order of a request: metrics, browser guard, CORS,
    # size limit, JSON body check, the app.
    app.add_middleware(JSONBodyCheck)
    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    # Before CORS: a refused origin gets no preflight answer either.
    app.add_middleware(BrowserGuard, settings=settings)
    # Outermost, so rejected (403, 413) requests are timed and logged too.
    app.add_middleware(RequestMetrics, metrics=metrics)
