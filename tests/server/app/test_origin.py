"""Browser access (server/app/middleware.py BrowserGuard): without API keys a web page must not reach the server.

A foreign Origin is refused on HTTP and on the websocket (before it is accepted, so it never joins a
session), and a foreign Host is refused (DNS rebinding). Clients that send no Origin are unaffected.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from server.app.main import create_app
from server.app.middleware import host_name, is_loopback
from server.config import Settings

EVIL = "http://evil.example"


def make_client(**settings) -> TestClient:
    app = create_app(Settings(model="base", data_dir="/nonexistent", **settings))
    return TestClient(app, base_url="http://127.0.0.1:8000")


def refused(response, code: str) -> None:
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("permission_error", code), error


def ws_pings(client: TestClient, url: str = "ws://127.0.0.1:8000/v1/ws", **headers) -> bool:
    """Whether a websocket with these headers is accepted (and answers a ping); False when it is refused."""
    try:
        with client.websocket_connect(url, headers=headers) as ws:
            ws.send_json({"type": "ping", "id": 1})
            assert ws.receive_json() == {"type": "pong", "id": 1}
            return True
    except WebSocketDisconnect as exc:
        assert exc.code == 1008, exc
        return False


# -- without API keys --------------------------------------------------------------------------------


def test_a_foreign_origin_cannot_open_the_websocket():
    client = make_client()
    assert not ws_pings(client, origin=EVIL)
    assert not ws_pings(client, origin="null")  # sandboxed frames and file:// pages
    assert not ws_pings(client, origin="http://localhost.evil.example")
    assert not ws_pings(client, origin="http://127.0.0.1.nip.io:8000")
    assert ws_pings(client)  # no Origin: the Python client, the VS Code extension


@pytest.mark.parametrize("origin", ["http://localhost:5173", "http://127.0.0.1:8000", "https://localhost",
                                    "http://[::1]:3000", "http://LOCALHOST:1"])
def test_loopback_origins_may_open_the_websocket(origin):
    assert ws_pings(make_client(), origin=origin)


def test_a_foreign_origin_is_refused_over_http():
    client = make_client()
    refused(client.get("/v1/models", headers={"origin": EVIL}), "origin_not_allowed")
    refused(client.post("/v1/completions", json={"prompt": "x"}, headers={"origin": EVIL}), "origin_not_allowed")
    assert client.get("/health", headers={"origin": "http://localhost:3000"}).status_code == 200
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "127.0.0.1.nip.io:8000",
                                  "localhost.attacker.example"])
def test_a_foreign_host_is_refused(host):
    """DNS rebinding: the page's own name now resolves to 127.0.0.1, so its requests are same-origin."""
    client = make_client()
    for path in ("/v1/models", "/v1/sessions", "/health"):
        refused(client.get(path, headers={"host": host}), "host_not_allowed")
    assert not ws_pings(client, url=f"ws://{host}/v1/ws", origin=f"http://{host}")
    assert not ws_pings(client, url=f"ws://{host}/v1/ws")


@pytest.mark.parametrize("host", ["localhost:8000", "127.0.0.1", "[::1]:8000", "127.0.0.2:9", "LocalHost"])
def test_loopback_hosts_are_served(host):
    assert make_client().get("/health", headers={"host": host}).status_code == 200


def test_allow_lists():
    client = make_client(allowed_origins=("https://Tools.Example/",), allowed_hosts=("box.local",))
    assert client.get("/health", headers={"origin": "https://tools.example"}).status_code == 200
    assert ws_pings(client, origin="https://tools.example")
    refused(client.get("/health", headers={"origin": "http://tools.example"}), "origin_not_allowed")  # scheme
    assert client.get("/health", headers={"host": "box.local:8000"}).status_code == 200
    # The browser origins given for CORS are allowed too, and "*" allows any.
    assert make_client(cors_origins=("http://app.example",)).get(
        "/health", headers={"origin": "http://app.example"}).status_code == 200
    assert ws_pings(make_client(allowed_origins=("*",)), origin=EVIL)


def test_the_bound_host_is_served():
    client = make_client(host="192.168.1.5")
    assert client.get("/health", headers={"host": "192.168.1.5:8000"}).status_code == 200
    # A page the server itself served (same origin) may use it.
    assert ws_pings(client, url="ws://192.168.1.5:8000/v1/ws", origin="http://192.168.1.5:8000")


# -- with API keys -----------------------------------------------------------------------------------


def test_with_keys_http_is_guarded_by_the_key_and_the_websocket_by_origin_too():
    client = make_client(api_keys=("k",))
    auth = {"authorization": "Bearer k"}
    assert client.get("/v1/models", headers={"host": "dynarank.example", **auth}).status_code != 403
    assert client.get("/v1/models", headers={"origin": EVIL, **auth}).status_code != 403
    assert client.get("/v1/models", headers={"origin": EVIL}).status_code == 401
    assert not ws_pings(client, origin=EVIL)
    assert ws_pings(client, url="ws://dynarank.example/v1/ws", origin="https://dynarank.example")  # same origin
    assert ws_pings(client, url="ws://dynarank.example/v1/ws")


# -- parsing -----------------------------------------------------------------------------------------


def test_host_names_and_loopback():
    assert host_name("Example.COM:8000") == "example.com"
    assert host_name("[::1]:8000") == "::1" and host_name("localhost.") == "localhost"
    assert all(map(is_loopback, ["localhost", "127.0.0.1", "127.1.2.3", "::1", "app.localhost"]))
    assert not any(map(is_loopback, ["localhost.example", "127.0.0.1.nip.io", "0.0.0.0", "10.0.0.1", ""]))
