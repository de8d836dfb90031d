"""The websocket handlers never wait on a session's thread lock on the event loop (issue 17), and the
session pushes added with it (``dropped``) reach the socket; the ``rollback`` message's schema.

While another thread holds the session's lock (as the trainer does while it settles edits), a handler
must hand the wait to a worker thread: the holder lets go only when a coroutine on the loop tells it
to, which can only happen if the loop is free. In process, no model; the Connection and Session are real.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.app.ws.protocol import validate
from server.errors import ClientError
from tests.server.app.ws.test_ws_connection_edits import connection

WAIT_S = 30.0

MESSAGES = {
    "open": {"type": "open", "path": "b.py", "text": "y = 2\n", "version": 1, "id": 1},
    "edit": {"type": "edit", "path": "a.py", "version": 2, "text": "x = 2\n", "id": 2},
    "edit_changes": {"type": "edit", "path": "a.py", "version": 2, "id": 3, "changes": [
        {"range": {"start": {"line": 0, "character": 4}, "end": {"line": 0, "character": 5}}, "text": "3"}]},
    "close": {"type": "close", "path": "a.py", "id": 4},
    "status": {"type": "status", "id": 5},
}


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_a_handler_waiting_for_the_session_lock_leaves_the_loop_free(tmp_path, kind):
    conn = connection(tmp_path)
    asyncio.run(conn.dispatch(validate({"type": "open", "path": "a.py", "text": "x = 1\n", "version": 1})))
    held, release = threading.Event(), threading.Event()
    released_in_time = []

    def trainer():
        with conn.session.lock:
            held.set()
            released_in_time.append(release.wait(WAIT_S))  # False: the loop was stuck on this lock

    holder = threading.Thread(target=trainer)
    holder.start()
    assert held.wait(WAIT_S)

    async def go():
        task = asyncio.create_task(conn.dispatch(validate(MESSAGES[kind])))
        await asyncio.sleep(0.05)  # the handler runs up to its wait for the lock
        release.set()  # only reached if that wait is not on the loop
        await task

    asyncio.run(go())
    holder.join(WAIT_S)
    assert released_in_time == [True]
    reply = conn.ws.sent[-1]
    assert reply.get("id") == MESSAGES[kind]["id"] and reply["type"] in ("ack", "status"), reply


def test_dropped_examples_are_pushed_to_the_socket(tmp_path):
    conn = connection(tmp_path)
    conn.session.max_queue = 1

    async def go():
        conn.loop = asyncio.get_running_loop()
        conn.session.listeners.add(conn._push_threadsafe)
        await asyncio.to_thread(conn.session.enqueue, ["a", "b", "c"])  # from a worker thread, as the trainer
        for _ in range(200):
            if any(m["type"] == "dropped" for m in conn.ws.sent):
                break
            await asyncio.sleep(0.01)

    asyncio.run(go())
    assert [m for m in conn.ws.sent if m["type"] == "dropped"] == [
        {"type": "dropped", "count": 2, "dropped": 2, "queue_depth": 1, "max_queue": 1}]


@pytest.mark.parametrize("msg, code", [
    ({"type": "rollback"}, "missing_field"),
    ({"type": "rollback", "version": "3"}, "invalid_field"),
    ({"type": "rollback", "version": True}, "invalid_field"),
    ({"type": "rollback", "version": -1}, "invalid_field"),
    ({"type": "rollback", "version": 1, "to": 2}, "unknown_field"),
])
def test_bad_rollback_messages_are_refused(msg, code):
    with pytest.raises(ClientError) as err:
        validate(msg)
    assert err.value.code == code
    assert validate({"type": "rollback", "version": 0, "id": "r"}) == {"type": "rollback", "version": 0, "id": "r"}
