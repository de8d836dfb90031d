"""Fuzzing the HTTP API (issue 17): whatever a client sends, the answer is below 500, a refusal is a 4xx in
OpenAI's error shape with a ``code``, a stream ends with ``[DONE]``, and the server stays healthy.

Bodies start from the request schemas (``CompletionRequest``, ``ChatCompletionRequest``, ``FeedbackBody``;
the fine-tuning job's fields, written out below) and are broken as tests/fuzz.py describes. Every surface
runs ``EXAMPLES`` derandomized examples against one in-process app on a tiny random model; after each,
``/health`` answers and a normal completion still succeeds.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from server.app.main import create_app
from server.app.openai import ChatCompletionRequest, CompletionRequest
from server.app.routers.feedback import FeedbackBody
from server.config import Settings
from tests.conftest import build_tiny_model
from tests.fuzz import FUZZ, HOSTILE, JSON, NUMBERS, NUMERIC_TEXT, TEXT, bodies, encoded, weighted
from tests.helpers import write_tree

JSON_TYPE = {"content-type": "application/json"}

# The fine-tuning job's body (server/adaptation/jobs.py, docs/protocol.md) as a JSON schema. Few steps: a job
# that passes every check trains on the tiny model in the background.
_HYPERPARAMETERS = {"type": "object", "properties": {
    "rank_policy": {"enum": ["fixed", "dynamicrank", "nope"]}, "steps": {"type": "integer", "minimum": 1, "maximum": 2},
    "epochs": {"type": "integer", "minimum": 1, "maximum": 2},
    "budget": {"type": "integer", "minimum": 1}, "learning_rate": {"type": "number", "minimum": 0, "maximum": 1},
    "n_epochs": {"anyOf": [{"const": "auto"}, {"type": "integer", "minimum": 1, "maximum": 2}]}}}
_FILE = {"type": "object", "properties": {"path": {"type": "string"}, "text": {"type": "string"}},
         "required": ["path", "text"]}
NAME = {"anyOf": [{"type": "string", "pattern": r"[A-Za-z0-9][A-Za-z0-9._-]{0,9}"}, {"type": "string"}]}


def job_schema(repository: str, training_file: str) -> dict:
    """The job's fields, one source of examples each; ``repository`` (a small directory) and
    ``training_file`` exist, so some jobs pass every check."""
    common = {"adapter_name": NAME, "suffix": NAME, "model": {"enum": ["tiny", "other"]},
              "hyperparameters": _HYPERPARAMETERS}
    sources = {
        "files": {"type": "array", "items": _FILE, "minItems": 1},
        "repository": {"type": "object", "properties": {
            "path": {"anyOf": [{"const": repository}, {"type": "string"}]}, "id": {"type": "string"},
            "root_name": NAME}, "required": ["path"]},
        "training_file": {"anyOf": [{"const": training_file}, {"type": "string"}]},
    }
    return {"anyOf": [{"type": "object", "properties": {name: source, **common}, "required": [name]}
                      for name, source in sources.items()]}


# Path segments and query values: the fuzzed text, cut where httpx would refuse the URL itself.
PARAM = TEXT.map(lambda text: text[:2000])
POST_ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/fine_tuning/jobs", "/v1/files",
               "/v1/completions/cmpl-x/feedback", "/v1/fine_tuning/jobs/ftjob-x/cancel"]


@pytest.fixture(scope="module")
def client(tokenizer, tmp_path_factory):
    model = build_tiny_model("llama", len(tokenizer))
    # max_tokens_limit: valid completions stay short (up to 8 choices x 3 prompts run 8 tokens at most).
    settings = Settings(model="tiny", data_dir=tmp_path_factory.mktemp("data"), max_tokens_limit=8)
    app = create_app(settings, model=model, tokenizer=tokenizer)
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def known(client, tmp_path_factory) -> dict:
    """Names that exist on the server (a session, a completion, an uploaded file), so fuzzed requests
    reach past the 404s as well."""
    with client.websocket_connect("ws://127.0.0.1/v1/ws") as ws:
        ws.send_json({"type": "hello", "session_id": "fuzz"})
        assert ws.receive_json()["type"] == "ready"
    completion = client.post("/v1/completions", json={"prompt": "def f(", "max_tokens": 2})
    assert completion.status_code == 200, completion.text
    upload = client.post("/v1/files", data={"purpose": "fine-tune"},
                         files={"file": ("t.jsonl", b'{"prompt": "def f(", "completion": "x): pass"}\n')})
    assert upload.status_code == 200, upload.text
    repository = write_tree(tmp_path_factory.mktemp("repo"), {"geometry.py": "def area(w, h):\n    return w * h\n"})
    return {"session": "fuzz", "adapter": "session-fuzz", "completion": completion.json()["id"],
            "file": upload.json()["id"], "repository": str(repository)}


def check(response) -> None:
    """Below 500; a refusal in OpenAI's error shape with a code; a stream not cut short."""
    assert response.status_code < 500, f"{response.status_code}: {response.text[:2000]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["code"], str) and error["code"] and error["message"], error
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n"), response.text[-2000:]


