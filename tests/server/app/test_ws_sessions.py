"""Sessions end to end: a real server on a real port with a tiny random model.

The websocket client is the `websockets` library; adaptation runs for real
(tiny model, so steps take milliseconds). The client and server helpers are
in tests/session_server.py.
"""

from __future__ import annotations

import asyncio
import json
import tarfile
import threading
import time

import httpx

from tests.session_server import FILE_V1, FILE_V2, Client, Server, adapt_once, run

# -- tests ---------------------------------------------------------------------


def test_session_adapts_and_completion_reports_version(server):
    async def go():
        c = await Client.connect(server.port)
        ready = await c.hello(repository={"id": "geo", "root_name": "geo"})
        assert ready["protocol"] == 1 and ready["adapter_version"] == 0 and ready["ranks"]
        assert ready["model"] == f"{server.base}:session-{ready['session_id']}"
        await c.send({"type": "open", "path": "geometry.py", "text": FILE_V1, "version": 1})
        # LSP range edit: append the new function at the end of the document.
        await c.send({"type": "edit", "path": "geometry.py", "version": 2, "changes": [
            {"range": {"start": {"line": 2, "character": 0}, "end": {"line": 2, "character": 0}},
             "text": FILE_V2[len(FILE_V1):]}]})
        adapted = await c.wait_for("adapted", 60)
        assert adapted["version"] >= 1 and adapted["loss"] > 0 and adapted["ranks"] and adapted["mean_rank"] > 0
        status = await c.wait_for("status", 30, lambda m: m["version"] >= adapted["version"])
        assert status["dropped"] == 0
        deltas, done = await c.complete("c1", path="geometry.py", cursor={"line": 5, "character": 4}, max_tokens=6)
        assert done["type"] == "completion.done", done
        assert done["adapter_version"] >= adapted["version"]
        assert done["text"] == "".join(deltas) and done["finish_reason"] in ("stop", "length")
        assert done["completion_id"].startswith("cmpl-")
        # The session shows up over HTTP and its adapter serves /v1/completions.
        sid = ready["session_id"]
        info = httpx.get(server.url(f"/v1/sessions/{sid}")).json()
        assert info["version"] >= adapted["version"] and info["documents"] == ["geometry.py"]
        r = httpx.post(server.url("/v1/completions"), json={"model": ready["model"], "prompt": "def f(", "max_tokens": 3},
                       timeout=60)
        assert r.status_code == 200, r.text
        await c.close()

    run(go())


def test_bad_messages_get_errors_and_change_nothing(server):
    async def go():
        c = await Client.connect(server.port)
        await c.send({"type": "open", "path": "x.py", "text": "x", "version": 1})
        assert (await c.recv())["code"] == "not_ready"
        await c.hello()
        await c.send({"type": "open", "path": "m.py", "text": "a = 1\n", "version": 3})
        await c.send({"type": "status"})
        before = await c.wait_for("status")
        bad = [
            ("{not json", "invalid_json"),
            ("[1, 2]", "invalid_message"),
            (json.dumps({"type": "teleport"}), "unknown_type"),
            (json.dumps({"type": "open", "path": "m.py", "text": "b", "version": 4, "colour": 1}), "unknown_field"),
            (json.dumps({"type": "open", "path": "m.py", "text": 5, "version": 4}), "invalid_field"),
            (json.dumps({"type": "open", "path": "m.py", "text": "b", "version": True}), "invalid_field"),
            (json.dumps({"type": "edit", "path": "nope.py", "version": 9, "text": "x"}), "unknown_document"),
            (json.dumps({"type": "edit", "path": "m.py", "version": 2, "text": "old"}), "stale_version"),
            (json.dumps({"type": "edit", "path": "m.py", "version": 4, "text": "a", "changes": []}), "invalid_field"),
            (json.dumps({"type": "edit", "path": "m.py", "version": 4, "changes": [
                {"range": {"start": {"line": 7, "character": 0}, "end": {"line": 7, "character": 1}}, "text": "z"}]}),
             "invalid_range"),
            (json.dumps({"type": "complete", "id": "k", "path": "m.py", "cursor": {"line": 40, "character": 0}}),
             "invalid_range"),
            (json.dumps({"type": "complete", "id": "k", "prefix": "x", "max_tokens": 10**6}), "invalid_field"),
            (json.dumps({"type": "close", "path": "ghost.py"}), "unknown_document"),
            (json.dumps({"type": "cancel", "id": "never"}), "unknown_completion"),
            (json.dumps({"type": "hello"}), "already_ready"),
            (json.dumps({"type": "open", "path": "big.py", "text": "x" * (1024 * 1024 + 10), "version": 1}),
             "message_too_large"),
            (b"\xff\xfe\xfd", "invalid_utf8"),
            (b'{"type": "ping"}', "binary_frame"),
        ]
        for raw, code in bad:
            await c.send(raw)
            msg = await c.wait_for("error", 10)
            assert msg["code"] == code, (raw[:80], msg)
            assert msg["message"]
        await c.send({"type": "status"})
        after = await c.wait_for("status")
        assert after["documents"] == before["documents"] == {"m.py": 3}
        assert after["version"] == before["version"] and after["queue_depth"] == before["queue_depth"]
        await c.send({"type": "ping", "id": 7})
        assert await c.wait_for("pong") == {"type": "pong", "id": 7}
        await c.close()

    run(go())


