"""Completions as an editor receives them, on the default model, through the real app.

The `openai` client over HTTP and the VS Code extension's websocket messages, at
an indented cursor and in a fill-in-the-middle gap (the cases of issue 14).
"""

from __future__ import annotations

import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.config import Settings

ADD = "def add(a, b):\n    "
IS_EVEN_PREFIX, IS_EVEN_SUFFIX = "def is_even(n):\n    ", "\n\nprint(is_even(4))\n"


@pytest.fixture(scope="module")
def client(qwen_coder, tmp_path_factory):
    model, tokenizer = qwen_coder
    settings = Settings(model="qwen2.5-coder-0.5b", data_dir=tmp_path_factory.mktemp("data"))
    # A loopback address: without API keys the server refuses other Host names (docs/api.md, Browser access).
    with TestClient(create_app(settings, model=model, tokenizer=tokenizer), base_url="http://127.0.0.1") as client:
        yield client


@pytest.fixture(scope="module")
def oai(client):
    return openai.OpenAI(base_url="http://127.0.0.1/v1", api_key="unused", http_client=client)


def test_openai_completion_at_an_indented_line_starts_at_the_cursor(oai):
    out = oai.completions.create(model="qwen2.5-coder-0.5b", prompt=ADD, max_tokens=16, temperature=0)
    text = out.choices[0].text
    assert text.startswith("return a + b"), text
    conf = out.choices[0].model_extra["confidence"]
    assert conf["mean_logprob"] < 0 and 0 < conf["first_token_prob"] <= 1


def test_openai_fim_stops_before_repeating_the_suffix(oai):
    out = oai.completions.create(model="qwen2.5-coder-0.5b", prompt=IS_EVEN_PREFIX, suffix=IS_EVEN_SUFFIX,
                                 max_tokens=32, temperature=0)
    text = out.choices[0].text
    assert text.strip() == "return n % 2 == 0", text
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens < 32


def test_trim_false_gives_the_raw_generation(oai):
    out = oai.completions.create(model="qwen2.5-coder-0.5b", prompt=ADD, max_tokens=6, temperature=0,
                                 extra_body={"trim": False})
    assert out.choices[0].text.startswith(" return"), out.choices[0].text  # the boundary bug, on request


def test_line_mode_over_http(oai):
    out = oai.completions.create(model="qwen2.5-coder-0.5b", prompt=ADD, max_tokens=24, temperature=0,
                                 extra_body={"mode": "line"})
    assert out.choices[0].text == "return a + b"


def test_websocket_completion_at_an_indented_cursor_is_one_block(client):
    document = "def add(a, b):\n    \n\ndef main():\n    print(add(1, 2))\n"
    with client.websocket_connect("ws://127.0.0.1/v1/ws") as ws:
        ws.send_json({"type": "hello", "client": {"name": "vscode", "version": "test"}})
        assert ws.receive_json()["type"] == "ready"
        ws.send_json({"type": "open", "path": "calc.py", "text": document, "version": 1, "id": 1})
        assert ws.receive_json()["type"] == "ack"
        ws.send_json({"type": "complete", "id": "c1", "path": "calc.py", "cursor": {"line": 1, "character": 4}})
        while (done := ws.receive_json())["type"] != "completion.done":
            assert done["type"] in ("completion.delta", "status", "adapted"), done
    assert done["text"] == "return a + b", done
    assert done["confidence"]["first_token_prob"] > 0


def test_the_session_gate_marks_unlikely_suggestions_hidden_and_counts_them(client):
    with client.websocket_connect("ws://127.0.0.1/v1/ws") as ws:
        ws.send_json({"type": "hello"})
        ready = ws.receive_json()
        session = client.app.state.dynarank.services.sessions.get(None, ready["session_id"])

        def complete(cid):
            ws.send_json({"type": "complete", "id": cid, "prefix": ADD, "max_tokens": 8})
            while (msg := ws.receive_json())["type"] != "completion.done":
                pass
            return msg

        assert complete("shown")["hidden"] is False  # a new gate shows a confident suggestion
        gate = session.feedback.gate
        gate.weights, gate.updates = [-10.0, 0.0, 0.0], 50  # as if this session had rejected everything so far
        hidden = complete("hidden")
        assert hidden["hidden"] is True and hidden["text"] == "return a + b"
    stats = client.get(f"/v1/sessions/{ready['session_id']}/stats").json()["feedback"]
    assert stats["hidden"] == 1 and stats["completions"] == 2
    # /metrics sums every session's books (no session label); this module's other sessions hid nothing.
    hidden_counts = [s.value for family in text_string_to_metric_families(client.get("/metrics").text)
                     for s in family.samples if s.name == "dynarank_completion_feedback_total"
                     and s.labels == {"scope": "session", "event": "hidden"}]
    assert hidden_counts == [1.0]
