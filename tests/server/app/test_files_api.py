"""``/v1/files`` and jobs that train on an uploaded file, end to end: a real server (two API keys, tiny model).

The official ``openai`` client drives the main path: upload, fine-tuning job,
events, then a completion from the adapter the job made.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

from server.app.auth import key_identity
from server.store import owner_hash
from tests.session_server import Server

K1, K2 = "key-one", "key-two"
H1, H2 = {"Authorization": f"Bearer {K1}"}, {"Authorization": f"Bearer {K2}"}
LIMIT = 64 * 1024  # --max-request-bytes: bounds an upload too
TRAINING = [
    {"prompt": "def area(width, height):\n    return", "completion": " width * height\n"},
    {"prompt": "def perimeter(width, height):\n    return", "completion": " 2 * (width + height)\n"},
    {"text": "def clamp(x, lo, hi):\n    return max(lo, min(x, hi))\n"},
]


def jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@pytest.fixture(scope="module")
def server(tiny_dir):
    data = Path(tempfile.mkdtemp(prefix="dynarank-files-"))
    srv = Server(tiny_dir, data, ["--api-key", K1, "--api-key", K2, "--max-request-bytes", str(LIMIT)]).start()
    yield srv
    out = srv.stop()
    shutil.rmtree(data, ignore_errors=True)
    assert "Traceback" not in out, out[-3000:]


def upload(server, content: bytes, headers=H1, purpose="fine-tune", filename="train.jsonl"):
    return httpx.post(server.url("/v1/files"), headers=headers, data={"purpose": purpose},
                      files={"file": (filename, content, "application/jsonl")}, timeout=60)


def openai_error(response, status: int, type_: str, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type_ and error["message"], error
    if code:
        assert error["code"] == code, error
    return error


def test_openai_client_uploads_a_file_trains_on_it_and_completes_with_the_adapter(server, tmp_path):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=K1, max_retries=0)
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(TRAINING))
    with path.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.object == "file" and uploaded.status == "processed"
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (path.stat().st_size, "train.jsonl", "fine-tune")
    assert client.files.retrieve(uploaded.id) == uploaded
    assert uploaded.id in [f.id for f in client.files.list()]

    # What the client sends: model and training_file, no adapter name.
    job = client.fine_tuning.jobs.create(training_file=uploaded.id, model=server.base)
    assert job.training_file == uploaded.id and job.status in ("validating_files", "queued", "running")
    deadline = time.monotonic() + 180
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"{server.base}:{uploaded.id}" and job.trained_tokens > 0

    # Events page by page (limit 2: the client follows `after` with the last event's id).
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=2))
    messages = [e.message for e in events]
    assert messages[0] == "job created" and messages[-1].startswith(f"saved adapter {uploaded.id}")
    assert len({e.id for e in events}) == len(events) > 3
    assert any(e.type == "metrics" and "loss" in e.data for e in events)

    assert job.fine_tuned_model in [m.id for m in client.models.list()]
    completion = client.completions.create(model=job.fine_tuned_model, prompt="def area(width, height):\n",
                                           max_tokens=4)
    assert completion.model == job.fine_tuned_model and completion.choices[0].finish_reason in ("length", "stop")

    # A second job under a suffix names its adapter after it.
    named = client.fine_tuning.jobs.create(training_file=uploaded.id, model=server.base, suffix="geometry")
    assert named.model_extra["adapter_name"] == "geometry"
    client.fine_tuning.jobs.cancel(named.id)

    other = openai.OpenAI(base_url=server.url("/v1"), api_key=K2, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.completions.create(model=job.fine_tuned_model, prompt="x", max_tokens=1)


@pytest.mark.parametrize("content, line", [
    (jsonl(TRAINING[:2]) + b'{"prompt": "def f(", "completion": \n' + jsonl(TRAINING[2:]), "line 3: not valid JSON"),
    (jsonl(TRAINING) + b'["def f(", "x)"]\n', "line 4: expected an object with prompt and completion, or text"),
    (jsonl([{"messages": [{"role": "user", "content": "hi"}]}]), "line 1: expected an object with prompt"),
    (jsonl(TRAINING[:1]) + b'{"text": "caf\xe9"}\n', "line 2: not UTF-8 text"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00", "binary"),
    (b"", "no examples"),
])
def test_bad_uploads_name_the_problem_and_store_nothing(server, content, line):
    before = httpx.get(server.url("/v1/files"), headers=H1).json()["data"]
    error = openai_error(upload(server, content), 400, "invalid_request_error", "invalid_file")
    assert line in error["message"] and error["param"] == "file"
    assert httpx.get(server.url("/v1/files"), headers=H1).json()["data"] == before


def test_upload_limits_and_fields(server):
    error = openai_error(upload(server, jsonl(TRAINING), purpose="assistants"), 400, "invalid_request_error",
                         "invalid_purpose")
    assert error["param"] == "purpose" and "fine-tune" in error["message"]
    missing = httpx.post(server.url("/v1/files"), headers=H1, files={"file": ("a.jsonl", jsonl(TRAINING))})
    assert openai_error(missing, 400, "invalid_request_error")["param"] == "purpose"

    big = jsonl([{"text": "x = 1\n" * 100}] * (LIMIT // 600 + 1))
    assert len(big) > LIMIT
    error = openai_error(upload(server, big), 413, "invalid_request_error", "request_too_large")
    assert str(LIMIT) in error["message"]

    # The openai client raises its own classes for these.
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=K1, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="line 1: not valid JSON"):
        client.files.create(file=("bad.jsonl", b"{nope\n"), purpose="fine-tune")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url("/v1"), api_key="wrong", max_retries=0).files.list()


def test_files_belong_to_the_key_that_uploaded_them(server):
    r = upload(server, jsonl(TRAINING))
    assert r.status_code == 200, r.text
    file_id = r.json()["id"]
    for method in ("GET", "DELETE"):
        error = openai_error(httpx.request(method, server.url(f"/v1/files/{file_id}"), headers=H2), 404,
                             "not_found_error", "file_not_found")
        assert error["param"] == "file_id"
    assert file_id not in [f["id"] for f in httpx.get(server.url("/v1/files"), headers=H2).json()["data"]]
    job = httpx.post(server.url("/v1/fine_tuning/jobs"), headers=H2, json={"training_file": file_id})
    assert "no such file of this key" in openai_error(job, 400, "invalid_request_error")["message"]
    openai_error(httpx.get(server.url(f"/v1/files/{file_id}")), 401, "authentication_error", "missing_api_key")

    # Stored under the owner's hash, never the key; no temporary files left behind.
    folder = server.data_dir / "files" / owner_hash(key_identity(K1))
    assert (folder / f"{file_id}.json").is_file() and (folder / f"{file_id}.data").read_bytes() == jsonl(TRAINING)
    assert not [p for p in (server.data_dir / "files").rglob("*") if p.name.startswith(".") or K1 in p.name]

    deleted = httpx.delete(server.url(f"/v1/files/{file_id}"), headers=H1)
    assert deleted.json() == {"id": file_id, "object": "file", "deleted": True}
    openai_error(httpx.get(server.url(f"/v1/files/{file_id}"), headers=H1), 404, "not_found_error")
    job = httpx.post(server.url("/v1/fine_tuning/jobs"), headers=H1, json={"training_file": file_id})
    openai_error(job, 400, "invalid_request_error")
    assert not (folder / f"{file_id}.data").exists()
