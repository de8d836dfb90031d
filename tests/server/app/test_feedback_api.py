"""Completion feedback end to end: a real server (two API keys) with the tiny model.

Also covers the protocol additions that came with it: status ids, acks for
document messages, completing with an empty prefix, and fine-tuning jobs whose
inline files name their repository.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.session_server import (  # noqa: F401
    FILE_V1,
    Client,
    Server,
    adapt_once,
    run,
)

K1, K2 = "key-one", "key-two"
H1, H2 = {"Authorization": f"Bearer {K1}"}, {"Authorization": f"Bearer {K2}"}
PREFIX = "def area(width, height):\n    return "


@pytest.fixture(scope="module")
def server(tiny_dir):  # noqa: F811
    data = Path(tempfile.mkdtemp(prefix="dynarank-feedback-"))
    srv = Server(tiny_dir, data, ["--api-key", K1, "--api-key", K2, "--feedback-check-s", "0.3"]).start()
    yield srv
    out = srv.stop()
    shutil.rmtree(data, ignore_errors=True)
    assert "Traceback" not in out, out[-3000:]


def post(server, path, body, headers=H1):
    return httpx.post(server.url(path), json=body, headers=headers, timeout=60)


def feedback(server, cid, event, headers=H1, **extra):
    return post(server, f"/v1/completions/{cid}/feedback", {"event": event, **extra}, headers)


def stats(server, sid, headers=H1) -> dict:
    r = httpx.get(server.url(f"/v1/sessions/{sid}/stats"), headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


async def ws_feedback(c: Client, rid, completion_id, event, **extra) -> dict:
    await c.send({"type": "feedback", "id": rid, "completion_id": completion_id, "event": event, **extra})
    return await c.wait_for_any(("ack", "error"), rid)


async def completion(c: Client, cid, seed=1, **fields) -> dict:
    fields = {"prefix": PREFIX, **fields}
    _, done = await c.complete(cid, max_tokens=6, temperature=1.0, seed=seed, **fields)
    assert done["type"] == "completion.done", done
    return done


async def settle(c: Client, sid, server) -> int:
    """Wait until the session's queue is empty and its version stops moving."""
    last = None
    for _ in range(120):
        info = httpx.get(server.url(f"/v1/sessions/{sid}"), headers=H1).json()
        if info["queue_depth"] == 0 and info["version"] == last:
            return last
        last = info["version"]
        time.sleep(0.5)
    raise AssertionError("session did not settle")