def test_cancel_stops_generation(server):
    async def go():
        c = await Client.connect(server.port)
        await c.hello()
        await c.send({"type": "complete", "id": "long", "prefix": "def main():\n", "max_tokens": 400,
                      "temperature": 1.0, "seed": 1, "mode": "raw"})  # raw: deltas token by token
        first = await c.wait_for_any(("completion.delta", "completion.done"), "long")
        assert first["type"] == "completion.delta"
        t0 = time.monotonic()
        await c.send({"type": "cancel", "id": "long"})
        done = await c.wait_for("completion.done", 30, lambda m: m["id"] == "long")
        assert done["finish_reason"] == "cancelled"
        assert time.monotonic() - t0 < 2.0
        assert len(done["text"]) < 400 * 8
        await c.close()

    run(go())


def test_resume_and_two_tabs_share_a_session(server):
    async def go():
        tab1 = await Client.connect(server.port)
        ready1 = await tab1.hello()
        tab2 = await Client.connect(server.port)
        ready2 = await tab2.hello(session_id=ready1["session_id"])
        assert ready2["session_id"] == ready1["session_id"]
        await tab1.send({"type": "open", "path": "shared.py", "text": FILE_V1, "version": 1})
        await tab1.send({"type": "status"})
        await tab1.wait_for("status")
        # Tab 2 edits the document tab 1 opened: one mirror per session.
        await tab2.send({"type": "edit", "path": "shared.py", "version": 2, "text": FILE_V2})
        await tab2.send({"type": "close", "path": "shared.py"})
        a1 = await tab1.wait_for("adapted", 60)
        a2 = await tab2.wait_for("adapted", 60, lambda m: m["version"] == a1["version"])
        assert a1["version"] == a2["version"]
        await tab1.close()
        # Reconnect with the resume token: same session, same adapter version.
        await asyncio.sleep(0.5)
        tab1b = await Client.connect(server.port)
        resumed = await tab1b.hello(resume_token=ready1["resume_token"])
        assert resumed["session_id"] == ready1["session_id"]
        assert resumed["adapter_version"] >= a1["version"]
        bad = await Client.connect(server.port)
        await bad.send({"type": "hello", "resume_token": "not-a-token"})
        assert (await bad.recv())["code"] == "invalid_resume_token"
        for c in (tab1b, tab2, bad):
            await c.close()

    run(go())


def test_hot_swap_under_concurrent_completions(server):
    """Completions keep flowing while versions are published; each reports the one it used."""

    async def go():
        trainer = await Client.connect(server.port)
        ready = await trainer.hello()
        reader = await Client.connect(server.port)
        await reader.hello(session_id=ready["session_id"])
        seen: list[int] = []
        http_seen: list[int] = []
        stop = asyncio.Event()

        async def complete_loop():
            i = 0
            while not stop.is_set():
                i += 1
                _, done = await reader.complete(f"h{i}", prefix="def total(values):\n    ", max_tokens=4)
                assert done["type"] == "completion.done", done
                seen.append(done["adapter_version"])

        def http_loop():
            with httpx.Client(timeout=180) as http:
                while not stop.is_set():
                    r = http.post(server.url("/v1/completions"), json={
                        "model": ready["model"], "prompt": "x = ", "max_tokens": 3})
                    assert r.status_code == 200, r.text
                    http_seen.append(r.json().get("adapter_version", -1))

        http_thread = threading.Thread(target=http_loop)
        http_thread.start()
        task = asyncio.create_task(complete_loop())
        versions = []
        for k in range(3):
            path = f"burst{k}.py"
            versions.append((await adapt_once(trainer, path))["version"])
        await asyncio.sleep(0.3)
        stop.set()
        await task
        await asyncio.to_thread(http_thread.join)
        assert versions == sorted(versions) and versions[-1] > versions[0]
        assert len(seen) >= 3 and seen == sorted(seen), seen
        assert len(set(seen)) >= 2, seen
        assert http_seen, "no HTTP completion finished"
        await trainer.close()
        await reader.close()

    run(go())


