"""Fuzzing the websocket protocol (issue 17) against a real server: random sequences of messages built from
the protocol's ``SCHEMA`` and broken as tests/fuzz.py describes (unknown types, missing fields, stale and
future versions, ranges out of bounds or splitting a surrogate pair, binary frames, oversized frames,
invalid JSON). Every reply is a documented message or a documented protocol error, the socket stays open
unless a frame is over the transport limit (then it closes with 1009), and another client stays healthy.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from server.app.ws.protocol import _SUB_SCHEMA, SCHEMA, CompleteParams
from tests.fuzz import FUZZ, TEXT, encoded, valid, weighted
from tests.helpers import ROOT
from tests.session_server import served

LIMIT = 4096  # --max-ws-message-bytes: small, so oversized frames are cheap to send
TRANSPORT_LIMIT = 2 * LIMIT  # larger messages close the socket with 1009 (server/cli.py transport_options)
CLOSE_TOO_BIG = 1009

PROTOCOL_DOC = (ROOT / "docs" / "protocol.md").read_text()
# The error codes docs/protocol.md lists, and the message types it shows. generation_failed is the
# protocol's 500: a fuzzed message must never cause one.
ERROR_CODES = set(re.findall(r"`([a-z0-9_]+)`", PROTOCOL_DOC.partition("Codes:")[2].partition("\n\n")[0]))
ERROR_CODES.discard("generation_failed")
MESSAGE_TYPES = set(re.findall(r'"type": "([a-z_.]+)"', PROTOCOL_DOC))

# Fields narrower than their type, so that sequences reach real documents, versions and ranges.
POSITION = {"type": "object", "properties": {"line": {"type": "integer", "minimum": -1, "maximum": 3},
                                             "character": {"type": "integer", "minimum": -1, "maximum": 12}},
            "required": ["line", "character"]}
CHANGE = {"type": "object", "required": ["text"], "properties": {
    "range": {"type": "object", "properties": {"start": POSITION, "end": POSITION}, "required": ["start", "end"]},
    "text": {"type": "string"}}}
# The generation fields of a complete come from the one schema HTTP shares (server/app/params.py).
FIELDS = {
    **CompleteParams.model_json_schema()["properties"],
    "path": {"anyOf": [{"enum": ["a.py", "b.py"]}, {"type": "string"}]},
    "version": {"type": "integer", "minimum": -1, "maximum": 12},  # around the documents': stale and future
    "text": {"type": "string"},  # astral characters included, which ranges can split
    "prefix": {"type": "string"},  # not null (absent, then): the variant that gives a prefix keeps it
    "changes": {"type": "array", "items": CHANGE},
    "cursor": POSITION,
    "id": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "integer", "minimum": 0, "maximum": 9}]},
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 8},
    "protocol": {"enum": [1, 0, 2]},
    "mode": {"enum": ["block", "line", "raw", "word"]},
}
_JSON_TYPE = {str: "string", int: "integer", float: "number", dict: "object", list: "array"}


def field_schema(name: str, types: tuple) -> dict:
    if name in FIELDS:
        return FIELDS[name]
    if name in _SUB_SCHEMA:
        return {"type": "object", "properties": {k: {"type": _JSON_TYPE[t[0]]} for k, t in _SUB_SCHEMA[name].items()}}
    return {"anyOf": [{"type": _JSON_TYPE[t]} for t in types]}


def message_schema(kind: str, required: tuple[str, ...] = ()) -> dict:
    """A message type of the protocol's SCHEMA as a JSON schema (``required``: fields to always give)."""
    fields = SCHEMA[kind]
    return {"type": "object", "required": ["type", *required, *(f for f, (_, req) in fields.items() if req)],
            "properties": {"type": {"const": kind}, **{f: field_schema(f, types) for f, (types, _) in fields.items()}}}


def edit_schema(body: str) -> dict:
    """An ``edit`` with ``body`` ("text" or "changes") and not the other."""
    schema = message_schema("edit", (body,))
    del schema["properties"]["changes" if body == "text" else "text"]
    return schema


# Document messages weigh more, so sequences open, edit and complete real documents; an edit gives text or
# changes (each alone is valid; both or neither is refused, and comes from the damage tests/fuzz.py does).
WEIGHTS = {"open": 3, "edit": 0, "complete": 1}
MESSAGES = weighted(
    *[(WEIGHTS.get(kind, 1), valid(message_schema(kind), {})) for kind in sorted(SCHEMA) if WEIGHTS.get(kind, 1)],
    (2, valid(edit_schema("text"), {})), (2, valid(edit_schema("changes"), {})),
    (2, valid(message_schema("complete", ("prefix",)), {})), (1, valid(message_schema("complete", ("path", "cursor")), {})),
    (1, st.fixed_dictionaries({"type": TEXT})),
)


@st.composite
def frames(draw) -> tuple[str | bytes, int]:
    """(frame, its size in bytes): a text frame, or a binary one when the bytes are not UTF-8 or by choice."""
    what = draw(weighted((20, st.just("message")), (1, st.just("binary")), (1, st.just("oversized")),
                         (1, st.just("garbage"))))
    if what == "garbage":
        text = draw(st.text(max_size=40))
        return text, len(text.encode("utf-8", "surrogatepass"))
    if what == "oversized":  # an error reply below the transport limit, a 1009 close above it
        size = draw(st.sampled_from([LIMIT + 1, TRANSPORT_LIMIT, TRANSPORT_LIMIT + 1, 4 * TRANSPORT_LIMIT]))
        text = json.dumps({"type": "ping", "id": "x" * size})[:size]
        return text, size
    data = draw(encoded(MESSAGES))
    if what == "binary":
        return data, len(data)
    try:
        return data.decode("utf-8"), len(data)
    except UnicodeDecodeError:
        return data, len(data)


