"""The real SmolLM2-135M behind a real server, through the official `openai` client."""

from __future__ import annotations

import openai
import pytest

from tests.helpers import free_port, start_server, stop_server, wait_for_http

pytestmark = pytest.mark.real_model

KEY = "sk-real"


@pytest.fixture(scope="module")
def client(smollm2_path, tmp_path_factory):
    port = free_port()
    proc = start_server(["--model", "smollm2-135m", "--port", str(port), "--api-key", KEY,
                         "--data-dir", str(tmp_path_factory.mktemp("data"))])
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)
    finally:
        stop_server(proc)


def test_obvious_completion(client):
    out = client.completions.create(model="smollm2-135m", prompt="def add(a, b):\n    return", max_tokens=8,
                                    temperature=0, stop=["\n"])
    assert "a + b" in out.choices[0].text
    assert out.choices[0].finish_reason == "stop"
    assert out.id.startswith("cmpl-")
    assert out.usage.completion_tokens >= 3
    assert out.model_extra["adapter_version"] is None


def test_streaming_through_client(client):
    stream = client.completions.create(model="smollm2-135m", prompt="def add(a, b):\n    return", max_tokens=6,
                                       temperature=0, stream=True)
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert "a + b" in text


def test_client_errors_map_to_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smollm2-135m", prompt="x", max_tokens=100000)
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="smollm2-135m", prompt="x", max_tokens=1)
