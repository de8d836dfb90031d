"""One schema for the generation fields: the websocket's ``complete`` refuses what ``/v1/completions`` refuses.

Each bad value is sent both ways to one in-process app (tiny model): HTTP answers 400 naming the field
(``param``), the websocket an ``error`` for the completion's id whose code is the protocol's name for the
same fault and whose message names the field; nothing is generated, and the socket goes on working.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from server.app.main import create_app
from server.app.openai import CompletionRequest
from server.app.params import GenerationParams
from server.app.ws.protocol import CompleteParams
from server.config import Settings
from tests.conftest import build_tiny_model

# HTTP's code for a refused field -> the websocket protocol's code for the same fault.
WS_CODE = {"invalid_value": "invalid_field", "unknown_parameter": "unknown_field"}
HTTP_BASE = {"prompt": "def f(x):", "max_tokens": 2}
WS_BASE = {"type": "complete", "id": "c1", "prefix": "def f(x):", "max_tokens": 2}

# (id, fields for both, or (HTTP fields, websocket fields), HTTP code, HTTP param, websocket field named)
CASES = [
    ("top_p=5", {"top_p": 5}, "invalid_value", "top_p", "top_p"),
    ("top_p=-1", {"top_p": -1}, "invalid_value", "top_p", "top_p"),
    ("top_p=0", {"top_p": 0}, "invalid_value", "top_p", "top_p"),
    ("temperature=2.5", {"temperature": 2.5}, "invalid_value", "temperature", "temperature"),
    ("1000-stops", {"stop": [f"s{i}" for i in range(1000)]}, "invalid_value", "stop", "stop"),
    ("17-stops", {"stop": [f"s{i}" for i in range(17)]}, "invalid_value", "stop", "stop"),
    ("unknown-field", {"line": True}, "unknown_parameter", "line", "line"),
    ("surrogate-prefix", ({"prompt": "def f(\ud800"}, {"prefix": "def f(\ud800"}), "invalid_value", "prompt",
     "prefix"),
    ("surrogate-suffix", {"suffix": "\udc00 return x"}, "invalid_value", "suffix", "suffix"),
    ("surrogate-stop", {"stop": ["a", "\udfff"]}, "invalid_value", "stop", "stop"),
    ("surrogate-stop-str", {"stop": "\ud83d"}, "invalid_value", "stop", "stop"),
    ("seed=2^70", {"seed": 2 ** 70}, "invalid_value", "seed", "seed"),
    ("seed=-2^70", {"seed": -(2 ** 70)}, "invalid_value", "seed", "seed"),
    ("seed=2^63", {"seed": 2 ** 63}, "invalid_value", "seed", "seed"),
    ("max_tokens=0", {"max_tokens": 0}, "invalid_value", "max_tokens", "max_tokens"),
    ("max_tokens=-3", {"max_tokens": -3}, "invalid_value", "max_tokens", "max_tokens"),
    ("max_tokens-over-limit", {"max_tokens": 10 ** 6}, "invalid_value", "max_tokens", "max_tokens"),
]


@pytest.fixture(scope="module")
def client(tokenizer, tmp_path_factory):
    model = build_tiny_model("llama", len(tokenizer))
    app = create_app(Settings(model="tiny", data_dir=tmp_path_factory.mktemp("data")), model=model,
                     tokenizer=tokenizer)
    # Keyless: the Host check wants a loopback name.
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        yield client


def as_json(body: dict) -> str:
    """JSON with \\u escapes (ensure_ascii), so a lone surrogate travels as the probe sent it."""
    return json.dumps(body)


def post(client, body: dict):
    return client.post("/v1/completions", content=as_json(body).encode(),
                       headers={"content-type": "application/json"})


def receive(ws) -> dict:
    """The next reply, skipping session pushes."""
    while (msg := ws.receive_json())["type"] in ("status", "adapted"):
        pass
    return msg


def ready(ws) -> None:
    ws.send_json({"type": "hello"})
    assert receive(ws)["type"] == "ready"


def fields_of(case_fields) -> tuple[dict, dict]:
    return case_fields if isinstance(case_fields, tuple) else (case_fields, case_fields)


@pytest.mark.parametrize("fields, http_code, http_param, ws_field", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_http_and_websocket_refuse_the_same_fields(client, fields, http_code, http_param, ws_field):
    http_fields, ws_fields = fields_of(fields)

    r = post(client, {**HTTP_BASE, **http_fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == (http_code, http_param), error
    assert http_param in error["message"]

    with client.websocket_connect("ws://127.0.0.1/v1/ws") as ws:
        ready(ws)
        ws.send_text(as_json({**WS_BASE, **ws_fields}))
        reply = receive(ws)
        assert reply["type"] == "error", reply  # not a completion, nor generation_failed
        assert reply["code"] == WS_CODE[http_code] and reply["ref"] == "c1", reply
        assert ws_field in reply["message"] and reply["message"].startswith("complete"), reply
        ws.send_json({"type": "ping", "id": 7})  # the connection is still usable
        assert receive(ws) == {"type": "pong", "id": 7}
        # ... and the same id completes once the value is fixed: nothing was left in flight.
        ws.send_json({**WS_BASE, "temperature": 0})
        while (done := receive(ws))["type"] == "completion.delta":
            pass
        assert done["type"] == "completion.done" and done["id"] == "c1", done


def test_the_edges_of_every_range_are_accepted_by_both(client):
    """Valid requests are unchanged: the limits themselves (and a surrogate pair) pass both ways."""
    edges = {"top_p": 1e-9, "temperature": 2, "seed": 2 ** 63 - 1, "stop": [f"s{i}" for i in range(16)],
             "max_tokens": 1, "suffix": "\n\U0001F600"}
    for extra in (edges, {"top_p": 1, "temperature": 0, "seed": -(2 ** 63), "stop": "", "max_tokens": 8}):
        r = post(client, {**HTTP_BASE, **extra, "prompt": "emoji \U0001F600 def f("})
        assert r.status_code == 200, r.text
        with client.websocket_connect("ws://127.0.0.1/v1/ws") as ws:
            ready(ws)
            ws.send_text(as_json({**WS_BASE, **extra, "prefix": "emoji \U0001F600 def f("}))
            while (done := receive(ws))["type"] == "completion.delta":
                pass
            assert done["type"] == "completion.done", done


def test_a_lone_surrogate_in_a_document_is_refused_at_open(client):
    """A document is held to the rule a sent prefix is: it is not opened, so no completion reads it."""
    with client.websocket_connect("ws://127.0.0.1/v1/ws") as ws:
        ready(ws)
        ws.send_text(as_json({"type": "open", "path": "a.py", "text": "x = '\ud800'\ny = ", "version": 1, "id": 1}))
        reply = receive(ws)
        assert (reply["type"], reply["code"], reply["ref"]) == ("error", "invalid_field", 1), reply
        assert "text" in reply["message"] and "surrogate" in reply["message"]
        ws.send_json({"type": "complete", "id": "d1", "path": "a.py", "cursor": {"line": 1, "character": 4}})
        reply = receive(ws)
        assert (reply["type"], reply["code"], reply["ref"]) == ("error", "unknown_document", "d1"), reply
        ws.send_json({"type": "ping", "id": 8})
        assert receive(ws) == {"type": "pong", "id": 8}


def test_the_shared_fields_are_declared_once():
    """HTTP's request and the websocket's ``complete`` take the shared fields from one model (one schema)."""
    assert issubclass(CompletionRequest, GenerationParams) and issubclass(CompleteParams, GenerationParams)
    for name in ("temperature", "top_p", "stop", "seed", "max_tokens"):
        http, ws = CompletionRequest.model_fields[name], CompleteParams.model_fields[name]
        assert (http.annotation, http.metadata) == (ws.annotation, ws.metadata), name
