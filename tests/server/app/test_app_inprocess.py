"""Edge cases of the API in process (TestClient) with a fake engine and a fake adapter resolver."""

from __future__ import annotations

import dataclasses
import threading

import pytest
from fastapi.testclient import TestClient

from server.app.auth import AuthError, check_api_key
from server.app.main import create_app
from server.config import Settings
from server.engines.base import GenerationChunk
from server.engines.gate import ServingGate
from server.observability.metrics import Metrics


@dataclasses.dataclass
class Snapshot:
    version: int


class FakeEngine:
    """The Engine protocol with canned output (no model: the session layer stays off)."""

    model_name = "base"

    def __init__(self):
        self.adapters = []
        self.tokenizer = None
        self.gate = ServingGate()
        self.release = threading.Event()
        self.release.set()

    def count_tokens(self, text):
        return len(text)

    def token_text(self, token_id):
        return f"<{token_id}>"

    def attach(self, adapters):
        pass

    def close(self):
        pass

    def generate(self, request, adapter=None, cancel=None):
        self.adapters.append(adapter)
        self.release.wait(5)
        yield GenerationChunk(text="ok", token_ids=[1], logprobs=None)
        yield GenerationChunk(text="", token_ids=[], finish_reason="stop", prompt_tokens=3)


class Resolver:
    def resolve(self, model_name, api_key):
        if model_name == "base":
            return None, None
        if model_name == "base:session-1" and api_key is not None:
            return Snapshot(7), "session-1"
        raise KeyError(model_name)

    def list_for(self, api_key):
        return [{"id": "base:session-1", "object": "model", "owned_by": api_key, "parent": "base"}]


# Without API keys the server serves loopback Host names only (docs/api.md, Browser access).
LOCAL = "http://127.0.0.1"


def make_client(settings=None, engine=None, resolver=None, register=True):
    settings = settings or Settings(model="base", api_keys=("k",), data_dir="/nonexistent")
    app = create_app(settings, engine=engine or FakeEngine())
    app.state.dynarank.adapters = resolver
    return TestClient(app, headers={"Authorization": "Bearer k"}, base_url=LOCAL), app


def test_adapter_is_resolved_and_reported():
    engine = FakeEngine()
    client, _ = make_client(engine=engine, resolver=Resolver())
    out = client.post("/v1/completions", json={"model": "base:session-1", "prompt": "x"}).json()
    assert out["adapter"] == "session-1" and out["adapter_version"] == 7
    assert engine.adapters == [Snapshot(7)]
    out = client.post("/v1/completions", json={"model": "base", "prompt": "x"}).json()
    assert out["adapter"] is None and out["adapter_version"] is None
    assert client.post("/v1/completions", json={"model": "base:other", "prompt": "x"}).status_code == 404
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["base", "base:session-1"]


def test_without_resolver_only_base_model():
    client, _ = make_client()
    assert client.post("/v1/completions", json={"model": "base", "prompt": "x"}).status_code == 200
    assert client.post("/v1/completions", json={"model": "base:session-1", "prompt": "x"}).status_code == 404


def test_no_model_loaded_is_503():
    settings = Settings(model="base", data_dir="/nonexistent")
    app = create_app(settings)
    r = TestClient(app, base_url=LOCAL).post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_loaded"


def test_overload_is_429():
    engine = FakeEngine()
    engine.release.clear()
    client, app = make_client(Settings(model="base", max_inflight_requests=1, data_dir="/nonexistent"), engine)
    done = []
    t = threading.Thread(target=lambda: done.append(client.post("/v1/completions", json={"prompt": "x"})))
    t.start()
    for _ in range(200):
        if app.state.dynarank.bridge.inflight:
            break
        threading.Event().wait(0.01)
    r = client.post("/v1/completions", json={"prompt": "x"})
    engine.release.set()
    t.join(5)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert done[0].status_code == 200


def test_auth_dependency_can_be_overridden():
    from server.app.auth import require_api_key

    client, app = make_client(resolver=Resolver())
    assert TestClient(app).get("/v1/models").status_code == 401  # no key
    app.dependency_overrides[require_api_key] = lambda: "key-test"
    ids = [m["id"] for m in TestClient(app).get("/v1/models").json()["data"]]
    assert ids == ["base", "base:session-1"]


def test_session_routes_answer_503_without_a_model():
    client, _ = make_client()
    for path in ("/v1/sessions", "/v1/adapters", "/v1/fine_tuning/jobs", "/v1/dashboard/data"):
        r = client.get(path)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_loaded", path


def test_cors_only_when_configured():
    client, _ = make_client()
    r = client.options("/v1/completions", headers={"Origin": "http://x", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    client, _ = make_client(Settings(model="base", cors_origins=("http://x",), data_dir="/nonexistent"))
    r = client.options("/v1/completions", headers={"Origin": "http://x", "Access-Control-Request-Method": "POST"})
    assert r.headers["access-control-allow-origin"] == "http://x"


def test_check_api_key():
    assert check_api_key(Settings(), None) is None  # no keys: auth off
    s = Settings(api_keys=("a", "b"))
    ident = check_api_key(s, "b")
    assert ident.startswith("key-") and "b" != ident and ident == check_api_key(s, "b")
    for bad in (None, "", "c"):
        with pytest.raises(AuthError):
            check_api_key(s, bad)


def test_metrics_registries_are_per_app_and_sessions_can_be_forgotten():
    a, b = Metrics(), Metrics()
    s1 = type("FakeSession", (), {"owner": "key-a", "id": "s1"})()  # figures hold a weak reference: not a namespace
    a.track_session(s1)
    a.session_step(s1, 1.5, {"q_proj": 8})
    assert b"dynarank_adaptation_steps_total 1.0" in a.render()[0]
    assert b"dynarank_adaptation_steps_total 0.0" in b.render()[0]
    assert b"s1" not in a.render()[0] and b"q_proj" not in a.render()[0]  # per-session figures stay out
    assert a.figures.get(s1)["ranks"] == {"q_proj": 8} and b.figures.get(s1) is None
    a.forget_session(s1)
    assert a.figures.get(s1) is None and len(a.figures) == 0
