"""Auth isolation between two API keys, and persistence across a server restart."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import httpx
import pytest
import websockets

from tests.session_server import Client, Server, adapt_once, run, save_tiny_model

KEY_A, KEY_B = "key-alpha-123", "key-bravo-456"


@pytest.fixture(scope="module")
def auth_server(tokenizer):
    root = Path(tempfile.mkdtemp(prefix="dynarank-auth-"))
    save_tiny_model(root / "tiny", tokenizer)
    (root / "keys").write_text(f"{KEY_A}\n{KEY_B}\n")
    srv = Server(root / "tiny", root / "data", ["--api-key-file", str(root / "keys")]).start()
    yield srv
    if srv.proc.poll() is None:
        srv.stop()
    shutil.rmtree(root, ignore_errors=True)


def h(key):
    return {"Authorization": f"Bearer {key}"}


def test_wrong_or_missing_key_is_refused_with_4401(auth_server):
    async def go():
        for fields in ({"api_key": "wrong"}, {}):
            c = await Client.connect(auth_server.port)
            await c.send({"type": "hello", **fields})
            err = await c.recv()
            assert err["type"] == "error" and err["code"] == "unauthorized"
            with pytest.raises(websockets.ConnectionClosed) as exc:
                await c.recv()
            assert exc.value.rcvd.code == 4401

    run(go())
    assert httpx.get(auth_server.url("/v1/sessions")).status_code == 401
    assert httpx.get(auth_server.url("/v1/dashboard/data"), headers=h("nope")).status_code == 401


def test_keys_see_only_their_own_sessions_and_adapters(auth_server):
    async def go():
        a = await Client.connect(auth_server.port)
        ready = await a.hello(api_key=KEY_A, session_id="shared-name")
        await adapt_once(a)
        b = await Client.connect(auth_server.port)
        # Same client-chosen id under another key: a different session.
        ready_b = await b.hello(api_key=KEY_B, session_id="shared-name")
        assert ready_b["adapter_version"] == 0
        await b.close()
        b = await Client.connect(auth_server.port)
        await b.send({"type": "hello", "api_key": KEY_B, "resume_token": ready["resume_token"]})
        assert (await b.recv())["code"] == "invalid_resume_token"
        await a.close()
        await b.close()
        private = await Client.connect(auth_server.port)
        only_a = await private.hello(api_key=KEY_A)
        await private.close()
        return only_a

    model = run(go())["model"]
    assert httpx.post(auth_server.url("/v1/completions"), headers=h(KEY_A),
                      json={"model": model, "prompt": "x", "max_tokens": 2}, timeout=60).status_code == 200
    r = httpx.post(auth_server.url("/v1/completions"), headers=h(KEY_B), json={"model": model, "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404
    r = httpx.post(auth_server.url("/v1/completions"), headers=h(KEY_B),
                   json={"model": model.split(":")[0] + ":session-shared-name", "prompt": "x", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["adapter_version"] == 0  # B's own session of that name
    a_adapters = [x["name"] for x in httpx.get(auth_server.url("/v1/adapters"), headers=h(KEY_A)).json()["data"]]
    b_adapters = [x["name"] for x in httpx.get(auth_server.url("/v1/adapters"), headers=h(KEY_B)).json()["data"]]
    assert "session-shared-name" in a_adapters and "session-shared-name" in b_adapters
    b_session = httpx.get(auth_server.url("/v1/sessions/shared-name"), headers=h(KEY_B)).json()
    a_session = httpx.get(auth_server.url("/v1/sessions/shared-name"), headers=h(KEY_A)).json()
    assert a_session["version"] >= 1 and b_session["version"] == 0
    assert httpx.get(auth_server.url("/v1/adapters/session-shared-name/download"), headers=h(KEY_A)).status_code == 200
    assert httpx.delete(auth_server.url("/v1/adapters/nothing-here"), headers=h(KEY_B)).status_code == 404
    dash = httpx.get(auth_server.url("/v1/dashboard/data"), headers=h(KEY_B)).json()
    assert all(s["version"] == 0 for s in dash["sessions"])


def test_session_adapter_survives_restart(auth_server):
    async def adapt():
        c = await Client.connect(auth_server.port)
        ready = await c.hello(api_key=KEY_A, session_id="durable")
        adapted = await adapt_once(c)
        await c.close()
        return ready, adapted["version"]

    ready, version = run(adapt())
    # Wait until the worker is idle so we know the final version before the restart.
    import time

    def state():
        return httpx.get(auth_server.url("/v1/sessions/durable"), headers=h(KEY_A)).json()

    current = state()
    for _ in range(60):
        time.sleep(0.5)
        latest = state()
        if latest["queue_depth"] == 0 and latest["version"] == current["version"]:
            break
        current = latest
    out = auth_server.stop()
    assert "sessions persisted" in out, out[-3000:]
    auth_server.start()

    async def resume():
        c = await Client.connect(auth_server.port)
        again = await c.hello(api_key=KEY_A, resume_token=ready["resume_token"])
        await c.close()
        return again

    again = run(resume())
    assert again["session_id"] == "durable"
    assert again["adapter_version"] == current["version"] >= version
    assert again["ranks"]
    r = httpx.post(auth_server.url("/v1/completions"), headers=h(KEY_A),
                   json={"model": ready["model"], "prompt": "def ", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json().get("adapter_version") == current["version"]
