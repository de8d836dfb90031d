"""The websocket protocol's messages (protocol 1; docs/protocol.md): schema and validation.

A message nested too deep is refused before it is parsed (server/json_depth.py); a ``complete``'s
generation fields are checked by the rules HTTP uses (server/app/params.py).
"""

from __future__ import annotations

from pydantic import ValidationError, field_validator

from server.app.params import GenerationParams, MaxTokens, Temperature, check_max_tokens, refusal, valid_text
from server.engines.base import GenerationRequest
from server.errors import ClientError

PROTOCOL = 1
CLOSE_UNAUTHORIZED = 4401
MAX_PREFIX_CHARS = 8000
MAX_SUFFIX_CHARS = 2000
# The kept text's start moves in steps of this many characters as the document grows, so the prompts of
# successive keystrokes start alike and share their cached prefill (server/engines/prefix_cache.py).
PREFIX_STRIDE_CHARS = 1000
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
    # Serve a stored version of the session's adapter again (as its next version).
    "rollback": {"version": (_INT, _REQ), "id": (_ID, _OPT)},
}
_SUB_SCHEMA = {
    "client": {"name": _STR, "version": _STR},
    "repository": {"id": _STR, "root_name": _STR},
    "cursor": {"line": _INT, "character": _INT},
}


class CompleteParams(GenerationParams):
    """The generation fields of a ``complete``: HTTP's fields and rules (server/app/params.py), the
    protocol's defaults (greedy, 32 tokens). ``prefix``/``suffix`` follow ``prompt``/``suffix`` there."""

    prefix: str | None = None
    suffix: str | None = None
    max_tokens: MaxTokens = 32
    temperature: Temperature = 0.0

    @field_validator("prefix", "suffix")
    @classmethod
    def _text(cls, value):
        return valid_text(value)


def completion_request(prefix: str, suffix: str | None, params: CompleteParams, mode: str,
                       max_prompt_tokens: int | None) -> GenerationRequest:
    """What a ``complete`` at a cursor asks of the engine: the document's text around the cursor (at most
    MAX_PREFIX_CHARS before it and MAX_SUFFIX_CHARS after, then ``max_prompt_tokens`` tokens of them, the
    text nearest the cursor kept), healed and shaped for ``mode`` (``raw``: as generated)."""
    cut = max(0, len(prefix) - MAX_PREFIX_CHARS)
    start = -(-cut // PREFIX_STRIDE_CHARS) * PREFIX_STRIDE_CHARS  # rounded up to a stride: a stable start
    return GenerationRequest(
        prompt=prefix[start:], suffix=suffix[:MAX_SUFFIX_CHARS] if suffix else None,
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p, stop=params.stops(),
        seed=params.seed, heal=mode != "raw", trim=mode != "raw", mode=None if mode == "raw" else mode,
        fit_context=True,  # an editor's document may outgrow the model's context: keep the text near the cursor
        max_prompt_tokens=max_prompt_tokens,
    )


# HTTP's codes for a refused field (server/app/params.py) and this protocol's own for the same faults.
_CODES = {"invalid_value": "invalid_field", "unknown_parameter": "unknown_field"}


def complete_params(msg: dict, max_tokens_limit: int) -> CompleteParams:
    """The generation fields of a validated ``complete`` message, checked as HTTP checks them.

    What ``/v1/completions`` refuses is refused here too, as ``invalid_field`` naming the field.
    """
    try:
        params = CompleteParams.model_validate({k: msg[k] for k in CompleteParams.model_fields if k in msg})
        check_max_tokens(params.max_tokens, max_tokens_limit)
        return params
    except ValidationError as exc:
        error = refusal(exc.errors(include_input=False, include_url=False))
    except ClientError as exc:
        error = exc
    raise ClientError(_CODES.get(error.code, error.code), f"complete: {error.message}", param=error.param)


def _typed(value, types) -> bool:
    if isinstance(value, bool):  # bool is an int in Python, never in this protocol
        return bool in types
    return isinstance(value, types)


def _without_nulls(msg: dict) -> dict:
    """A copy where a null field (or sub-field) is absent, as JSON clients often send optional ones."""
    return {k: _without_nulls(v) if isinstance(v, dict) and k in _SUB_SCHEMA else v
            for k, v in msg.items() if v is not None}


def _texts(msg: dict):
    """(field, text) for every string a message carries: fields, sub-fields, and the texts of edit changes."""
    for field, value in msg.items():
        if isinstance(value, str):
            yield field, value
        elif isinstance(value, dict) and field in _SUB_SCHEMA:
            yield from ((f"{field}.{k}", v) for k, v in value.items() if isinstance(v, str))
        elif field == "changes":
            yield from ((f"changes.{i}.text", c["text"]) for i, c in enumerate(value)
                        if isinstance(c, dict) and isinstance(c.get("text"), str))


def _check_text(kind: str, msg: dict) -> None:
    """Text must be valid Unicode, as over HTTP: a lone surrogate (JSON can escape one) is ``invalid_field``,
    so no document, path or feedback holds text a tokenizer or UTF-8 refuses."""
    for field, text in _texts(msg):
        try:
            valid_text(text)
        except ValueError as exc:
            raise ClientError("invalid_field", f"{kind}: {field} {exc}") from None


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
    _check_text(kind, msg)
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
    if kind == "rollback" and msg["version"] < 0:
        raise ClientError("invalid_field", "rollback: version must be 0 or more")
    if kind == "complete" and isinstance(msg.get("stop"), list) and not all(isinstance(s, str) for s in msg["stop"]):
        raise ClientError("invalid_field", "complete: stop must be a string or a list of strings")
    return msg
