"""How deep JSON text nests, measured before it is parsed; shared by every layer that parses client JSON.

``json.loads`` recurses once per level of arrays/objects, so a deep enough document ends in
``RecursionError`` instead of a clear refusal. Websocket messages, HTTP bodies and the lines of
uploaded training files are scanned with ``json_too_deep`` first.
"""

from __future__ import annotations

import re

from server.errors import ClientError

# JSON nested deeper than this is refused before it is parsed.
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
