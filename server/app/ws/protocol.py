"""The websocket protocol's messages (protocol 1; docs/protocol.md): schema and validation."""

from __future__ import annotations

import re

from server.errors import ClientError

PROTOCOL = 1
CLOSE_UNAUTHORIZED = 4401
MAX_PREFIX_CHARS = 8000
MAX_SUFFIX_CHARS = 2000
MAX_PATH_CHARS = 1024
COMPLETION_MODES = ("block", "line", "raw")  # raw: the model's text as generated (no healing, no shaping)

_STR, _INT, _NUM, _DICT, _LIST = (str,), (int,), (int, float), (dict,), (list,)
_ID = (str, int)
_OPT = False
_REQ = True

# type -> {field: (accepted types, required)}; "type" itself is implicit.
SCHEMA: dict[str, dict[str, tuple]] = {
    "hello": {"api_key": (_STR, _OPT), "client": (_DICT, _OPT), "repository": (_DICT, _OPT),
              "session_id": (_STR, _OPT), "resume_token": (_STR, _OPT), "protocol": (_INT, _OPT)},
    # An optional `id` on open/edit/close/status asks for a reply carrying it (ack / status).
    "open": {"path": (_STR, _REQ), "language": (_STR, _OPT), "text": (_STR, _REQ), "version": (_INT, _REQ),
             "id": (_ID, _OPT)},
    "edit": {"path": (_STR, _REQ), "version": (_INT, _REQ), "text": (_STR, _OPT), "changes": (_LIST, _OPT),
             "id": (_ID, _OPT)},
    "close": {"path": (_STR, _REQ), "id": (_ID, _OPT)},
    "complete": {"id": (_ID, _REQ), "path": (_STR, _OPT), "prefix": (_STR, _OPT), "suffix": (_STR, _OPT),
                 "cursor": (_DICT, _OPT), "max_tokens": (_INT, _OPT), "temperature": (_NUM, _OPT),
                 "top_p": (_NUM, _OPT), "stop": ((str, list), _OPT), "seed": (_INT, _OPT), "mode": (_STR, _OPT)},
    "cancel": {"id": (_ID, _REQ)},
    "status": {"id": (_ID, _OPT)},
    "feedback": {"completion_id": (_STR, _REQ), "event": (_STR, _REQ), "accepted_text": (_STR, _OPT),
                 "id": (_ID, _OPT)},
    "ping": {"id": (_ID, _OPT)},
}
_SUB_SCHEMA = {
    "client": {"name": _STR, "version": _STR},
    "repository": {"id": _STR, "root_name": _STR},
    "cursor": {"line": _INT, "character": _INT},
}




# JSON nested deeper than this is refused before it is parsed (websocket messages and HTTP bodies alike):
# json.loads recurses once per level, so a deep enough document ends in RecursionError.
MAX_JSON_DEPTH = 64
# A string to its closing quote, or to the end when unterminated: the match never fails, so no backtracking.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\[\s\S]?[^"\\]*)*"?')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``text`` opens more than ``limit`` arrays/objects inside one another (strings do not count).

    A cheap scan of the raw text, meant to run before ``json.loads``: a count first (most documents have
    fewer brackets than the limit), then the brackets outside strings only, stopping at the first too deep.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for ch in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        if ch == "[" or ch == "{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def check_json_depth(text: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise ``ClientError("invalid_json")`` for text nested deeper than ``limit``."""
    if json_too_deep(text, limit):
        raise ClientError("invalid_json", f"the JSON is nested deeper than {limit} levels")


def _typed(value, types) -> bool:
    if isinstance(value, bool):  # bool is an int in Python, never in this protocol
        return bool in types
    return isinstance(value, types)



def _without_nulls(msg: dict) -> dict:
    """A copy where a null field (or sub-field) is absent, as JSON clients often send optional ones."""
    return {k: _without_nulls(v) if isinstance(v, dict) and k in _SUB_SCHEMA else v
            for k, v in msg.items() if v is not None}


def validate(msg) -> dict:
    """Check one decoded message against SCHEMA; return it with null fields dropped.

    Raises ClientError on any mismatch. The handlers read only the returned copy.
    """
    if not isinstance(msg, dict):
        raise ClientError("invalid_message", "a message is a JSON object")
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise ClientError("invalid_message", "missing string field 'type'")
    spec = SCHEMA.get(kind)
    if spec is None:
        raise ClientError("unknown_type", f"unknown message type {kind!r}")
    extra = sorted(set(msg) - set(spec) - {"type"})
    if extra:
        raise ClientError("unknown_field", f"{kind}: unknown field(s) {', '.join(extra)}")
    msg = _without_nulls(msg)
    for field, (types, required) in spec.items():
        if field not in msg:
            if required:
                raise ClientError("missing_field", f"{kind}: missing field {field!r}")
            continue
        if not _typed(msg[field], types):
            raise ClientError("invalid_field", f"{kind}: field {field!r} has the wrong type")
        sub = _SUB_SCHEMA.get(field)
        if sub is not None:
            extra = sorted(set(msg[field]) - set(sub))
            if extra:
                raise ClientError("unknown_field", f"{kind}.{field}: unknown field(s) {', '.join(extra)}")
            for key, value in msg[field].items():
                if not _typed(value, sub[key]):
                    raise ClientError("invalid_field", f"{kind}.{field}.{key} has the wrong type")
    if "path" in msg and not (0 < len(msg["path"]) <= MAX_PATH_CHARS):
        raise ClientError("invalid_field", f"{kind}: path must be 1..{MAX_PATH_CHARS} characters")
    if kind == "edit" and (("text" in msg) == ("changes" in msg)):
        raise ClientError("invalid_field", "edit: give exactly one of 'text' or 'changes'")
    if kind == "complete" and "cursor" in msg and "path" not in msg:
        raise ClientError("missing_field", "complete: 'cursor' needs 'path' of an open document")
    if kind == "complete" and "cursor" in msg and set(msg["cursor"]) != {"line", "character"}:
        raise ClientError("invalid_field", "complete: cursor needs line and character")
    if kind == "complete" and msg.get("mode", "block") not in COMPLETION_MODES:
        raise ClientError("invalid_field", f"complete: mode must be one of {', '.join(COMPLETION_MODES)}")
    if kind == "complete" and isinstance(msg.get("stop"), list) and not all(isinstance(s, str) for s in msg["stop"]):
        raise ClientError("invalid_field", "complete: stop must be a string or a list of strings")
    return msg
