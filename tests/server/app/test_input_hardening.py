"""Hostile inputs get a clear 4xx in OpenAI's error shape, never a 500 (which also drops the connection).

Lone surrogates, a vanishing top_p, deep JSON nesting (HTTP and websocket), bad repository paths,
invalid UTF-8 and out-of-range seeds; and the echoed prompt's tokens are counted off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch
from fastapi.testclient import TestClient

from server.app.main import create_app
from server.config import Settings
from server.engines.base import GenerationChunk
from server.engines.decoding import sample_token
from server.engines.gate import ServingGate
from server.json_depth import json_too_deep
from tests.conftest import build_tiny_model

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client(tokenizer, tmp_path_factory):
    model = build_tiny_model("llama", len(tokenizer))
    settings = Settings(model="tiny", data_dir=tmp_path_factory.mktemp("data"))
    app = create_app(settings, model=model, tokenizer=tokenizer)
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        yield client


def error_of(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def post_raw(client, path: str, body: str | bytes):
    """POST a body as given (httpx's json= cannot carry a lone surrogate: it encodes to UTF-8 first)."""
    return client.post(path, content=body.encode() if isinstance(body, str) else body, headers=JSON)


# -- lone surrogates ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", r'{"prompt": "def f(\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/completions", r'{"prompt": ["ok", "x\udc00y"], "max_tokens": 2}', "prompt"),
    ("/v1/completions", r'{"prompt": "x", "suffix": "\ud83d", "max_tokens": 2}', "suffix"),
    ("/v1/completions", r'{"prompt": "x", "stop": "\ud800", "max_tokens": 2}', "stop"),
    ("/v1/completions", r'{"prompt": "x", "stop": ["a", "\udfff"], "max_tokens": 2}', "stop"),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "hi \ud800"}], "max_tokens": 2}',
     "messages.0.content"),
    ("/v1/chat/completions",
     r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}], "max_tokens": 2}',
     "messages.0.content"),
])
def test_lone_surrogates_are_an_invalid_value_of_their_field(client, path, body, param):
    error = error_of(post_raw(client, path, body))
    assert (error["code"], error["param"]) == ("invalid_value", param)
    assert "surrogate" in error["message"]


def test_a_surrogate_pair_is_fine(client):
    r = post_raw(client, "/v1/completions", r'{"prompt": "emoji \ud83d\ude00", "max_tokens": 2, "temperature": 0}')
    assert r.status_code == 200, r.text


# -- sampling ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-9])
def test_a_tiny_top_p_keeps_the_top_token(top_p):
    logits = torch.tensor([0.0, 3.0, 1.0, -2.0])
    generator = torch.Generator().manual_seed(0)
    assert {sample_token(logits, 1.0, top_p, generator) for _ in range(20)} == {1}


def test_a_vanishing_temperature_is_greedy():
    logits = torch.tensor([0.0, 3.0, 1.0, -2.0])
    assert sample_token(logits, 1e-300, 1.0, torch.Generator().manual_seed(0)) == 1


@pytest.mark.parametrize("sampling", [{"top_p": 1e-300, "temperature": 1.0}, {"temperature": 1e-300}])
def test_vanishing_sampling_parameters_over_http(client, sampling):
    r = client.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 3, "seed": 1, **sampling})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("seed", [2 ** 70, -(2 ** 70), 2 ** 63], ids=["2^70", "-2^70", "2^63"])
def test_a_seed_out_of_range_is_blamed_on_seed(client, seed):
    error = error_of(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "seed": seed}))
    assert (error["code"], error["param"]) == ("invalid_value", "seed")


def test_a_seed_in_range_works(client):
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "seed": 2 ** 63 - 1, "n": 2})
    assert r.status_code == 200, r.text


# -- JSON nesting and encoding -----------------------------------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("path", ["/v1/fine_tuning/jobs", "/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("depth", [65, 50_000])
def test_deep_nesting_is_refused_before_parsing(client, path, depth):
    body = '{"hyperparameters": {"x": ' + nested(depth) + "}}"
    error = error_of(post_raw(client, path, body))
    assert error["code"] == "invalid_json" and "nest" in error["message"]


def test_nesting_inside_strings_does_not_count(client):
    prompt = "[" * 70 + "{" * 70 + '\\"]'  # an escaped quote does not end the string
    r = post_raw(client, "/v1/completions", '{"prompt": "' + prompt + '", "max_tokens": 1, "stop": ["[[[["]}')
    assert r.status_code == 200, r.text
    # Nesting up to the limit is parsed (and then judged by the endpoint as usual).
    r = post_raw(client, "/v1/completions", '{"prompt": "x", "max_tokens": 1, "user": ' + nested(60) + "}")
    assert error_of(r)["param"] == "user"