def test_fine_tuning_job_then_adapter_as_model(server, tmp_path):
    repo = tmp_path / "shapes"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "circle.py").write_text("import math\n\n\ndef circle_area(r):\n    return math.pi * r * r\n")
    (repo / "pkg" / "square.py").write_text("def square_area(side):\n    return side * side\n" * 3)
    (repo / "README.md").write_text("# shapes\n")
    body = {"repository": {"path": str(repo)}, "adapter_name": "shapes-v1",
            "hyperparameters": {"rank_policy": "fixed", "steps": 4, "learning_rate": 0.002}}
    r = httpx.post(server.url("/v1/fine_tuning/jobs"), json=body)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "fine_tuning.job" and job["status"] in ("validating_files", "queued", "running")
    deadline = time.monotonic() + 90
    while job["status"] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.3)
        job = httpx.get(server.url(f"/v1/fine_tuning/jobs/{job['id']}")).json()
    assert job["status"] == "succeeded", job
    assert job["fine_tuned_model"] == f"{server.base}:shapes-v1" and job["step"] == 4
    events = httpx.get(server.url(f"/v1/fine_tuning/jobs/{job['id']}/events")).json()["data"]
    metrics = [e["data"] for e in events if e["data"]]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all("loss" in m and "eta_s" in m and m["ranks"] for m in metrics)
    assert any(j["id"] == job["id"] for j in httpx.get(server.url("/v1/fine_tuning/jobs")).json()["data"])
    # The adapter is a model...
    r = httpx.post(server.url("/v1/completions"), json={"model": job["fine_tuned_model"], "prompt": "def ", "max_tokens": 3},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert any(m["id"] == job["fine_tuned_model"] for m in httpx.get(server.url("/v1/models")).json()["data"])
    # ...and the starting point of sessions on that repository.
    async def go():
        c = await Client.connect(server.port)
        ready = await c.hello(repository={"id": "shapes", "root_name": "shapes"})
        assert ready["origin"] == "shapes-v1" and ready["adapter_version"] == job["result"]["version"]
        await c.close()

    run(go())
    # Download as tar.gz: a PEFT directory.
    r = httpx.get(server.url("/v1/adapters/shapes-v1/download"))
    assert r.status_code == 200
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(r.content)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "shapes-v1/adapter_config.json" in names and "shapes-v1/adapter_model.safetensors" in names
    # Bad requests are rejected; cancel of a finished job is a no-op.
    assert httpx.post(server.url("/v1/fine_tuning/jobs"), json={**body, "adapter_name": "../evil"}).status_code == 400
    assert httpx.post(server.url("/v1/fine_tuning/jobs"), json={**body, "hyperparameters": {"steps": "x"}}).status_code == 400
    assert httpx.get(server.url("/v1/adapters/..%2Fetc/download")).status_code in (400, 404)
    assert httpx.post(server.url(f"/v1/fine_tuning/jobs/{job['id']}/cancel")).json()["status"] == "succeeded"
    # Delete removes the adapter and its model name.
    assert httpx.delete(server.url("/v1/adapters/shapes-v1")).status_code == 200
    assert httpx.post(server.url("/v1/completions"), json={"model": job["fine_tuned_model"], "prompt": "x"}).status_code == 404


def test_job_cancel(server):
    files = [{"path": f"m{i}.py", "text": f"def f{i}(x):\n    return x + {i}\n" * 20} for i in range(4)]
    r = httpx.post(server.url("/v1/fine_tuning/jobs"), json={
        "files": files, "adapter_name": "long-job", "hyperparameters": {"steps": 5000}})
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    time.sleep(1.0)
    cancelled = httpx.post(server.url(f"/v1/fine_tuning/jobs/{job_id}/cancel")).json()
    assert cancelled["status"] == "cancelled"
    step = httpx.get(server.url(f"/v1/fine_tuning/jobs/{job_id}")).json()["step"]
    time.sleep(0.5)
    assert httpx.get(server.url(f"/v1/fine_tuning/jobs/{job_id}")).json()["step"] == step
    assert all(a["name"] != "long-job" for a in httpx.get(server.url("/v1/adapters")).json()["data"])


# -- issue 17: rollback, persistence within the interval, documents back after a crash ----------------------


def stored_versions(server, sid: str) -> tuple[list[int], int | None]:
    """(versions of session-<sid> on disk, its live version) from GET /v1/adapters."""
    rows = {r["name"]: r for r in httpx.get(server.url("/v1/adapters")).json()["data"]}
    row = rows.get(f"session-{sid}", {})
    return row.get("versions", []), row.get("live_version")


def wait_until_stored(server, sid: str, timeout: float = 60.0) -> list[int]:
    """Poll until the live version is on disk (persist_interval_s, 5 s by default); its stored versions."""
    deadline = time.monotonic() + timeout
    while True:
        versions, live = stored_versions(server, sid)
        if live is not None and live in versions:
            return versions
        assert time.monotonic() < deadline, f"live version {live} not on disk within {timeout}s: {versions}"
        time.sleep(0.2)


def test_rollback_over_the_websocket_and_http(server):
    async def go():
        tab = await Client.connect(server.port)
        ready = await tab.hello()
        sid = ready["session_id"]
        other = await Client.connect(server.port)
        await other.hello(session_id=sid)
        await adapt_once(tab, "first.py")
        await asyncio.to_thread(wait_until_stored, server, sid)
        await adapt_once(tab, "second.py")
        versions = await asyncio.to_thread(wait_until_stored, server, sid)
        _, live = stored_versions(server, sid)
        target = versions[0]
        assert target < live

        await tab.send({"type": "rollback", "version": target, "id": "rb1"})
        reply = await tab.wait_for("rolled_back", 30)
        assert reply["id"] == "rb1" and reply["restored_version"] == target and reply["version"] > live
        pushed = await other.wait_for("rolled_back", 30)  # the other tab is told, without the id
        assert "id" not in pushed and pushed["version"] == reply["version"]
        _, done = await tab.complete("after", prefix="def f(", max_tokens=2)
        assert done["adapter_version"] >= reply["version"]

        await tab.send({"type": "rollback", "version": 10_000, "id": "rb2"})
        err = await tab.wait_for("error", 30)
        assert err["code"] == "version_not_found" and err["ref"] == "rb2"

        url = server.url(f"/v1/sessions/{sid}/rollback")
        r = await asyncio.to_thread(httpx.post, url, json={"version": target}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["restored_version"] == target and body["version"] > reply["version"]
        assert (await other.wait_for("rolled_back", 30, lambda m: m["version"] == body["version"]))
        for bad, status, code in (({"version": 10_000}, 404, "version_not_found"), ({"version": "1"}, 400, None),
                                  ({"version": -1}, 400, None), ({}, 400, None), ({"version": 1, "x": 1}, 400, None)):
            r = await asyncio.to_thread(httpx.post, url, json=bad)
            assert r.status_code == status, (bad, r.text)
            assert code is None or r.json()["error"]["code"] == code
        r = await asyncio.to_thread(httpx.post, server.url("/v1/sessions/no-such-session/rollback"),
                                    json={"version": 1})
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
        await tab.close()
        await other.close()

    run(go())


def test_a_crash_loses_no_version_older_than_the_interval_and_documents_come_back(tiny_dir, tmp_path):
    """kill -9 after a version was published and left idle: the restarted server resumes the session at that
    version with its open documents, and a session that only said hello left no adapter behind."""
    srv = Server(tiny_dir, tmp_path / "data", extra=["--persist-interval-s", "0.5", "--persist-every", "1000"])
    srv.start()
    try:
        async def before():
            c = await Client.connect(srv.port)
            ready = await c.hello(session_id="durable")
            await c.send({"type": "open", "path": "keep.py", "text": FILE_V1, "version": 3})
            adapted = await adapt_once(c)
            idle = await Client.connect(srv.port)
            hello_only = (await idle.hello())["session_id"]
            return ready, adapted["version"], hello_only

        ready, version, hello_only = run(before())
        assert wait_until_stored(srv, "durable")[-1] == version
        deadline = time.monotonic() + 60
        while not list((tmp_path / "data" / "sessions").rglob("durable.documents.json")):
            assert time.monotonic() < deadline, "open documents not written within 60 s"
            time.sleep(0.2)
        srv.proc.kill()  # no shutdown: only what was already on disk survives
        srv.stop()
        srv.start()

        async def after():
            c = await Client.connect(srv.port)
            again = await c.hello(resume_token=ready["resume_token"])
            _, done = await c.complete("k", path="keep.py", cursor={"line": 1, "character": 4}, max_tokens=2)
            await c.close()
            return again, done

        again, done = run(after())
        assert again["session_id"] == "durable" and again["adapter_version"] == version
        assert again["documents"] == {"keep.py": 3}  # the client need not send it again
        assert done["type"] == "completion.done" and done["adapter_version"] == version
        names = [a["name"] for a in httpx.get(srv.url("/v1/adapters")).json()["data"]]
        assert f"session-{hello_only}" not in names and "session-durable" in names
    finally:
        out = srv.stop()
    assert "Traceback" not in out, out[-3000:]