def assert_healthy(client) -> None:
    assert client.get("/health").status_code == 200
    r = client.post("/v1/completions", json={"prompt": "def add(a, b):", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def query_string(params: dict[str, str]) -> str:
    """``?k=v&...``, percent-encoded by hand: a lone surrogate goes as the bytes a careless client sends."""
    return "?" + "&".join(f"{k}={quote(_bytes(v), safe='')}" for k, v in params.items()) if params else ""


def post_json(client, path: str, data: bytes):
    response = client.post(path, content=data, headers=JSON_TYPE)
    check(response)
    return response


# -- completions and chat: bodies from the request models ------------------------------------------


# Some bodies pass every check and generate: the fuzzer reaches the engine, not only the validation.
MIN_GENERATED = 25


def test_completions(client):
    generated = []

    @FUZZ
    @given(encoded(bodies(CompletionRequest.model_json_schema())))
    def run(data):
        if post_json(client, "/v1/completions", data).status_code == 200:
            generated.append(data)

    run()
    assert len(generated) >= MIN_GENERATED
    assert_healthy(client)


def test_chat_completions(client):
    generated = []

    @FUZZ
    @given(encoded(bodies(ChatCompletionRequest.model_json_schema())))
    def run(data):
        if post_json(client, "/v1/chat/completions", data).status_code == 200:
            generated.append(data)

    run()
    assert len(generated) >= MIN_GENERATED
    assert_healthy(client)


# -- fine-tuning jobs, files -----------------------------------------------------------------------


def test_fine_tuning_jobs(client, known):
    job_ids = []
    ids = weighted((3, st.just("ftjob-latest")), (1, st.sampled_from(["ftjob-0", "ftjob-" + "0" * 20])), (1, PARAM))
    # Event cursors are "ftevent-N": N is fuzzed too (digits int() refuses, huge, negative, text).
    cursors = weighted((3, st.builds("ftevent-{}".format, NUMERIC_TEXT)), (1, PARAM), (1, NUMERIC_TEXT))
    queries = st.fixed_dictionaries({}, optional={"after": cursors, "limit": st.one_of(NUMERIC_TEXT, PARAM)})

    @FUZZ
    @given(encoded(bodies(job_schema(known["repository"], known["file"]))), ids, queries,
           st.sampled_from(["events", "cancel", "get"]))
    def run(data, job_id, query, action):
        r = post_json(client, "/v1/fine_tuning/jobs", data)
        if r.status_code == 200:
            job_ids.append(r.json()["id"])
        if job_id == "ftjob-latest":
            job_id = job_ids[-1] if job_ids else job_id
        path = "/v1/fine_tuning/jobs/" + quote(_bytes(job_id), safe="")
        if action == "events":
            r = client.get(path + "/events" + query_string(query))
        elif action == "cancel":
            r = client.post(path + "/cancel")
        else:
            r = client.get(path)
        check(r)
        if job_ids:  # the jobs' training would compete with the fuzzer: stop it (their records stay)
            check(client.post(f"/v1/fine_tuning/jobs/{job_ids[-1]}/cancel"))

    run()
    assert job_ids, "no fuzzed job passed validation: the strategy misses the valid shapes"
    check(client.get("/v1/fine_tuning/jobs"))
    assert_healthy(client)


def multipart(parts: list[tuple[bytes, bytes | None, bytes]], boundary: bytes = b"fuzzboundary") -> bytes:
    """A multipart/form-data body by hand: httpx would refuse to encode some of the names sent here."""
    out = b""
    for name, filename, data in parts:
        disposition = b'form-data; name="' + name + b'"' + (b'; filename="' + filename + b'"' if filename is not None else b"")
        out += b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + data + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


RECORDS = st.one_of(st.fixed_dictionaries({"prompt": TEXT, "completion": TEXT}), st.fixed_dictionaries({"text": TEXT}),
                    HOSTILE)
LINES = st.lists(encoded(RECORDS), max_size=4).map(b"\n".join)
UPLOADS = st.lists(st.tuples(st.sampled_from([b"file", b"purpose", b"other"]),
                             st.one_of(st.none(), TEXT.map(_bytes), st.just(b"t.jsonl")),
                             st.one_of(LINES, st.just(b"fine-tune"), st.binary(max_size=64), TEXT.map(_bytes))),
                   max_size=4)
CONTENT_TYPES = st.sampled_from(["multipart/form-data; boundary=fuzzboundary", "multipart/form-data",
                                 "multipart/form-data; boundary=other", "application/json", "text/plain", ""])


def test_files(client, known):
    @FUZZ
    @given(UPLOADS, CONTENT_TYPES, st.one_of(st.just(known["file"]), PARAM), st.one_of(st.none(), PARAM))
    def run(parts, content_type, file_id, purpose):
        check(client.post("/v1/files", content=multipart(parts), headers={"content-type": content_type}))
        path = "/v1/files/" + quote(_bytes(file_id), safe="")
        check(client.get(path))
        check(client.get("/v1/files" + query_string({} if purpose is None else {"purpose": purpose})))
        if file_id != known["file"]:  # the known file stays for the jobs that use it
            check(client.delete(path))

    run()
    assert_healthy(client)


# -- sessions, adapters, feedback: names in the path, and feedback bodies --------------------------


def test_named_resources(client, known):
    names = st.one_of(st.sampled_from([known["session"], known["adapter"], known["completion"], "session-x"]), PARAM)
    feedback = encoded(bodies(FeedbackBody.model_json_schema()) | st.fixed_dictionaries(
        {"event": st.sampled_from(["accepted", "rejected", "shown", "dismissed"])},
        optional={"accepted_text": TEXT, "index": NUMBERS}))
    actions = st.sampled_from(["session", "stats", "delete_adapter", "download", "feedback"])

    @FUZZ
    @given(actions, names, st.one_of(st.none(), NUMERIC_TEXT, PARAM), feedback)
    def run(action, name, version, body):
        segment = quote(_bytes(name), safe="")
        if action == "session":
            r = client.get(f"/v1/sessions/{segment}")
        elif action == "stats":
            r = client.get(f"/v1/sessions/{segment}/stats")
        elif action == "delete_adapter":
            if name == known["adapter"]:
                return  # keep the session the other examples use
            r = client.delete(f"/v1/adapters/{segment}")
        elif action == "download":
            r = client.get(f"/v1/adapters/{segment}/download" + query_string({} if version is None else {"version": version}))
        else:
            r = client.post(f"/v1/completions/{segment}/feedback", content=body, headers=JSON_TYPE)
        check(r)

    run()
    for path in ("/v1/sessions", "/v1/adapters", "/v1/models"):
        check(client.get(path))
    assert_healthy(client)


# -- anything at all: raw bytes and content types to every route that takes a body ----------------


RAW_LITERALS = [b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", b'{"prompt": "x", "temperature": 1e999}',
                b'{"prompt": "x", "max_tokens": -0}', b'{"prompt": "x", "top_p": NaN}', b"[" * 100_000,
                b'{"prompt": "x", "prompt": ["a"]}', b"\xef\xbb\xbf{}", b'"\\ud800"', b"{" + b'"a":{' * 70]


def test_raw_bodies(client):
    bodies_ = st.one_of(st.binary(max_size=256), st.sampled_from(RAW_LITERALS), encoded(JSON))
    content_types = st.one_of(st.sampled_from(["application/json", "application/json; charset=latin-1",
                                               "application/vnd.api+json", "text/plain",
                                               "application/x-www-form-urlencoded", "multipart/form-data"]),
                              st.none(), st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30))

    @FUZZ
    @given(st.sampled_from(POST_ROUTES), bodies_, content_types, st.sampled_from(["POST", "PUT", "PATCH"]))
    def run(route, data, content_type, method):
        headers = {} if content_type is None else {"content-type": content_type}
        check(client.request(method, route, content=data, headers=headers))

    run()
    assert_healthy(client)


# -- regressions: the 5xx the fuzzers found ---------------------------------------------------------


def test_an_event_cursor_in_digits_int_refuses_is_a_400(client, known):
    jobs = client.get("/v1/fine_tuning/jobs").json()["data"]
    if not jobs:
        created = client.post("/v1/fine_tuning/jobs", json={"training_file": known["file"], "adapter_name": "cursor"})
        assert created.status_code == 200, created.text
        jobs = [created.json()]
    r = client.get(f"/v1/fine_tuning/jobs/{jobs[0]['id']}/events" + query_string({"after": "ftevent-\u00b2"}))
    assert r.status_code == 400, r.text  # "²".isdigit(), but int("²") raises: it was a 500
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("invalid_value", "after")


@pytest.mark.parametrize("field, value", [("root_name", 5), ("id", ["x"])])
def test_a_repository_name_that_is_not_a_string_is_a_400(client, known, field, value):
    # A root_name of 5 was a 500 (the adapter name is derived from it); an id of ["x"] was stored as given.
    r = client.post("/v1/fine_tuning/jobs", json={"repository": {"path": known["repository"], field: value}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == f"repository.{field}"
