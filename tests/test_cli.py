"""The `dynarank` command line and `serve` on a real port."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx

from tests.helpers import free_port, start_server, stop_server, wait_for_http


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=120)


def test_models_list_json(smollm2_path):
    result = run_cli("models", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["qwen2.5-coder-0.5b"]["default"] is True
    assert rows["smollm2-135m"]["cached"] is True


def test_models_fetch_unknown_name_fails_clearly():
    result = run_cli("models", "fetch", "no-such-model")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_models_fetch_cached_prints_path(smollm2_path):
    result = run_cli("models", "fetch", "smollm2-135m")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(smollm2_path)


def test_serve_unknown_model_exits_with_error():
    result = run_cli("serve", "--model", "no-such-model", "--port", str(free_port()))
    assert result.returncode == 1
    assert "unknown model 'no-such-model'" in result.stderr


def test_serve_answers_health_and_models_without_network(smollm2_path):
    port = free_port()
    # Any pip call would fail: the cached model must load without the registry.
    proc = start_server(["--model", "smollm2-135m", "--port", str(port)], env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""})
    try:
        health = wait_for_http(f"http://127.0.0.1:{port}/health", proc).json()
        assert health["status"] == "ok"
        listed = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert listed["object"] == "list"
        assert "smollm2-135m" in [m["id"] for m in listed["data"]]
    finally:
        stop_server(proc)
