"""One client must not stall everyone: a real server, one websocket flooding completions, another completing.

The probe behind it: 60 ``complete`` messages on one socket started 60 generations that took turns with
everyone else's (an HTTP completion went from 0.6 s to 126 s), and after the socket closed the cancelled ones
still ran a forward each (another completion waited 351 s). Now a connection has at most
``max_ws_inflight_per_connection`` completions in flight (beyond it: ``too_many_requests`` for that id), the
engine shares its steps round robin between connections, and closing the socket frees every slot.

Waits are on messages and polled counters with generous timeouts; the assertions compare counts and order,
not wall-clock times.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from server.app.ws.connection import Connection
from server.config import Settings
from tests.session_server import Client, Server, save_tiny_model

CAP = 4  # the default max_ws_inflight_per_connection
FLOOD = 40
FLOOD_TOKENS = 400  # far more than the victim needs: the flood is still running when it is closed
VICTIM_TOKENS = 48
WAIT = 120.0


@pytest.fixture(scope="module")
def server(tokenizer):
    root = Path(tempfile.mkdtemp(prefix="dynarank-admission-"))
    save_tiny_model(root / "tiny", tokenizer)
    srv = Server(root / "tiny", root / "data").start()
    yield srv
    out = srv.stop()
    shutil.rmtree(root, ignore_errors=True)
    assert "Traceback" not in out, out[-3000:]


def _metric(server: Server, name: str) -> float:
    text = httpx.get(server.url("/metrics"), timeout=10).text
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _complete(cid: str, prompt: str, max_tokens: int) -> dict:
    return {"type": "complete", "id": cid, "prefix": prompt, "max_tokens": max_tokens, "mode": "raw"}


async def _flood_and_victim(server: Server) -> dict:
    flooder = await Client.connect(server.port)
    victim = await Client.connect(server.port)
    await flooder.hello()
    await victim.hello()
    try:
        for i in range(FLOOD):
            await flooder.send(_complete(f"f{i}", "def f(x):", FLOOD_TOKENS))
        # Every id is either refused or running (it sends text) before the victim starts.
        refused, running, flood_log = {}, set(), []
        while len(refused) + len(running) < FLOOD:
            msg = await flooder.recv(WAIT)
            if msg["type"] == "error":
                refused[msg["ref"]] = msg["code"]
            elif msg["type"] == "completion.delta":
                running.add(msg["id"])
            flood_log.append(msg)

        # The victim asks for one completion while the flooder's completions run; meanwhile the flooder's
        # messages are read (and counted) as they come.
        victim_done = asyncio.Event()
        during: list[dict] = []

        async def read_flood():
            while not victim_done.is_set():
                try:
                    msg = await flooder.recv(0.5)
                except asyncio.TimeoutError:
                    continue
                if not victim_done.is_set():
                    during.append(msg)
                flood_log.append(msg)

        reader = asyncio.create_task(read_flood())
        deltas, done = await victim.complete("v1", prefix="class Point:", max_tokens=VICTIM_TOKENS, mode="raw")
        victim_done.set()
        await reader
        inflight_before_close = _metric(server, "dynarank_inflight_completions")
    finally:
        await flooder.close()  # the flood is still running: closing must free its slots
    # The victim's connection is not limited by the flooder's: it can still run a completion afterwards.
    after = await victim.complete("v2", prefix="x = ", max_tokens=4, mode="raw")
    await victim.close()
    return {"refused": refused, "flood_log": flood_log, "during": during, "victim": (deltas, done),
            "inflight_before_close": inflight_before_close, "after": after}


def test_a_flooding_connection_is_capped_and_does_not_starve_another(server):
    r = asyncio.run(_flood_and_victim(server))

    # The flooder: the first CAP admitted (admission is immediate: the rest arrive long before any of them
    # can end), every other one refused with too_many_requests.
    assert set(r["refused"]) == {f"f{i}" for i in range(CAP, FLOOD)}
    assert set(r["refused"].values()) == {"too_many_requests"}
    assert {m["id"] for m in r["flood_log"] if m["type"] == "completion.delta"} <= {f"f{i}" for i in range(CAP)}

    # The victim finished while the flood was still running: no flood completion ended before it ...
    deltas, done = r["victim"]
    assert done["type"] == "completion.done", done
    assert done["finish_reason"] in ("length", "stop") and "".join(deltas) == done["text"]
    assert not [m for m in r["during"] if m["type"] in ("completion.done", "error")]
    assert r["inflight_before_close"] == CAP  # the victim's slot was already free; the flood's CAP were running
    # ... and no flood completion advanced faster than the victim: the victim's row is in every decode step
    # the flood's rows are in (continuous batching; its prefill took one round-robin turn), so each of the
    # CAP flood completions got about one token per victim token, plus the steps before the victim joined.
    flood_tokens = sum(1 for m in r["during"] if m["type"] == "completion.delta")
    assert flood_tokens <= CAP * (VICTIM_TOKENS + 8), flood_tokens

    assert r["after"][1]["type"] == "completion.done", r["after"]


def test_cancel_and_close_free_the_slots(server):
    """A cancelled completion frees its slot for the next; closing the socket while its completions run
    frees them all: the in-flight count returns to 0."""

    async def flood_then_close():
        flooder = await Client.connect(server.port)
        await flooder.hello()
        for i in range(CAP):
            await flooder.send(_complete(f"g{i}", "def g(y):", FLOOD_TOKENS))
        # Wait until every one of them has produced text: all are in the engine.
        started: set[str] = set()
        while len(started) < CAP:
            msg = await flooder.recv(WAIT)
            assert msg["type"] == "completion.delta", msg
            started.add(msg["id"])
        # At the cap: one more is refused; cancelling one makes room for it.
        _, refused = await flooder.complete("extra", prefix="y = ", max_tokens=4, mode="raw")
        assert refused["type"] == "error" and refused["code"] == "too_many_requests", refused
        await flooder.send({"type": "cancel", "id": "g0"})
        cancelled = await flooder.wait_for_any(("completion.done", "error"), "g0", WAIT)
        assert cancelled["type"] == "completion.done" and cancelled["finish_reason"] == "cancelled", cancelled
        await flooder.send(_complete(f"g{CAP}", "def h(z):", FLOOD_TOKENS))
        first = await flooder.wait_for_any(("completion.delta", "completion.done", "error"), f"g{CAP}", WAIT)
        assert first["type"] == "completion.delta", first
        await flooder.close()

    tokens_before = _metric(server, "dynarank_generated_tokens_total")
    asyncio.run(flood_then_close())
    deadline = time.monotonic() + WAIT
    while _metric(server, "dynarank_inflight_completions") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(server, "dynarank_inflight_completions") == 0
    # The cancelled completions stopped early: far fewer tokens than they asked for were generated.
    generated = _metric(server, "dynarank_generated_tokens_total") - tokens_before
    assert 0 < generated < CAP * FLOOD_TOKENS / 2, generated


def test_session_pushes_are_bounded_while_the_socket_is_slow(tmp_path):
    """A trainer publishing faster than the client reads neither piles up tasks nor messages: one sender
    task, at most one waiting push per type, and the client ends with the newest of each."""
    async def scenario():
        sent: list[dict] = []
        unblock = asyncio.Event()

        class SlowSocket:
            async def send_text(self, text):
                await unblock.wait()
                sent.append(json.loads(text))

        state = SimpleNamespace(settings=Settings(model="tiny", data_dir=tmp_path), services=None)
        conn = Connection(SlowSocket(), state)
        conn.loop = asyncio.get_running_loop()
        tasks_before = len(asyncio.all_tasks())

        def trainer():
            for version in range(1, 501):
                conn._push_threadsafe({"type": "adapted", "version": version})
                conn._push_threadsafe({"type": "status", "queue_depth": 0, "version": version})

        worker = threading.Thread(target=trainer)
        worker.start()
        await asyncio.to_thread(worker.join)
        for _ in range(20):  # let the loop run the callbacks the thread scheduled
            await asyncio.sleep(0)
        assert len(asyncio.all_tasks()) - tasks_before <= 1  # one sender, not one task per push
        assert len(conn._pushes) <= 2
        unblock.set()
        deadline = time.monotonic() + WAIT
        while (conn._pushes or conn._pusher_scheduled) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not conn._pushes and not conn._pusher_scheduled
        assert len(sent) <= 4  # the one in flight when the socket stalled, then the newest of each type
        assert [m["version"] for m in sent if m["type"] == "adapted"][-1] == 500
        assert [m["version"] for m in sent if m["type"] == "status"][-1] == 500
        # A push after the drain starts a new sender and is delivered.
        conn._push_threadsafe({"type": "adapted", "version": 501})
        while sent[-1].get("version") != 501 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert sent[-1] == {"type": "adapted", "version": 501}

    asyncio.run(scenario())
