"""Slow clients (slowloris): a request that does not arrive whole within ``--read-timeout-s`` of its first
byte (or of connecting) loses its connection, whether its headers or its body are late, while /health
keeps answering other clients (server/app/http_protocol.py)."""

from __future__ import annotations

import selectors
import socket
import time

import httpx
import pytest

from server.cli import transport_options
from server.config import Settings
from tests.session_server import served

TIMEOUT_S = 2.0
PATIENCE_S = 60.0  # generous: the machine may be busy; the server must close them long before this

HEADERS = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="module")
def server(tiny_dir):
    out = yield from served(tiny_dir, ["--read-timeout-s", str(TIMEOUT_S)])
    assert "event=read_timeout" in out


class Slow:
    """One raw connection that sends ``head`` at once, then ``tail`` one byte per tick."""

    def __init__(self, port: int, head: bytes, tail: bytes):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.tail = tail
        self.opened = time.monotonic()
        self.closed_after: float | None = None
        if head:
            self.sock.sendall(head)

    def tick(self) -> None:
        if self.closed_after is None and self.tail:
            try:
                self.sock.send(self.tail[:1])
                self.tail = self.tail[1:]
            except OSError:  # the server closed it
                self.closed()

    def readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.closed()

    def closed(self) -> None:
        if self.closed_after is None:
            self.closed_after = time.monotonic() - self.opened


def test_slow_requests_are_cut_off_and_health_keeps_answering(server):
    slow = []
    for _ in range(10):
        slow += [
            Slow(server.port, b"", b""),  # connects, sends nothing
            Slow(server.port, b"", HEADERS + b"Content-Length: 2\r\n\r\n{}"),  # headers a byte at a time
            Slow(server.port, HEADERS + b"Content-Length: 1000\r\n\r\n", b'{"prompt": ' + b" " * 990),  # slow body
            Slow(server.port, HEADERS + b"Content-Length: 1000\r\n\r\n{", b""),  # a body that never ends
        ]
    selector = selectors.DefaultSelector()
    for s in slow:
        selector.register(s.sock, selectors.EVENT_READ, s)
    deadline = time.monotonic() + PATIENCE_S
    health = 0
    while any(s.closed_after is None for s in slow) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.2):
            key.data.readable()
        for s in slow:
            s.tick()
        r = httpx.get(server.url("/health"), timeout=10)  # another client is served meanwhile
        assert r.status_code == 200
        health += 1
    for s in slow:
        selector.unregister(s.sock)
        s.sock.close()
    open_ones = [s for s in slow if s.closed_after is None]
    assert not open_ones, f"{len(open_ones)} of {len(slow)} slow connections still open after {PATIENCE_S}s"
    # Closed by the deadline, not by anything sooner (each was still sending, or waiting, before it).
    assert min(s.closed_after for s in slow) >= TIMEOUT_S * 0.9
    assert health > 0


def test_a_request_in_time_is_served_and_a_kept_alive_connection_gets_a_new_deadline(server):
    body = b'{"prompt": "def f(", "max_tokens": 1}'
    request = HEADERS + b"Content-Length: %d\r\n\r\n" % len(body) + body
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        for _ in range(2):
            sock.sendall(request[:10])
            time.sleep(TIMEOUT_S * 0.6)  # slow, but within the deadline
            sock.sendall(request[10:])
            response = b""
            while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                assert chunk, f"closed early: {response!r}"
                response += chunk
            assert response.startswith(b"HTTP/1.1 200"), response
            # The second request begins past the first deadline: each request has its own.
            time.sleep(TIMEOUT_S * 0.6)


def test_serve_passes_the_deadline_and_the_websocket_size_to_uvicorn():
    options = transport_options(Settings(model="tiny", read_timeout_s=7.5, max_ws_message_bytes=1000))
    assert options["http"].read_timeout_s == 7.5 and options["ws_max_size"] == 2000
