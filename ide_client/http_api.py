"""The OpenAI-compatible HTTP API: completions, models, fine-tuning jobs, sessions.

Every endpoint is written once in ``_Endpoints`` as a call to ``self._call``;
``API`` (blocking) and ``AsyncAPI`` differ only in how ``_call`` runs it.
"""

from __future__ import annotations

import json

import httpx

from ide_client.urls import http_base

TERMINAL_JOB_STATES = ("succeeded", "failed", "cancelled")


class APIError(Exception):
    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(f"HTTP {status} {code or ''}: {message}".replace("  ", " "))
        self.status, self.code, self.message = status, code, message


def _check(response: httpx.Response):
    if response.status_code >= 400:
        try:
            err = response.json().get("error", {})
        except ValueError:
            err = {}
        raise APIError(response.status_code, err.get("code"), err.get("message") or response.text[:300])
    return response.json()


def _pick(body, key):
    return body[key] if key else body


class _Endpoints:
    def _call(self, method: str, path: str, *, json=None, params=None, pick=None):
        raise NotImplementedError

    def models(self):
        return self._call("GET", "/v1/models", pick="data")

    def completion(self, model: str, prompt: str, *, max_tokens: int = 32, suffix: str | None = None, **extra):
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, **extra}
        if suffix is not None:
            body["suffix"] = suffix
        return self._call("POST", "/v1/completions", json=body)

    def feedback(self, completion_id: str, event: str, accepted_text: str | None = None, index: int = 0):
        """``POST /v1/completions/{id}/feedback``: shown | accepted | partially_accepted | rejected."""
        body = {"event": event, **({"accepted_text": accepted_text} if accepted_text is not None else {}),
                **({"index": index} if index else {})}
        return self._call("POST", f"/v1/completions/{completion_id}/feedback", json=body)

    def session_stats(self, session_id: str):
        return self._call("GET", f"/v1/sessions/{session_id}/stats")

    def create_job(self, *, adapter_name: str, repository: dict | None = None, files: list | None = None,
                   hyperparameters: dict | None = None):
        body = {"adapter_name": adapter_name, "hyperparameters": hyperparameters or {}}
        if files is not None:
            body["files"] = files  # `repository` may then name them ({id, root_name}) for seeding sessions
        if repository is not None:
            body["repository"] = repository
        return self._call("POST", "/v1/fine_tuning/jobs", json=body)

    def jobs(self):
        return self._call("GET", "/v1/fine_tuning/jobs", pick="data")

    def job(self, job_id: str):
        return self._call("GET", f"/v1/fine_tuning/jobs/{job_id}")

    def job_events(self, job_id: str, after: int | None = None, limit: int = 100):
        params = {"limit": limit, **({"after": after} if after is not None else {})}
        return self._call("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params=params, pick="data")

    def cancel_job(self, job_id: str):
        return self._call("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel")

    def sessions(self):
        return self._call("GET", "/v1/sessions", pick="data")

    def session(self, session_id: str):
        return self._call("GET", f"/v1/sessions/{session_id}")

    def adapters(self):
        return self._call("GET", "/v1/adapters", pick="data")


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class API(_Endpoints):
    def __init__(self, server: str, api_key: str | None = None, timeout: float = 120.0):
        self.base = http_base(server)
        self.http = httpx.Client(base_url=self.base, headers=_headers(api_key), timeout=timeout)

    def _call(self, method, path, *, json=None, params=None, pick=None):
        return _pick(_check(self.http.request(method, path, json=json, params=params)), pick)

    def stream_completion(self, model: str, prompt: str, *, max_tokens: int = 32, **extra):
        """Yield text pieces of a streamed (server-sent events) completion."""
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, **extra}
        with self.http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code >= 400:
                response.read()
                _check(response)
            for line in response.iter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                for choice in json.loads(line[5:]).get("choices", []):
                    if choice.get("text"):
                        yield choice["text"]

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncAPI(_Endpoints):
    def __init__(self, server: str, api_key: str | None = None, timeout: float = 120.0):
        self.base = http_base(server)
        self.http = httpx.AsyncClient(base_url=self.base, headers=_headers(api_key), timeout=timeout)

    async def _call(self, method, path, *, json=None, params=None, pick=None):
        return _pick(_check(await self.http.request(method, path, json=json, params=params)), pick)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()
