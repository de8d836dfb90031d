"""ide_client against a live server (tiny random model, real port, real adaptation)."""

from __future__ import annotations

import asyncio
import queue
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ide_client import API, Adapted, AsyncSession, Backoff, Reconnected, Session
from ide_client.session import ConnectionLost
from tests.helpers import client_cli, run_client, stop_child
from tests.ide_client.conftest import LiveServer

ROOT = Path(__file__).resolve().parents[2]
V1 = "def area(width, height):\n    return width * height\n"
V2 = V1 + "\n\ndef perimeter(width, height):\n    total = 2 * (width + height)\n    return total\n"


def run(coro):
    return asyncio.run(coro)


async def adapted_after(session: AsyncSession, version: int, timeout: float = 60) -> Adapted:
    while True:
        ev = await session.next_event(("adapted",), timeout)
        if ev.version > version:
            return ev


def test_full_session_flow(server):
    async def go():
        async with AsyncSession(server.url, repository={"id": "geo", "root_name": "geo"}) as s:
            assert s.ready.adapter_version == 0 and s.ready.ranks and s.ready.model.endswith(s.session_id)
            await s.open("geometry.py", V1)
            # LSP-style range change: append the new function after the last line.
            end = {"line": 2, "character": 0}
            version = await s.edit("geometry.py", changes=[{"range": {"start": end, "end": end},
                                                           "text": V2[len(V1):]}])
            assert version == 2 and s.documents["geometry.py"].text is None
            adapted = await adapted_after(s, 0)
            assert adapted.loss > 0 and adapted.mean_rank > 0 and adapted.ranks
            status = await s.status()
            assert status.documents == {"geometry.py": 2} and status.version >= adapted.version
            completion = await s.complete(path="geometry.py", cursor=(5, 4), max_tokens=6)
            deltas = [piece async for piece in completion]
            done = await completion.result()
            assert done.text == "".join(deltas) and done.finish_reason in ("stop", "length")
            assert done.adapter_version >= adapted.version
            assert await s.ping() < 5
            await s.close_document("geometry.py")
            assert (await s.status()).documents == {}
            model, sid = s.ready.model, s.session_id
        # The HTTP side sees the session and serves its adapter as a model.
        with API(server.url) as api:
            assert model in [row["id"] for row in api.models()]
            assert api.session(sid)["version"] >= adapted.version
            body = api.completion(model, "def f(", max_tokens=3)
            assert body["choices"][0]["text"] is not None
            assert "".join(api.stream_completion(model, "x = ", max_tokens=3)) is not None

    run(go())


def test_blocking_session_joins_the_same_session(server):
    with Session(server.url) as first, Session(server.url, resume_token=first.resume_token) as again:
        assert again.session_id == first.session_id
        again.open("a.py", "x = 1\n")
        assert first.status().documents == {"a.py": 1}
        completion = again.complete(prefix="def f(", max_tokens=4)
        text = "".join(completion)
        assert completion.result().text == text


def test_cancel_stops_generation(server):
    async def go():
        async with AsyncSession(server.url) as s:
            completion = await s.complete(prefix="def main():\n", max_tokens=400, temperature=1.0, seed=1,
                                          mode="raw")  # token by token: shaped text waits for whole lines
            first = await completion.__aiter__().__anext__()
            assert first is not None
            t0 = time.monotonic()
            await completion.cancel()
            done = await completion.result(timeout=30)
            assert done.finish_reason == "cancelled"
            assert time.monotonic() - t0 < 2.0
            await completion.cancel()  # after the end: a no-op, not an error
            assert await s.ping() < 5  # the connection is still healthy

    run(go())


