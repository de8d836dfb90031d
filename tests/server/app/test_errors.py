"""server/app/errors.py: every failure in OpenAI's error shape, with the type that matches its status."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from server.app.auth import AuthError
from server.app.errors import APIError, install_error_handlers
from server.app.middleware import install_middleware
from server.config import Settings
from server.errors import ClientError
from server.observability.metrics import Metrics


class Body(BaseModel):
    n: int


def make_app() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    install_middleware(app, Settings(model="base", data_dir="/nonexistent", max_request_bytes=100), Metrics())

    @app.get("/api/{status}")
    def api_error(status: int):
        raise APIError(status, f"status {status}", code=f"code_{status}")

    @app.get("/client/{code}")
    def client_error(code: str):
        raise ClientError(code, f"client error {code}")

    @app.get("/auth")
    def auth():
        raise AuthError("Incorrect API key provided.", "invalid_api_key")

    @app.post("/body")
    def body(b: Body):
        return b

    @app.get("/bug")
    def bug():
        raise RuntimeError("boom")

    return TestClient(app, raise_server_exceptions=False, base_url="http://127.0.0.1")  # no keys: a loopback Host


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("status, type_", [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (409, "conflict_error"), (413, "invalid_request_error"),
    (422, "invalid_request_error"), (429, "rate_limit_error"), (500, "server_error"), (503, "server_error"),
])
def test_type_matches_the_status(status, type_):
    assert error_of(make_app().get(f"/api/{status}"), status)["type"] == type_


@pytest.mark.parametrize("code, status, type_", [
    ("contradictory_feedback", 409, "conflict_error"), ("duplicate_feedback", 409, "conflict_error"),
    ("unknown_completion", 404, "not_found_error"), ("session_not_found", 404, "not_found_error"),
    ("unauthorized", 401, "authentication_error"), ("too_many_requests", 429, "rate_limit_error"),
    ("invalid_feedback", 400, "invalid_request_error"),
])
def test_client_errors_of_the_lower_layers(code, status, type_):
    error = error_of(make_app().get(f"/client/{code}"), status)
    assert (error["type"], error["code"]) == (type_, code)


def test_framework_errors_have_the_same_shape():
    client = make_app()
    assert error_of(client.get("/auth"), 401)["type"] == "authentication_error"
    assert error_of(client.get("/nowhere"), 404)["type"] == "not_found_error"
    assert error_of(client.delete("/auth"), 405)["type"] == "invalid_request_error"
    assert error_of(client.post("/body", json={"n": "x"}), 400)["param"] == "n"
    assert error_of(client.post("/body", content=b"{no", headers={"Content-Type": "application/json"}), 400)["code"] == "invalid_json"
    too_big = error_of(client.post("/body", content=b"x" * 101), 413)
    assert (too_big["type"], too_big["code"]) == ("invalid_request_error", "request_too_large")
    bug = error_of(client.get("/bug"), 500)
    assert bug["type"] == "server_error" and "boom" not in bug["message"]


@pytest.mark.parametrize("body, param, words", [
    ({"stop": 5}, "stop", ("valid string", "valid list")),  # fits no member of str | list[str]: both named
    ({"stop": ["a", 3]}, "stop.1", ("valid string",)),  # the list member got furthest: its item is named
    ({"seed": 1.5}, "seed", ("integer",)),
])
def test_refusal_names_the_request_field_not_pydantic_union_tags(body, param, words):
    from pydantic import ValidationError

    from server.app.params import GenerationParams, refusal

    with pytest.raises(ValidationError) as caught:
        GenerationParams(**body)
    error = refusal(caught.value.errors())
    assert error.param == param and error.code == "invalid_value"
    assert error.message.startswith(f"{param}: ") and all(w in error.message for w in words)
