"""/metrics is server-wide and forgets nothing it should not keep; per-session figures stay with their key.

The app in process (TestClient, lifespan not started: no worker thread) on a tiny random
Llama with two API keys. Steps go through ``AdaptationWorkers.train_session``, the path the
worker thread takes, so the metrics see exactly what a running server would report.
"""

from __future__ import annotations

import gc

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.app.auth import key_identity
from server.app.main import create_app
from server.config import Settings
from server.observability.metrics import Metrics
from server.sessions import SessionManager
from server.store import AdapterStore

KA, KB = "key-alpha", "key-bravo"
HA, HB = {"Authorization": f"Bearer {KA}"}, {"Authorization": f"Bearer {KB}"}
OA, OB = key_identity(KA), key_identity(KB)
FILE_V1 = "def area(width, height):\n    return width * height\n"
FILE_V2 = (
    "def area(width, height):\n    return width * height\n\n\n"
    "def perimeter(width, height):\n    total = 2 * (width + height)\n    return total\n"
)
# Label names a server-wide exposition may carry: none of them can name a session, a module or a key.
SERVER_WIDE_LABELS = {"endpoint", "method", "status", "scope", "event", "state", "le"}


@pytest.fixture
def app(tmp_path, tokenizer, tiny_llama):
    settings = Settings(model="tiny", data_dir=tmp_path, api_keys=(KA, KB), max_sessions=4)
    return create_app(settings, model=tiny_llama, tokenizer=tokenizer)


@pytest.fixture
def client(app):
    return TestClient(app)


def services(app):
    return app.state.dynarank.services


def train(app, session, steps: int = 1) -> None:
    """``steps`` adaptation steps of ``session`` through the worker's own code path."""
    workers = services(app).workers
    example = workers.builder.from_edit(FILE_V1, FILE_V2, path="a.py", language="python")[0]
    for _ in range(steps):
        before = session.current().version
        workers.train_session(session, example)
        assert session.current().version == before + 1, "the step should publish a new version"


def samples(client, headers=HA) -> list:
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    return [s for fam in text_string_to_metric_families(r.text) for s in fam.samples]


def series_count(client, headers=HA) -> int:
    """Series of /metrics, request latency left out (it gains a series per route the test happens to call)."""
    return sum(1 for s in samples(client, headers) if not s.name.startswith("dynarank_request_duration_seconds"))


def value(client, name: str, headers=HA, **labels) -> float:
    return next(s.value for s in samples(client, headers) if s.name == name and s.labels == labels)


def stats(client, sid: str, headers=HA):
    return client.get(f"/v1/sessions/{sid}/stats", headers=headers)


# -- /metrics holds nothing per session ------------------------------------------------------


def test_key_b_sees_nothing_of_key_a_sessions_in_metrics_or_stats(app, client):
    session, _ = services(app).sessions.attach(OA, "secret-sid", repository={"id": "r1"})
    train(app, session, 2)
    modules = list(session.current().ranks)
    text = client.get("/metrics", headers=HB).text
    assert "secret-sid" not in text and OA not in text
    assert not any(m.rsplit(".", 1)[-1] in text for m in modules), "no module name in /metrics"
    labels = {name for s in samples(client, HB) for name in s.labels}
    assert labels <= SERVER_WIDE_LABELS, labels - SERVER_WIDE_LABELS
    # The same text for both keys: nothing in it depends on who asks.
    assert {(s.name, tuple(sorted(s.labels.items()))) for s in samples(client, HA)
            if not s.name.startswith("dynarank_request_duration")} == \
        {(s.name, tuple(sorted(s.labels.items()))) for s in samples(client, HB)
         if not s.name.startswith("dynarank_request_duration")}
    # Server-wide aggregates still count A's work.
    assert value(client, "dynarank_adaptation_steps_total", HB) == 2
    assert value(client, "dynarank_adapter_swaps_total", HB) == 2
    assert value(client, "dynarank_adaptation_loss_count", HB) == 2
    assert value(client, "dynarank_sessions_resident", HB) == 1
    # B cannot read A's session figures; A can.
    assert stats(client, "secret-sid", HB).status_code == 404
    mine = stats(client, "secret-sid", HA).json()["adaptation"]
    assert mine["steps"] == 2 and mine["resident"]["steps"] == 2 and mine["resident"]["swaps"] == 2
    assert set(mine["ranks"]) == set(modules) == set(mine["resident"]["ranks"])
    assert mine["last_loss"] == pytest.approx(mine["resident"]["last_loss"]) and mine["last_loss"] > 0
    # The dashboard's data is scoped the same way.
    assert client.get("/v1/dashboard/data", headers=HB).json()["sessions"] == []
    assert [s["id"] for s in client.get("/v1/dashboard/data", headers=HA).json()["sessions"]] == ["secret-sid"]


def test_one_session_id_under_two_keys_keeps_separate_counters(app, client):
    a, _ = services(app).sessions.attach(OA, "shared")
    b, _ = services(app).sessions.attach(OB, "shared")
    assert a is not b
    train(app, a, 2)
    train(app, b, 1)
    fa = stats(client, "shared", HA).json()["adaptation"]
    fb = stats(client, "shared", HB).json()["adaptation"]
    assert (fa["steps"], fa["resident"]["steps"]) == (2, 2)
    assert (fb["steps"], fb["resident"]["steps"]) == (1, 1)
    assert fa["resident"]["last_loss"] == pytest.approx(a.last_loss)
    assert fb["resident"]["last_loss"] == pytest.approx(b.last_loss)
    assert value(client, "dynarank_adaptation_steps_total") == 3  # the server-wide sum
    dash_a = client.get("/v1/dashboard/data", headers=HA).json()["sessions"]
    dash_b = client.get("/v1/dashboard/data", headers=HB).json()["sessions"]
    assert [(s["id"], s["steps"]) for s in dash_a] == [("shared", 2)]
    assert [(s["id"], s["steps"]) for s in dash_b] == [("shared", 1)]