@pytest.fixture(scope="module")
def server(tiny_dir):
    yield from served(tiny_dir, ["--max-ws-message-bytes", str(LIMIT)])


class Peer:
    """A protocol client over a blocking websocket that checks every message it receives."""

    def __init__(self, port: int, session_id: str):
        self.port, self.session_id = port, session_id
        self.probes = 0
        self.open()

    def open(self) -> None:
        self.ws = connect(f"ws://127.0.0.1:{self.port}/v1/ws", max_size=None, ping_interval=None).__enter__()
        self.ws.send(json.dumps({"type": "hello", "session_id": self.session_id}))
        assert self.wait(lambda m: m["type"] in ("ready", "error"))["type"] == "ready"

    def reopen(self) -> None:
        """A fresh connection, nothing left unread (after a failure, so hypothesis replays from a clean one)."""
        self.ws.close()
        self.open()

    def receive(self) -> dict:
        msg = json.loads(self.ws.recv(timeout=60))
        assert msg.get("type") in MESSAGE_TYPES, msg
        if msg["type"] == "error":
            assert msg["code"] in ERROR_CODES, msg  # documented, and never generation_failed
        return msg

    def wait(self, done) -> dict:
        while not done(msg := self.receive()):
            pass
        return msg

    def round_trip(self) -> None:
        """Every message sent before has been handled: a ping behind them is answered."""
        self.probes += 1
        probe = f"\x00probe-{self.probes}"
        self.ws.send(json.dumps({"type": "ping", "id": probe}))
        self.wait(lambda m: m == {"type": "pong", "id": probe})


@pytest.fixture(scope="module")
def peers(server):
    fuzzed, bystander = Peer(server.port, "fuzz"), Peer(server.port, "bystander")
    yield fuzzed, bystander
    fuzzed.ws.close()
    bystander.ws.close()


def test_random_message_sequences(server, peers):
    fuzzed, bystander = peers
    closes = []

    @FUZZ
    @given(st.lists(frames(), min_size=1, max_size=6))
    def run(sequence):
        too_big = any(size > TRANSPORT_LIMIT for _, size in sequence)
        try:
            for frame, _ in sequence:
                fuzzed.ws.send(frame)
            fuzzed.round_trip()
        except ConnectionClosed as exc:
            fuzzed.reopen()
            # Only a frame past the transport limit closes the socket, with the documented code (or a reset,
            # when the server closed while much of the frame was still on its way: docs/protocol.md).
            assert too_big, f"closed ({exc.rcvd}) by {[f[:200] for f, _ in sequence]!r}"
            assert exc.rcvd is None or exc.rcvd.code == CLOSE_TOO_BIG, exc
            closes.append(exc)
        except BaseException:
            fuzzed.reopen()
            raise
        bystander.round_trip()  # another client is served all along

    run()
    assert closes, "no oversized frame was fuzzed"
    assert httpx.get(server.url("/health"), timeout=30).status_code == 200
    bystander.ws.send(json.dumps({"type": "complete", "id": "b1", "prefix": "def add(a, b):", "max_tokens": 2}))
    done = bystander.wait(lambda m: m["type"] in ("completion.done", "error") and m.get("id", m.get("ref")) == "b1")
    assert done["type"] == "completion.done", done
    fuzzed.round_trip()


# -- regressions -----------------------------------------------------------------------------------


def test_a_lone_surrogate_in_a_document_is_refused_and_changes_nothing(server):
    peer = Peer(server.port, "surrogates")
    peer.ws.send(json.dumps({"type": "open", "path": "s.py", "text": "x = 1\n", "version": 1, "id": 1}))
    assert peer.wait(lambda m: m["type"] in ("ack", "error"))["type"] == "ack"
    bad = [
        {"type": "open", "path": "s.py", "text": "x = '\ud800'\n", "version": 2},
        {"type": "edit", "path": "s.py", "text": "y = '\udc00'\n", "version": 2},
        {"type": "edit", "path": "s.py", "version": 2,
         "changes": [{"range": {"start": {"line": 0, "character": 0}, "end": {"line": 0, "character": 0}},
                      "text": "\ud83d"}]},
        {"type": "open", "path": "t\udfff.py", "text": "", "version": 1},
    ]
    for i, msg in enumerate(bad):
        peer.ws.send(json.dumps({**msg, "id": 10 + i}))  # ensure_ascii: the surrogate travels as an escape
        reply = peer.wait(lambda m: m["type"] in ("ack", "error"))
        assert (reply["type"], reply["code"], reply["ref"]) == ("error", "invalid_field", 10 + i), reply
        assert "surrogate" in reply["message"], reply
    peer.ws.send(json.dumps({"type": "status", "id": "s"}))
    status = peer.wait(lambda m: m["type"] == "status" and m.get("id") == "s")
    assert status["documents"] == {"s.py": 1}, status  # nothing opened, nothing edited
    peer.ws.close()


def test_an_oversized_message_is_refused_and_a_huge_one_closes_with_1009(server):
    peer = Peer(server.port, "oversized")
    peer.ws.send(json.dumps({"type": "ping", "id": "x" * LIMIT}))
    reply = peer.receive()
    assert (reply["type"], reply["code"]) == ("error", "message_too_large"), reply
    peer.round_trip()  # still open
    peer.ws.send(json.dumps({"type": "ping", "id": "x" * TRANSPORT_LIMIT}))
    with pytest.raises(ConnectionClosed) as closed:
        peer.receive()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == CLOSE_TOO_BIG
