"""One generation bridge: HTTP and the websocket give the same tokens, errors and metrics.

A real app (TestClient, lifespan included) over a tiny random Llama with the
real SmolLM2 tokenizer and the hf engine.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.engines.base import GenerationRequest

PROMPT = "def add(a, b):\n    return"
# Without API keys the server serves loopback Host names only (docs/api.md, Browser access).
LOCAL, WS = "http://127.0.0.1", "ws://127.0.0.1/v1/ws"


@pytest.fixture
def app(tiny_llama, tokenizer, tmp_path):
    settings = Settings(model="tiny", data_dir=tmp_path, max_inflight_requests=1)
    return create_app(settings, model=tiny_llama, tokenizer=tokenizer)


def _metric(app, name: str, labels: dict | None = None) -> float:
    return app.state.dynarank.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def _ws_complete(ws, **fields) -> dict:
    """Send one `complete` and return its final message (`completion.done` or `error`)."""
    ws.send_json({"type": "complete", "id": "c1", **fields})
    while True:
        msg = ws.receive_json()
        if msg.get("type") in ("completion.done", "error") and msg.get("id", msg.get("ref")) == "c1":
            return msg


def _hello(ws) -> dict:
    ws.send_json({"type": "hello"})
    ready = ws.receive_json()
    assert ready["type"] == "ready", ready
    return ready


def test_http_and_websocket_give_the_same_tokens_and_metrics(app):
    with TestClient(app, base_url=LOCAL) as client, client.websocket_connect(WS) as ws:
        ready = _hello(ws)
        done = _ws_complete(ws, prefix=PROMPT, max_tokens=8)
        assert done["type"] == "completion.done", done
        tokens_after_ws = _metric(app, "dynarank_generated_tokens_total")

        r = client.post("/v1/completions", json={"model": ready["model"], "prompt": PROMPT, "max_tokens": 8,
                                                  "temperature": 0, "mode": "block"})  # the websocket's default
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]

        # Same snapshot, same greedy request: the same text and the same stop reason.
        assert choice["text"] == done["text"] and choice["text"]
        assert choice["finish_reason"] == done["finish_reason"]
        assert r.json()["adapter_version"] == done["adapter_version"]
        # Both were counted by the one bridge, under their own endpoint, with the same token count.
        for endpoint in ("/v1/ws", "/v1/completions"):
            assert _metric(app, "dynarank_completion_duration_seconds_count", {"endpoint": endpoint}) == 1
            assert _metric(app, "dynarank_time_to_first_token_seconds_count", {"endpoint": endpoint}) == 1
        generated = r.json()["usage"]["completion_tokens"]
        assert generated > 0 and tokens_after_ws == generated
        assert _metric(app, "dynarank_generated_tokens_total") == 2 * generated
        assert _metric(app, "dynarank_inflight_completions") == 0


def test_http_and_websocket_report_the_same_errors(app):
    too_long = "x " * 2000  # the tiny model's context is 512 tokens
    with TestClient(app, base_url=LOCAL) as client, client.websocket_connect(WS) as ws:
        _hello(ws)
        # A prompt past the context: HTTP refuses it (as OpenAI), the websocket's code completion cuts it to fit
        # (docs/protocol.md); the one bridge runs both.
        ws_done = _ws_complete(ws, prefix=too_long, max_tokens=4)
        r = client.post("/v1/completions", json={"prompt": too_long, "max_tokens": 4})
        assert ws_done["type"] == "completion.done" and r.status_code == 400
        assert r.json()["error"]["code"] == "context_length_exceeded"

        # Admission control holds for both paths: with the one slot taken, both are refused.
        bridge = app.state.dynarank.bridge
        held = bridge.start("test", [GenerationRequest(prompt="x")], None, model_name="tiny")
        try:
            ws_busy = _ws_complete(ws, prefix=PROMPT, max_tokens=4)
            r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
        finally:
            held.close()
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert ws_busy["type"] == "error" and ws_busy["code"] == r.json()["error"]["code"] == "too_many_requests"
        assert bridge.inflight == 0
        # Refused requests never reached the engine, so they add no completion metrics.
        assert _metric(app, "dynarank_completion_duration_seconds_count", {"endpoint": "/v1/ws"}) == 1
        assert _metric(app, "dynarank_completion_duration_seconds_count", {"endpoint": "/v1/completions"}) == 1


def test_a_failed_generation_gives_its_slot_back_before_the_handler_hears_of_it(monkeypatch):
    """A client that retries at once after an error must not be refused as busy by its own ended
    request: the generation thread releases the slot before its error reaches the handler."""
    import asyncio
    import threading
    import time

    from server.engines.bridge import Generation, GenerationBridge
    from server.errors import ClientError

    class FailingEngine:
        def generate(self, request, adapter=None, cancel=None):
            raise ValueError("the prompt is empty after tokenization")
            yield  # a generator, as engines are

    unhold = Generation._unhold

    def slow_unhold(self):  # the generation thread (not the handler's close()), descheduled on a loaded machine
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.3)
        unhold(self)

    monkeypatch.setattr(Generation, "_unhold", slow_unhold)
    bridge = GenerationBridge(FailingEngine(), max_inflight=1)

    async def fail_then_retry():
        gen = bridge.start("test", [GenerationRequest(prompt="x")], None, model_name="tiny")
        with pytest.raises(ClientError):
            await gen.run()
        gen.close()
        return bridge.start("test", [GenerationRequest(prompt="x")], None, model_name="tiny")

    retry = asyncio.run(fail_then_retry())
    retry.close()
    assert bridge.wait_idle(timeout=5)
