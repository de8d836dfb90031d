"""One server address for both transports: users type the HTTP URL they see in
the server's log; the websocket URL is derived from it."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

DEFAULT_SERVER = "http://127.0.0.1:8000"
WS_PATH = "/v1/ws"


def http_base(url: str) -> str:
    parts = urlsplit(url if "://" in url else "http://" + url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    for suffix in (WS_PATH, "/v1"):
        path = path.removesuffix(suffix)
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def ws_url(url: str) -> str:
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme in ("ws", "wss") and parts.path.rstrip("/").endswith(WS_PATH):
        return url
    base = urlsplit(http_base(url))
    scheme = "wss" if base.scheme == "https" else "ws"
    return urlunsplit((scheme, base.netloc, base.path + WS_PATH, "", ""))
