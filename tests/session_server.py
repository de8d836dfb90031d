"""A real dynarank server on a tiny random model, and a protocol-1 websocket client.

Shared by the end-to-end tests under tests/server/app/ and tests/ide_client/.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import websockets

from tests.conftest import build_tiny_model
from tests.helpers import free_port, start_server, stop_server, wait_for_http

FILE_V1 = "def area(width, height):\n    return width * height\n"
FILE_V2 = (
    "def area(width, height):\n    return width * height\n\n\n"
    "def perimeter(width, height):\n    total = 2 * (width + height)\n    return total\n"
)


class Client:
    """A small protocol-1 client over one websocket connection."""

    def __init__(self, ws):
        self.ws = ws
        self.backlog: list[dict] = []

    @classmethod
    async def connect(cls, port: int) -> "Client":
        return cls(await websockets.connect(f"ws://127.0.0.1:{port}/v1/ws", max_size=None, ping_interval=None))

    async def send(self, msg) -> None:
        await self.ws.send(msg if isinstance(msg, (str, bytes)) else json.dumps(msg))

    async def recv(self, timeout: float = 30.0) -> dict:
        if self.backlog:
            return self.backlog.pop(0)
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def wait_for(self, kind: str, timeout: float = 60.0, pred=lambda m: True) -> dict:
        """The next message of `kind` (others are kept for later readers)."""
        deadline = time.monotonic() + timeout
        skipped = []
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {kind} message within {timeout}s; got {skipped[-5:]}")
                msg = json.loads(await asyncio.wait_for(self.ws.recv(), left)) if not self.backlog else self.backlog.pop(0)
                if msg["type"] == kind and pred(msg):
                    return msg
                skipped.append(msg)
        finally:
            self.backlog[:0] = [m for m in skipped if m["type"] != kind]

    async def hello(self, **fields) -> dict:
        await self.send({"type": "hello", "client": {"name": "pytest", "version": "1"}, **fields})
        msg = await self.recv()
        assert msg["type"] == "ready", msg
        return msg

    async def complete(self, cid, **fields) -> tuple[list[str], dict]:
        await self.send({"type": "complete", "id": cid, **fields})
        deltas = []
        while True:
            msg = await self.wait_for_any(("completion.delta", "completion.done", "error"), cid)
            if msg["type"] == "completion.delta":
                deltas.append(msg["text"])
            else:
                return deltas, msg

    async def wait_for_any(self, kinds, cid, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        for i, m in enumerate(self.backlog):
            if m["type"] in kinds and m.get("id", m.get("ref")) == cid:
                return self.backlog.pop(i)
        while True:
            msg = json.loads(await asyncio.wait_for(self.ws.recv(), deadline - time.monotonic()))
            if msg["type"] in kinds and msg.get("id", msg.get("ref")) == cid:
                return msg
            self.backlog.append(msg)

    async def close(self) -> None:
        await self.ws.close()


def run(coro):
    return asyncio.run(coro)


def save_tiny_model(directory: Path, tokenizer) -> Path:
    model = build_tiny_model("llama", len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


class Server:
    def __init__(self, model_dir: Path, data_dir: Path, extra: list[str] = ()):
        self.port = free_port()
        self.model_dir, self.data_dir, self.extra = model_dir, data_dir, list(extra)
        self.proc = None
        self.base = Path(model_dir).name

    def start(self) -> "Server":
        self.port = free_port()
        self.proc = start_server(["--model", str(self.model_dir), "--port", str(self.port),
                                  "--data-dir", str(self.data_dir), *self.extra])
        wait_for_http(f"http://127.0.0.1:{self.port}/health", self.proc)
        return self

    def stop(self) -> str:
        return stop_server(self.proc)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def served(model_dir: Path, extra: list[str] = ()):
    """Body of a module fixture: a started ``Server`` on a fresh data dir, yielded; afterwards it is stopped,
    its data dir removed and its output checked for tracebacks, and that output is returned
    (``out = yield from served(...)``)."""
    data = Path(tempfile.mkdtemp(prefix="dynarank-data-"))
    srv = Server(model_dir, data, extra=extra).start()
    yield srv
    out = srv.stop()
    shutil.rmtree(data, ignore_errors=True)
    assert "Traceback" not in out, out[-3000:]
    return out


async def adapt_once(client: Client, path: str = "geometry.py") -> dict:
    """Open a file, edit it, close it (flushes the burst) and wait for `adapted`."""
    await client.send({"type": "open", "path": path, "text": FILE_V1, "version": 1})
    await client.send({"type": "edit", "path": path, "version": 2, "text": FILE_V2})
    await client.send({"type": "close", "path": path})
    return await client.wait_for("adapted", 60)