def test_ids_and_versions_on_every_path(server):
    async def go():
        c = await Client.connect(server.port)
        ready = await c.hello(api_key=K1)
        done = await completion(c, "w1")
        assert done["completion_id"].startswith("cmpl-") and done["adapter_version"] == ready["adapter_version"]
        assert done["model"] == ready["model"]
        # HTTP on the session's model, plain and streamed; on the base model.
        for model, version in ((ready["model"], ready["adapter_version"]), (server.base, None)):
            r = post(server, "/v1/completions", {"model": model, "prompt": PREFIX, "max_tokens": 4})
            body = r.json()
            assert body["id"].startswith("cmpl-") and body["adapter_version"] == version
            with httpx.stream("POST", server.url("/v1/completions"), headers=H1, timeout=60,
                              json={"model": model, "prompt": PREFIX, "max_tokens": 4, "stream": True}) as s:
                chunks = [json.loads(line[5:]) for line in s.iter_lines()
                          if line.startswith("data:") and "[DONE]" not in line]
            assert chunks and len({ch["id"] for ch in chunks}) == 1
            assert all(ch["adapter_version"] == version for ch in chunks)
            # Every id, streamed or not, takes feedback.
            assert feedback(server, chunks[0]["id"], "shown").status_code == 200
            assert feedback(server, body["id"], "shown").json()["adapter_version"] == version
        chat = post(server, "/v1/chat/completions",
                    {"model": ready["model"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        if chat.status_code == 200:  # the tiny model may have no chat template
            assert chat.json()["adapter_version"] == ready["adapter_version"]
        await c.close()

    run(go())


def test_scripted_acceptance_stats(server):
    async def go():
        c = await Client.connect(server.port)
        ready = await c.hello(api_key=K1, session_id="scripted")
        sid = ready["session_id"]
        v0 = [await completion(c, f"a{i}", seed=i + 1) for i in range(4)]
        assert {d["adapter_version"] for d in v0} == {0}
        for rid, (d, event) in enumerate(zip(v0, ["accepted", "rejected", "rejected", "shown"])):
            if event == "accepted":
                assert (await ws_feedback(c, f"s{rid}", d["completion_id"], "shown"))["type"] == "ack"
            ack = await ws_feedback(c, f"f{rid}", d["completion_id"], event)
            assert ack == {"type": "ack", "ref": "feedback", "id": f"f{rid}", "completion_id": d["completion_id"],
                           "event": event, "adapter_version": 0}
        await adapt_once(c)
        version = await settle(c, sid, server)
        assert version >= 1
        v1 = [await completion(c, f"b{i}", seed=i + 7) for i in range(3)]
        assert {d["adapter_version"] for d in v1} == {version}
        await ws_feedback(c, "g0", v1[0]["completion_id"], "accepted")
        part = v1[1]["text"][: max(1, len(v1[1]["text"]) // 2)]
        assert (await ws_feedback(c, "g1", v1[1]["completion_id"], "partially_accepted",
                                  accepted_text=part))["type"] == "ack"
        await ws_feedback(c, "g2", v1[2]["completion_id"], "rejected")
        # HTTP on the session's model counts for the session; on the base model, for the base model.
        r = post(server, "/v1/completions", {"model": ready["model"], "prompt": PREFIX, "max_tokens": 4, "seed": 3,
                                             "temperature": 1.0}).json()
        assert r["adapter_version"] == version
        assert feedback(server, r["id"], "accepted").json()["session_id"] == sid
        for event in ("accepted", "rejected"):
            b = post(server, "/v1/completions", {"model": server.base, "prompt": PREFIX, "max_tokens": 4}).json()
            assert feedback(server, b["id"], event).json()["session_id"] is None

        s = stats(server, sid)
        # "hidden" (the confidence gate's count) depends on the tiny model's confidences: left out here.
        rows = {row["adapter_version"]: {k: v for k, v in row.items() if k != "hidden"}
                for row in s["feedback"]["by_version"]}
        assert rows[0] == {"adapter_version": 0, "completions": 4, "shown": 2, "accepted": 1,
                           "partially_accepted": 0, "rejected": 2, "acceptance_rate": 0.333333}
        assert rows[version] == {"adapter_version": version, "completions": 4, "shown": 0, "accepted": 2,
                                 "partially_accepted": 1, "rejected": 1, "acceptance_rate": 0.75}
        assert s["feedback"]["acceptance_rate"] == 0.571429 and s["feedback"]["completions"] == 8
        base = s["models"][server.base]
        assert base["accepted"] == base["rejected"] == 1 and base["acceptance_rate"] == 0.5

        # /metrics: server-wide sums per scope only (every key's books), nothing that names the session.
        text = httpx.get(server.url("/metrics"), headers=H2).text
        assert sid not in text and server.base not in text
        families = [fam for fam in text_string_to_metric_families(text)
                    if fam.name in ("dynarank_acceptance_rate", "dynarank_completion_feedback")]
        assert {tuple(sorted(smp.labels)) for fam in families for smp in fam.samples} == \
            {("scope",), ("event", "scope")}
        counts = {(smp.labels["scope"], smp.labels["event"]): smp.value
                  for fam in families if fam.name == "dynarank_completion_feedback" for smp in fam.samples
                  if smp.name.endswith("_total")}
        assert counts[("session", "completions")] >= 8 and counts[("session", "partially_accepted")] >= 1
        assert counts[("model", "accepted")] >= 1 and counts[("model", "rejected")] >= 1
        dash = httpx.get(server.url("/v1/dashboard/data"), headers=H1).json()
        mine = next(x for x in dash["sessions"] if x["id"] == sid)
        assert [(p["version"], p["rate"]) for p in mine["acceptance"]] == [(0, 0.333333), (version, 0.75)]
        await c.close()

    run(go())


def test_bad_feedback_is_rejected_without_side_effects(server):
    async def go():
        c = await Client.connect(server.port)
        ready = await c.hello(api_key=K1)
        other = await Client.connect(server.port)
        await other.hello(api_key=K1)
        d = await completion(c, "x1")
        cid = d["completion_id"]
        await ws_feedback(c, "r", cid, "rejected")
        before = stats(server, ready["session_id"])
        ws_cases = [
            ({"completion_id": "cmpl-nope", "event": "accepted"}, "unknown_completion"),
            ({"completion_id": cid, "event": "rejected"}, "duplicate_feedback"),
            ({"completion_id": cid, "event": "accepted"}, "contradictory_feedback"),
            ({"completion_id": cid, "event": "loved"}, "invalid_feedback"),
            ({"completion_id": cid, "event": "accepted", "colour": 1}, "unknown_field"),
            ({"event": "accepted"}, "missing_field"),
            ({"completion_id": 5, "event": "accepted"}, "invalid_field"),
        ]
        for i, (fields, code) in enumerate(ws_cases):
            await c.send({"type": "feedback", "id": f"bad{i}", **fields})
            err = await c.wait_for_any(("ack", "error"), f"bad{i}")
            assert err["type"] == "error" and err["code"] == code and err["message"], (fields, err)
        # Another session of the same key cannot judge this completion.
        assert (await ws_feedback(other, "o", cid, "accepted"))["code"] == "unknown_completion"
        d2 = await completion(c, "x2", seed=5)
        http_cases = [
            (feedback(server, "cmpl-nope", "accepted"), 404, "unknown_completion"),
            (feedback(server, cid, "rejected"), 409, "duplicate_feedback"),
            (feedback(server, cid, "accepted"), 409, "contradictory_feedback"),
            (feedback(server, d2["completion_id"], "accepted", headers=H2), 404, "unknown_completion"),  # other key
            (feedback(server, d2["completion_id"], "accepted", accepted_text="zzz" + d2["text"]), 400,
             "invalid_feedback"),
            (post(server, f"/v1/completions/{d2['completion_id']}/feedback", {"evnt": "x"}), 400, None),
            (httpx.post(server.url(f"/v1/completions/{cid}/feedback"), content=b"{no json", headers=H1), 400, None),
            (feedback(server, d2["completion_id"], "accepted", headers={}), 401, None),
        ]
        types = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 409: "conflict_error"}
        for r, status, code in http_cases:
            assert r.status_code == status, r.text
            assert r.json()["error"]["type"] == types[status], r.text
            if code:
                assert r.json()["error"]["code"] == code
        after = stats(server, ready["session_id"])
        for counts in (before["feedback"], before["feedback"]["by_version"][0]):  # only d2 was added
            counts["completions"] += 1
            counts["hidden"] += d2["hidden"]  # the gate may have withheld it (then it counts the streak)
        gate_before, gate_after = before["feedback"].pop("gate"), after["feedback"].pop("gate")
        assert (gate_after["weights"], gate_after["updates"]) == (gate_before["weights"], gate_before["updates"])
        assert after["feedback"] == before["feedback"]
        await c.close()
        await other.close()

    run(go())


def test_accepted_kept_completion_trains_a_new_version(server):
    async def go():
        c = await Client.connect(server.port)
        ready = await c.hello(api_key=K1)
        sid = ready["session_id"]
        seed = 11
        while True:  # a completion with something to learn (not whitespace only)
            done = await completion(c, f"k{seed}", seed=seed)
            if done["text"].strip():
                break
            seed += 1
        rejected = await completion(c, "rej", seed=seed + 100)
        await ws_feedback(c, "fr", rejected["completion_id"], "rejected")
        # The editor inserted the accepted text: the mirror now holds it (an open, so no edit example).
        await c.send({"type": "open", "path": "kept.py", "text": PREFIX + done["text"] + "\n", "version": 1,
                      "id": "o1"})
        assert (await c.wait_for_any(("ack", "error"), "o1"))["type"] == "ack"
        assert stats(server, sid)["feedback"]["trained_examples"] == 0
        await ws_feedback(c, "fa", done["completion_id"], "accepted")
        adapted = await c.wait_for("adapted", 60)
        assert adapted["version"] > ready["adapter_version"]
        s = stats(server, sid)
        assert s["feedback"]["trained_examples"] >= 1 and s["adapter_version"] >= adapted["version"]
        await c.close()

    run(go())


def test_protocol_additions(server):
    async def go():
        c = await Client.connect(server.port)
        await c.hello(api_key=K1)
        await c.send({"type": "status", "id": 42})
        st = await c.wait_for("status", 10, lambda m: "id" in m)
        assert st["id"] == 42 and st["documents"] == {}
        await c.send({"type": "open", "path": "p.py", "text": FILE_V1, "version": 1, "id": "op"})
        assert await c.wait_for_any(("ack",), "op") == {"type": "ack", "ref": "open", "id": "op", "path": "p.py",
                                                       "version": 1}
        await c.send({"type": "edit", "path": "p.py", "version": 2, "text": "x = 1\n" + FILE_V1, "id": 7})
        assert (await c.wait_for_any(("ack",), 7))["ref"] == "edit"
        # Completing at line 1, col 1: empty prefix, with a cursor or with a suffix.
        _, at_start = await c.complete("z1", path="p.py", cursor={"line": 0, "character": 0}, max_tokens=3)
        assert at_start["type"] == "completion.done", at_start
        _, with_suffix = await c.complete("z2", prefix="", suffix="x = 1\n", max_tokens=3)
        assert with_suffix["type"] == "completion.done", with_suffix
        _, nothing = await c.complete("z3", prefix="", max_tokens=3)
        assert nothing["type"] == "error" and nothing["code"] == "missing_field"
        await c.send({"type": "close", "path": "p.py", "id": "cl"})
        assert (await c.wait_for_any(("ack",), "cl"))["version"] == 2
        await c.send({"type": "open", "path": "q.py", "text": "y = 2\n", "version": 1})  # no id: no ack
        await c.send({"type": "ping", "id": "after"})
        assert (await c.wait_for("pong"))["id"] == "after"
        assert not any(m["type"] == "ack" for m in c.backlog)
        await c.close()

    run(go())


def test_inline_files_job_seeds_sessions_of_its_repository(server):
    files = [{"path": "geo.py", "text": FILE_V1 * 3}]
    bad = post(server, "/v1/fine_tuning/jobs", {"adapter_name": "inl", "files": files,
                                                "repository": {"path": "/tmp", "id": "x"}})
    assert bad.status_code == 400
    r = post(server, "/v1/fine_tuning/jobs", {"adapter_name": "inline-geo", "files": files,
                                              "repository": {"id": "github.com/me/geo", "root_name": "geo"},
                                              "hyperparameters": {"steps": 2}})
    assert r.status_code == 200, r.text
    job = r.json()
    for _ in range(240):
        job = httpx.get(server.url(f"/v1/fine_tuning/jobs/{job['id']}"), headers=H1).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    assert job["status"] == "succeeded", job
    assert job["repository"]["id"] == "github.com/me/geo"

    async def go():
        c = await Client.connect(server.port)
        ready = await c.hello(api_key=K1, repository={"id": "github.com/me/geo", "root_name": "geo"})
        assert ready["origin"] == "inline-geo"
        await c.close()

    run(go())


def test_feedback_survives_restart(server):
    async def go(phase):
        c = await Client.connect(server.port)
        ready = await c.hello(api_key=K1, session_id="durable")
        if phase == 0:
            d1 = await completion(c, "d1")
            d2 = await completion(c, "d2", seed=2)
            await ws_feedback(c, "a", d1["completion_id"], "accepted")
            await c.close()
            return ready["session_id"], d1["completion_id"], d2["completion_id"]
        await c.close()

    sid, cid1, cid2 = run(go(0))
    before = stats(server, sid)["feedback"]
    base_before = stats(server, sid)["models"]
    server.stop()
    server.start()
    run(go(1))  # brings the session back
    s = stats(server, sid)
    assert s["feedback"] == before and s["models"] == base_before
    assert feedback(server, cid1, "rejected").json()["error"]["code"] == "contradictory_feedback"
    assert feedback(server, cid2, "rejected").status_code == 200  # recorded before the restart
    assert stats(server, sid)["feedback"]["rejected"] == before["rejected"] + 1


def test_python_client_and_cli_send_feedback(server, tmp_path):
    import asyncio

    from ide_client import API, AsyncSession, ProtocolError
    from tests.helpers import run_client

    async def go():
        async with AsyncSession(server.url(""), api_key=K1, reconnect=False) as s:
            status = await s.status()  # matched by its id, not by guessing
            assert status.id is not None and status.documents == {}
            done = await (await s.complete(prefix=PREFIX, max_tokens=4, seed=1, temperature=1.0)).result(60)
            ack = await s.feedback(done.completion_id, "rejected")
            assert ack.ref == "feedback" and ack.event == "rejected" and ack.adapter_version == done.adapter_version
            with pytest.raises(ProtocolError) as err:
                await s.feedback(done.completion_id, "accepted")
            assert err.value.code == "contradictory_feedback"
            return s.session_id

    sid = asyncio.run(go())
    with API(server.url(""), api_key=K1) as api:
        body = api.completion(server.base, PREFIX, max_tokens=3)
        assert api.feedback(body["id"], "accepted")["event"] == "accepted"
        assert api.session_stats(sid)["feedback"]["rejected"] == 1
    (tmp_path / "a.py").write_text("x = 1\n")
    done = run_client("complete", str(tmp_path / "a.py") + ":1:1", "--server", server.url(""), "--api-key", K1,
                      "--new-session", "--max-tokens", "3", "--accept", "--state-file", str(tmp_path / "st.json"))
    assert done.returncode == 0 and "recorded accepted" in done.stdout, done.stdout
