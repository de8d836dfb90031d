"""The generation parameters ``/v1/completions`` and the websocket's ``complete`` share: one schema.

The sampling fields both take (``temperature``, ``top_p``, ``stop``, ``seed``) and ``max_tokens`` are
declared once here, with their types and limits, and so is the rule for text (no lone surrogate). HTTP's
request models (server/app/openai.py) and the websocket's ``CompleteParams`` (server/app/ws/protocol.py)
build on them and add their own fields and defaults, so both refuse the same values and name the field:
HTTP answers 400 ``invalid_value`` (``unknown_parameter`` for a field it does not know), the websocket an
``error`` ``invalid_field`` (``unknown_field``), its protocol's codes for the same faults.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.errors import ClientError

# JSON can carry half of a UTF-16 pair (``"\\ud800"``); json.loads joins real pairs into one code point, so
# any surrogate left in a str is a lone one, which no tokenizer (nor UTF-8) accepts.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 63 - 1  # a 64-bit seed, as OpenAI's; choice j uses seed + j
MAX_STOPS = 16

Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]  # the most likely token is always kept, however small
MaxTokens = Annotated[int, Field(ge=1)]  # the upper bound is the server's: check_max_tokens
Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)]


def valid_text(value):
    """``value`` (a string, a list of strings or of ``TextPart``s, or None), or ValueError for a lone surrogate."""
    for text in [value] if isinstance(value, str) else value or ():
        text = getattr(text, "text", text)
        if isinstance(text, str) and (bad := _LONE_SURROGATE.search(text)):
            raise ValueError(f"contains a lone surrogate (U+{ord(bad.group()):04X} at character {bad.start()}); "
                             "text must be valid Unicode")
    return value


class Strict(BaseModel):
    """A field the model does not declare is refused (``extra_forbidden``), not ignored."""

    model_config = ConfigDict(extra="forbid")


class GenerationParams(Strict):
    """The sampling fields of every completion request, HTTP or websocket, with HTTP's (OpenAI's) defaults."""

    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    stop: str | list[str] | None = None
    seed: Seed | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        valid_text(value)
        if isinstance(value, list) and len(value) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences are allowed, not {len(value)}")
        return value

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def check_max_tokens(value: int, limit: int) -> None:
    """ClientError ``invalid_value`` for ``max_tokens`` above the server's limit (``max_tokens_limit``)."""
    if value > limit:
        raise ClientError("invalid_value", f"max_tokens is {value}; this server allows at most {limit}.",
                          param="max_tokens")


def refusal(errors: list[dict]) -> ClientError:
    """The first of pydantic's validation ``errors`` as a ClientError naming its field (``param``).

    ``unknown_parameter`` for a field the model does not declare, else ``invalid_value`` with pydantic's
    message (or a validator's own), prefixed by the field.
    """
    if not errors:
        return ClientError("invalid_value", "invalid request")
    # A value that fits no member of a union (``stop: str | list[str]``) fails once per member; the member
    # that got furthest into the value (``stop.1``) says most, and equally deep members are named together.
    first_param = _param(errors[0])
    related = [e for e in errors if (_param(e) or "").startswith(first_param or "")] if first_param else errors[:1]
    deepest = max(len(_field_path(e)) for e in related)
    chosen = [e for e in related if len(_field_path(e)) == deepest]
    param = _param(chosen[0])
    if chosen[0].get("type") == "extra_forbidden":
        return ClientError("unknown_parameter", f"Unrecognized request argument supplied: {param}", param=param)
    messages = dict.fromkeys(e.get("msg", "invalid request").removeprefix("Value error, ") for e in chosen)
    message = " or ".join(messages)  # a validator's own message has pydantic's "Value error, " prefix dropped
    return ClientError("invalid_value", f"{param}: {message}" if param else message, param=param)


def _field_path(error: dict) -> list:
    """The request fields of pydantic's ``loc``: without ``body`` and union member tags (``str``, ``list[str]``)."""
    return [p for p in error.get("loc", ()) if p != "body" and not (isinstance(p, str) and _UNION_TAG.match(p))]


def _param(error: dict) -> str | None:
    return ".".join(str(p) for p in _field_path(error)) or None


# pydantic names each member of a union in ``loc`` by its schema: a type (``str``, ``int``), a generic
# (``list[str]``) or a wrapped one (``function-after[...]``, ``constrained-str``). No request field has such a name.
_UNION_TAG = re.compile(r"^(str|int|float|bool|bytes|none|[a-z-]+\[.*\]|[a-z]+-[a-z-]+)$")