def test_series_do_not_grow_with_sessions_and_figures_go_with_deleted_and_evicted_sessions(app, client):
    metrics, manager = app.state.dynarank.metrics, services(app).sessions
    first, _ = manager.attach(OA, "s0")
    train(app, first)
    baseline = series_count(client)
    made = [first]
    for i in range(1, 4):  # max_sessions=4: all resident
        s, _ = manager.attach(OA if i % 2 else OB, f"s{i}")
        train(app, s)
        made.append(s)
    assert series_count(client) == baseline  # more sessions, no more series
    assert len(metrics.figures) == len(manager.sessions()) == 4

    # Deleted through the API: its figures go at once.
    assert client.delete("/v1/adapters/session-s1", headers=HA).json()["deleted"] is True
    assert len(metrics.figures) == len(manager.sessions()) == 3
    assert (OA, "s1") not in metrics.figures
    assert stats(client, "s1", HA).status_code == 404

    # Evicted (idle, over max_sessions): its figures go with it.
    for s in made:
        manager.detach(s)
    for i in range(4, 10):
        s, _ = manager.attach(OB, f"s{i}")
        train(app, s)
        manager.detach(s)
    resident = manager.sessions()
    assert len(resident) == 4
    assert sorted(metrics.figures.keys()) == sorted((s.owner, s.id) for s in resident)
    assert series_count(client) == baseline
    assert value(client, "dynarank_sessions_resident") == 4


def test_metrics_and_dashboard_data_need_a_key_and_the_page_holds_no_data(app, client):
    session, _ = services(app).sessions.attach(OA, "page-sid")
    train(app, session)
    for path in ("/metrics", "/v1/dashboard/data", "/v1/sessions/page-sid/stats"):
        assert client.get(path).status_code == 401, path
        r = client.get(path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    page = client.get("/dashboard")
    assert page.status_code == 200 and "page-sid" not in page.text  # static: the data route checks the key
    assert client.get("/metrics", headers=HA).status_code == 200


# -- the figures on their own --------------------------------------------------------------


class FakeSession:
    def __init__(self, owner, sid):
        self.owner, self.id = owner, sid


def test_figures_are_keyed_by_owner_and_ignore_sessions_that_are_gone():
    m = Metrics()
    a, b = FakeSession("key-a", "s1"), FakeSession("key-b", "s1")
    m.track_session(a)
    m.track_session(b)
    m.session_step(a, 1.5, {"q": 4})
    m.session_step(a, 1.25, {"q": 6})
    m.session_step(b, 2.0, {"q": 8})
    assert (m.figures.get(a)["steps"], m.figures.get(a)["ranks"]) == (2, {"q": 6})
    assert (m.figures.get(b)["steps"], m.figures.get(b)["last_loss"]) == (1, 2.0)
    assert b"s1" not in m.render()[0] and b"key-" not in m.render()[0]

    m.forget_session(a)
    m.session_step(a, 1.0, {"q": 2})  # a step that finished after eviction: not resurrected
    m.session_queue(a, 3)
    assert m.figures.get(a) is None and m.figures.keys() == [("key-b", "s1")]

    again = FakeSession("key-a", "s1")  # the same id resident again: a new object, fresh figures
    m.track_session(again)
    m.session_step(a, 1.0, {"q": 2})  # the old object's late step does not count for the new one
    assert m.figures.get(again)["steps"] == 0
    m.forget_session(a)  # forgetting the old object leaves the new one alone
    assert m.figures.get(again) is not None

    gone = FakeSession("key-c", "tmp")
    m.track_session(gone)
    del gone
    gc.collect()
    m.track_session(FakeSession("key-c", "other"))  # dead rows are swept when a session is tracked
    assert ("key-c", "tmp") not in m.figures
    # Server-wide counters saw every step, tracked or not.
    assert m.adaptation_steps._value.get() == 5


def test_manager_tracks_and_forgets_figures_with_residency(tmp_path, tokenizer, tiny_llama):
    settings = Settings(model="tiny", data_dir=tmp_path, max_sessions=2)
    metrics = Metrics()
    manager = SessionManager(settings, tiny_llama, tokenizer,
                             AdapterStore(settings.data_dir, settings.served_name, settings.keep_versions), metrics)
    s1, _ = manager.attach("key-a", "s1")
    manager.attach("key-b", "s1")
    assert sorted(metrics.figures.keys()) == [("key-a", "s1"), ("key-b", "s1")]
    manager.detach(s1)
    manager.attach("key-a", "s2")  # over max_sessions: idle key-a/s1 is evicted
    assert manager.get("key-a", "s1") is None
    assert sorted(metrics.figures.keys()) == [("key-a", "s2"), ("key-b", "s1")]
    assert manager.delete_session("key-b", "s1")
    assert metrics.figures.keys() == [("key-a", "s2")]
    restored, _ = manager.attach("key-a", "s1")  # resumed from disk: tracked again, from zero
    assert metrics.figures.get(restored)["steps"] == 0
    assert len(metrics.figures) == len(manager.sessions())