def test_a_large_body_is_checked_too(client):
    """Bodies over 256 KiB are scanned in a worker thread: same answer."""
    body = '{"prompt": "' + "x" * 300_000 + '", "user": ' + nested(100) + "}"
    assert error_of(post_raw(client, "/v1/completions", body))["code"] == "invalid_json"


def test_the_depth_scan_is_linear_and_skips_strings():
    assert json_too_deep("[" * 65 + "]" * 65) and not json_too_deep("[" * 64 + "]" * 64)
    assert not json_too_deep(json.dumps({"p": "[" * 1000 + '"' + "{" * 100, "q": ["\\" * 5, "]" * 3]}))
    assert json_too_deep('{"a": "\\\\", "b": ' + nested(70) + "}")  # the quote after an escaped backslash ends the string
    # Escaped quotes in a string that never ends once made the scan quadratic (seconds for 64 KB).
    started = time.perf_counter()
    assert json_too_deep("[" * 70 + '"' + '\\"' * 200_000)
    assert not json_too_deep('{"a": "' + '\\"' * 200_000 + "[" * 100)
    assert time.perf_counter() - started < 2


def test_invalid_utf8_has_a_code(client):
    error = error_of(post_raw(client, "/v1/completions", b'{"prompt": "caf\xe9", "max_tokens": 1}'))
    assert error["code"] in ("invalid_encoding", "invalid_json")


def test_deep_nesting_over_the_websocket_is_an_error_reply(client):
    with client.websocket_connect("ws://127.0.0.1/v1/ws") as ws:
        ws.send_text('{"type": "ping", "id": ' + nested(50_000) + "}")
        reply = ws.receive_json()
        assert reply["type"] == "error" and reply["code"] == "invalid_json", reply
        ws.send_json({"type": "ping", "id": 7})  # the socket is still usable
        assert ws.receive_json() == {"type": "pong", "id": 7}


# -- repository paths --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/tmp/a\u0000b", "/" + "a" * 100_000], ids=["nul", "100k-chars"])
def test_bad_repository_paths_are_refused(client, path):
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "repository": {"path": path}})
    error = error_of(r)
    assert (error["code"], error["param"]) == ("invalid_value", "repository.path")


def test_bad_inline_file_paths_are_refused(client):
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "adapter_name": "x",
                                                  "files": [{"path": "a\u0000.py", "text": "x = 1\n"}]})
    error = error_of(r)
    assert (error["code"], error["param"]) == ("invalid_value", "files.0.path")
    body = r'{"model": "tiny", "adapter_name": "x", "files": [{"path": "a.py", "text": "x = \ud800"}]}'
    error = error_of(post_raw(client, "/v1/fine_tuning/jobs", body))
    assert (error["code"], error["param"]) == ("invalid_value", "files.0.text") and "surrogate" in error["message"]


# -- tokenization off the event loop ----------------------------------------------------------------


class LoopSpy:
    """A tokenizer and token_text that note whether they ran on the event loop's thread."""

    def __init__(self):
        self.on_loop: list[bool] = []

    def _note(self):
        try:
            asyncio.get_running_loop()
            self.on_loop.append(True)
        except RuntimeError:
            self.on_loop.append(False)

    def __call__(self, text, add_special_tokens=False):
        self._note()
        return {"input_ids": [ord(c) for c in text]}


class SpyEngine:
    model_name = "base"

    def __init__(self):
        self.tokenizer = LoopSpy()
        self.gate = ServingGate()

    def count_tokens(self, text):
        return len(text)

    def token_text(self, token_id):
        self.tokenizer._note()
        return chr(token_id) if token_id > 31 else f"<{token_id}>"

    def attach(self, adapters):
        pass

    def close(self):
        pass

    def generate(self, request, adapter=None, cancel=None):
        yield GenerationChunk(text="ok", token_ids=[1], logprobs=[-0.5])
        yield GenerationChunk(text="", token_ids=[], logprobs=[], finish_reason="stop", prompt_tokens=3)


def test_echo_with_logprobs_tokenizes_off_the_event_loop():
    engine = SpyEngine()
    app = create_app(Settings(model="base", data_dir="/nonexistent"), engine=engine)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        r = client.post("/v1/completions", json={"prompt": "abc", "echo": True, "logprobs": 0, "max_tokens": 2})
    assert r.status_code == 200, r.text
    logprobs = r.json()["choices"][0]["logprobs"]
    assert logprobs["tokens"][:3] == ["a", "b", "c"] and logprobs["token_logprobs"][:3] == [None] * 3
    assert logprobs["text_offset"][:4] == [0, 1, 2, 3]
    assert engine.tokenizer.on_loop and not any(engine.tokenizer.on_loop), engine.tokenizer.on_loop
