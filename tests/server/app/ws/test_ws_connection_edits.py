"""``Connection.on_open`` / ``on_edit`` / ``on_complete`` in process, on a real Session and real Settings
(no model, no socket): the edit limits, and range changes applied off the event loop.

The event-loop checks need no timing: the stand-in for ``apply_range_edits`` blocks until a coroutine on
the loop releases it, which can only happen when it runs in another thread.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import types

import pytest

import code_signals
from server.app.ws.connection import Connection
from server.app.ws.protocol import validate
from server.config import Settings
from server.errors import ClientError
from server.sessions import Session


class FakeSocket:
    def __init__(self):
        self.sent: list[dict] = []

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))


def connection(tmp_path, **limits) -> Connection:
    settings = Settings(model="unused", data_dir=tmp_path, **limits)
    workers = types.SimpleNamespace(wake=lambda: None)
    state = types.SimpleNamespace(settings=settings, services=types.SimpleNamespace(workers=workers))
    conn = Connection(FakeSocket(), state)
    conn.session = Session("s1", None, None, None, types.SimpleNamespace(version=0), token_hashes=[], max_queue=10)
    return conn


def send(conn: Connection, msg: dict) -> None:
    asyncio.run(conn.dispatch(validate(msg)))


def refused(conn: Connection, msg: dict, code: str) -> str:
    with pytest.raises(ClientError) as err:
        send(conn, msg)
    assert err.value.code == code, err.value.message
    return err.value.message


def at(line: int, character: int) -> dict:
    return {"line": line, "character": character}


def insert(line: int, character: int, text: str) -> dict:
    return {"range": {"start": at(line, character), "end": at(line, character)}, "text": text}


def documents(conn: Connection) -> dict:
    return {p: (d.text, d.version) for p, d in conn.session.docs.items()}


def test_too_many_changes_is_refused_before_anything_is_applied(tmp_path, monkeypatch):
    conn = connection(tmp_path, max_edit_changes=3)
    send(conn, {"type": "open", "path": "a.py", "text": "x\n", "version": 1})
    applied = []
    real = code_signals.apply_range_edits
    monkeypatch.setattr(code_signals, "apply_range_edits", lambda t, c: applied.append(c) or real(t, c))
    message = refused(conn, {"type": "edit", "path": "a.py", "version": 2, "changes": [insert(0, 0, "y")] * 4},
                      "too_many_changes")
    assert "3" in message and "full text" in message
    assert applied == [] and documents(conn) == {"a.py": ("x\n", 1)}
    send(conn, {"type": "edit", "path": "a.py", "version": 2, "changes": [insert(0, 0, "y")] * 3})  # at the limit
    assert documents(conn) == {"a.py": ("yyyx\n", 2)}


def test_document_size_is_capped_on_open_and_on_the_text_an_edit_leaves(tmp_path):
    conn = connection(tmp_path, max_document_chars=8)
    refused(conn, {"type": "open", "path": "big.py", "text": "x" * 9, "version": 1}, "document_too_large")
    send(conn, {"type": "open", "path": "a.py", "text": "abc\n", "version": 1, "id": "o"})
    assert conn.ws.sent[-1] == {"type": "ack", "ref": "open", "id": "o", "path": "a.py", "version": 1}
    refused(conn, {"type": "edit", "path": "a.py", "version": 2, "text": "x" * 9}, "document_too_large")
    refused(conn, {"type": "edit", "path": "a.py", "version": 2, "changes": [insert(0, 3, "defgh")]},
            "document_too_large")
    assert documents(conn) == {"a.py": ("abc\n", 1)}  # previous text and version: the next edit builds on them
    send(conn, {"type": "edit", "path": "a.py", "version": 2, "changes": [insert(0, 3, "defg")]})
    assert documents(conn) == {"a.py": ("abcdefg\n", 2)}


def test_open_documents_are_capped(tmp_path):
    conn = connection(tmp_path, max_open_documents=2)
    for path in ("a.py", "b.py"):
        send(conn, {"type": "open", "path": path, "text": "x", "version": 1})
    refused(conn, {"type": "open", "path": "c.py", "text": "x", "version": 1}, "too_many_documents")
    send(conn, {"type": "open", "path": "b.py", "text": "y", "version": 2})  # a re-open replaces, it is no new one
    send(conn, {"type": "close", "path": "a.py"})
    send(conn, {"type": "open", "path": "c.py", "text": "x", "version": 1})
    assert documents(conn) == {"b.py": ("y", 2), "c.py": ("x", 1)}


def test_the_probe_edit_at_the_limit_is_applied_quickly(tmp_path):
    """256 changes at the end of a 500,000-character line: 14 s of frozen server before (70 ms each)."""
    conn = connection(tmp_path)
    assert conn.settings.max_edit_changes == 256
    send(conn, {"type": "open", "path": "long.txt", "text": "x" * 500_000, "version": 1})
    t0 = time.process_time()
    send(conn, {"type": "edit", "path": "long.txt", "version": 2, "id": "e",
                "changes": [insert(0, 500_000 + k, "y") for k in range(256)]})
    assert time.process_time() - t0 < 3.0
    assert documents(conn) == {"long.txt": ("x" * 500_000 + "y" * 256, 2)}
    assert conn.ws.sent[-1]["ref"] == "edit" and conn.ws.sent[-1]["version"] == 2


class Gate:
    """A stand-in for apply_range_edits that waits until the event loop releases it."""

    def __init__(self, then):
        self.started, self.release = threading.Event(), threading.Event()
        self.thread = None
        self.released_in_time = None
        self.then = then

    def __call__(self, text, changes):
        self.thread = threading.get_ident()
        self.started.set()
        self.released_in_time = self.release.wait(20)  # False if the loop could not run (it was this thread)
        return self.then(text, changes)

    async def release_from_the_loop(self, task) -> None:
        assert await asyncio.to_thread(self.started.wait, 20)
        self.release.set()  # runs on the loop while the change is being applied
        await task


def test_range_changes_are_applied_off_the_event_loop(tmp_path, monkeypatch):
    conn = connection(tmp_path)
    send(conn, {"type": "open", "path": "a.py", "text": "x = 1\n", "version": 1})
    gate = Gate(code_signals.apply_range_edits)
    monkeypatch.setattr(code_signals, "apply_range_edits", gate)

    async def go():
        loop_thread = threading.get_ident()
        edit = validate({"type": "edit", "path": "a.py", "version": 2, "changes": [insert(0, 5, "0")]})
        await gate.release_from_the_loop(asyncio.create_task(conn.dispatch(edit)))
        return loop_thread

    loop_thread = asyncio.run(go())
    assert gate.thread != loop_thread and gate.released_in_time
    assert documents(conn) == {"a.py": ("x = 10\n", 2)}


def test_the_cursor_of_a_completion_is_placed_off_the_event_loop(tmp_path, monkeypatch):
    conn = connection(tmp_path)
    send(conn, {"type": "open", "path": "a.py", "text": "x = 1\n", "version": 1})

    def refuse(text, changes):  # stop before generation: no engine here
        raise code_signals.CodeSignalsError("stopped by the test")

    gate = Gate(refuse)
    monkeypatch.setattr(code_signals, "apply_range_edits", gate)

    async def go():
        loop_thread = threading.get_ident()
        complete = validate({"type": "complete", "id": "c", "path": "a.py", "cursor": at(0, 4)})
        with pytest.raises(ClientError, match="stopped by the test"):
            await gate.release_from_the_loop(asyncio.create_task(conn.dispatch(complete)))
        return loop_thread

    loop_thread = asyncio.run(go())
    assert gate.thread != loop_thread and gate.released_in_time
    assert conn.inflight == {}
