"""Typed messages of the IDE websocket protocol (protocol 1).

Incoming messages become dataclasses so callers get attributes and defaults
instead of dict lookups; fields the server adds later are ignored, not fatal.
Outgoing messages are plain dicts built by the functions at the bottom.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

PROTOCOL = 1


@dataclass
class Ready:
    session_id: str
    resume_token: str
    protocol: int = PROTOCOL
    adapter_version: int = 0
    ranks: dict[str, int] = field(default_factory=dict)
    mean_rank: float = 0.0
    model: str = ""
    documents: dict[str, int] = field(default_factory=dict)
    origin: str | None = None
    type: str = "ready"


@dataclass
class Adapted:
    version: int
    loss: float = 0.0
    ranks: dict[str, int] = field(default_factory=dict)
    mean_rank: float = 0.0
    type: str = "adapted"


@dataclass
class Status:
    version: int = 0
    queue_depth: int = 0
    dropped: int = 0
    documents: dict[str, int] | None = None
    id: str | int | None = None  # set on replies to a status request that carried an id
    type: str = "status"


@dataclass
class Dropped:
    """The session's training queue was full: ``count`` examples dropped now, ``dropped`` in all."""

    count: int = 0
    dropped: int = 0
    queue_depth: int = 0
    max_queue: int = 0
    type: str = "dropped"


@dataclass
class RolledBack:
    """The session's adapter now serves stored version ``restored_version`` again, as ``version``."""

    version: int
    restored_version: int = 0
    ranks: dict[str, int] = field(default_factory=dict)
    mean_rank: float = 0.0
    id: str | int | None = None  # set on the reply to this client's own rollback
    type: str = "rolled_back"


@dataclass
class CompletionDelta:
    id: str | int
    text: str
    type: str = "completion.delta"


@dataclass
class CompletionDone:
    id: str | int
    text: str = ""
    adapter_version: int = 0
    finish_reason: str = "stop"
    completion_id: str = ""
    model: str = ""
    confidence: dict | None = None  # {"mean_logprob", "first_token_prob"}
    hidden: bool = False  # the session's confidence gate withheld it: show nothing
    type: str = "completion.done"


@dataclass
class Ack:
    """Reply to open/edit/close/feedback messages that carried an id."""

    ref: str
    id: str | int | None = None
    path: str | None = None
    version: int | None = None
    completion_id: str | None = None
    event: str | None = None
    adapter_version: int | None = None
    type: str = "ack"


@dataclass
class Error:
    code: str
    message: str = ""
    ref: str | int | None = None
    type: str = "error"


@dataclass
class Pong:
    id: str | int | None = None
    type: str = "pong"


@dataclass
class Reconnected:
    """Not on the wire: the client's note that it resumed after a lost connection."""

    ready: Ready
    attempts: int
    type: str = "reconnected"


@dataclass
class Unknown:
    raw: dict[str, Any]
    type: str = "unknown"


Message = (Ready | Adapted | Status | Dropped | RolledBack | CompletionDelta | CompletionDone | Ack | Error | Pong
           | Reconnected | Unknown)

_BY_TYPE = {
    "ready": Ready, "adapted": Adapted, "status": Status, "dropped": Dropped, "rolled_back": RolledBack,
    "completion.delta": CompletionDelta, "completion.done": CompletionDone, "ack": Ack, "error": Error, "pong": Pong,
}


def parse(raw: dict) -> Message:
    """A decoded server message as its dataclass (Unknown for types this client does not know)."""
    cls = _BY_TYPE.get(raw.get("type")) if isinstance(raw, dict) else None
    if cls is None:
        return Unknown(raw if isinstance(raw, dict) else {"value": raw})
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in raw.items() if k in names})
    except TypeError:  # a required field is missing: keep the raw message rather than crash the reader
        return Unknown(raw)


# -- outgoing ------------------------------------------------------------------


def _drop_none(msg: dict) -> dict:
    return {k: v for k, v in msg.items() if v is not None}


def hello(*, api_key=None, session_id=None, resume_token=None, repository=None,
          client_name="dynarank-client", client_version="0.1.0") -> dict:
    return _drop_none({"type": "hello", "protocol": PROTOCOL, "api_key": api_key, "session_id": session_id,
                       "resume_token": resume_token, "repository": repository,
                       "client": {"name": client_name, "version": client_version}})


def open_document(path: str, text: str, version: int, language: str | None = None) -> dict:
    return _drop_none({"type": "open", "path": path, "text": text, "version": version, "language": language})


def edit_document(path: str, version: int, *, text: str | None = None, changes: list | None = None) -> dict:
    if (text is None) == (changes is None):
        raise ValueError("give exactly one of text or changes")
    return _drop_none({"type": "edit", "path": path, "version": version, "text": text, "changes": changes})


def close_document(path: str) -> dict:
    return {"type": "close", "path": path}


def complete(cid, *, prefix=None, suffix=None, path=None, cursor=None, max_tokens=None, temperature=None,
             top_p=None, stop=None, seed=None, mode=None) -> dict:
    if cursor is not None and not isinstance(cursor, dict):
        line, character = cursor
        cursor = {"line": line, "character": character}
    return _drop_none({"type": "complete", "id": cid, "prefix": prefix, "suffix": suffix, "path": path,
                       "cursor": cursor, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                       "stop": stop, "seed": seed, "mode": mode})


def cancel(cid) -> dict:
    return {"type": "cancel", "id": cid}


def status(sid=None) -> dict:
    return _drop_none({"type": "status", "id": sid})


FEEDBACK_EVENTS = ("shown", "accepted", "partially_accepted", "rejected")


def feedback(completion_id: str, event: str, accepted_text: str | None = None, rid=None) -> dict:
    if event not in FEEDBACK_EVENTS:
        raise ValueError(f"event must be one of {', '.join(FEEDBACK_EVENTS)}")
    return _drop_none({"type": "feedback", "completion_id": completion_id, "event": event,
                       "accepted_text": accepted_text, "id": rid})


def rollback(version: int, rid=None) -> dict:
    return _drop_none({"type": "rollback", "version": version, "id": rid})


def ping(pid=None) -> dict:
    return _drop_none({"type": "ping", "id": pid})