def test_reconnect_and_resume_after_server_restart(tiny_dir, tmp_path):
    srv = LiveServer(tiny_dir, tmp_path / "data").start()
    events: list = []

    async def go():
        s = AsyncSession(srv.url, backoff=Backoff(initial=0.2, maximum=1.0, max_attempts=200), on_event=events.append)
        ready = await s.connect()
        await s.open("shapes.py", V1)
        await s.edit("shapes.py", text=V2)
        before = await adapted_after(s, 0)
        # A completion in flight when the server goes away fails with ConnectionLost.
        pending = await s.complete(prefix="def main():\n", max_tokens=400, temperature=1.0, seed=2, mode="raw")
        await asyncio.to_thread(srv.stop)  # graceful: the server persists the session's adapter
        with pytest.raises(ConnectionLost):
            await pending.result(timeout=30)
        await asyncio.to_thread(srv.start)  # same port, same --data-dir
        resumed = await s.next_event(("reconnected",), timeout=120)
        assert isinstance(resumed, Reconnected)
        assert resumed.ready.session_id == ready.session_id
        assert resumed.ready.adapter_version >= before.version
        # The client re-opened its document on the fresh server, so edits go on working.
        status = await s.status()
        assert status.documents == {"shapes.py": 2}
        await s.edit("shapes.py", text=V2 + "\n\ndef volume(a, b, c):\n    return a * b * c\n")
        after = await adapted_after(s, resumed.ready.adapter_version)
        assert after.version > before.version
        await s.close()

    try:
        run(go())
    finally:
        srv.stop()
    assert not [e for e in events if e.type == "error"], events


class LineReader:
    """Lines of a child's stdout, readable with a timeout."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def rest(self, timeout: float = 30) -> str:
        """Everything printed after the last wait_for, once the child has exited."""
        self.thread.join(timeout)
        lines = []
        while not self.lines.empty():
            lines.append(self.lines.get_nowait())
        return "\n".join(lines)

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, needle: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if needle in line:
                return line
        raise AssertionError(f"no line with {needle!r} within {timeout}s; got:\n" + "\n".join(self.seen))


def test_watch_picks_up_a_saved_change_and_the_server_adapts(server, tmp_path):
    repo = tmp_path / "repo"  # no .git: the directory itself is the repository
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "geometry.py").write_text(V1)
    (repo / "notes.bin").write_bytes(b"\x00\x01")
    proc = client_cli("watch", str(repo), "--server", server.url)
    out = LineReader(proc)
    try:
        out.wait_for("watching", 60)
        out.wait_for("session", 10)
        time.sleep(1.5)  # let the watcher arm before the save
        (repo / "pkg" / "geometry.py").write_text(V2)
        assert "pkg/geometry.py v2" in out.wait_for("edit", 30)
        line = out.wait_for("adapted", 60)
        assert "loss" in line and "mean rank" in line and "ranks [" in line
        (repo / "pkg" / "fresh.py").write_text("def twice(x):\n    return 2 * x\n")
        assert "pkg/fresh.py v2" in out.wait_for("edit", 30)
    finally:
        # SIGTERM, not SIGINT: under nohup or a CI runner the child starts with SIGINT ignored.
        stop_child(proc)
    rest = out.rest()
    assert proc.returncode == 0, rest  # stopped by SIGTERM, not killed
    assert "stopped; session saved" in rest and "Traceback" not in rest, rest
    state = (repo / ".dynarank" / "client.json").read_text()
    assert server.url in state and "resume_token" in state
    # The next command resumes the same session from the saved state.
    done = run_client("status", str(repo), "--server", server.url)
    text = done.stdout
    assert done.returncode == 0, text
    assert "pkg/geometry.py v2" in text and "adapter v" in text


def test_complete_and_finetune_commands(server, tmp_path):
    repo = tmp_path / "shapes"
    repo.mkdir()
    (repo / ".git").mkdir()  # a repository root marker; the walker skips its contents
    (repo / "circle.py").write_text("import math\n\n\ndef circle_area(r):\n    return math.pi * r * r\n")
    done = run_client("complete", "circle.py:5:12", "--server", server.url, "--max-tokens", "4", cwd=repo)
    text = done.stdout
    assert done.returncode == 0, text
    assert "adapter v0" in text and (repo / ".dynarank" / "client.json").exists()
    done = run_client("finetune", str(repo), "--server", server.url, "--steps", "3", "--rank-policy", "fixed",
                      timeout=120)
    text = done.stdout
    assert done.returncode == 0, text
    assert "3/3" in text and "succeeded: model" in text and ":shapes" in text
    with API(server.url) as api:
        job = api.jobs()[0]
        assert job["status"] == "succeeded" and job["repository"]["root_name"] == "shapes"
    # A new session on that repository starts from the fine-tuned adapter.
    done = run_client("complete", str(repo / "circle.py") + ":2:1", "--server", server.url, "--new-session",
                      "--max-tokens", "2")
    text = done.stdout
    assert done.returncode == 0, text
    assert "adapter v1" in text, text
