"""Importance weight per token class.

The same numbers serve as loss weights (targets in a training example) and, via
the class ids, as the per-token class input of the dynamicrank policy. Keywords
and identifiers weigh most: they carry the code's structure and the user's
vocabulary; whitespace and punctuation are near-free for a code model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .classes import TokenClass
from .errors import CodeSignalsError

DEFAULT_WEIGHTS: dict[TokenClass, float] = {
    TokenClass.IDENTIFIER_DEF: 2.0,
    TokenClass.KEYWORD: 1.5,
    TokenClass.IDENTIFIER_USE: 1.5,
    TokenClass.OPERATOR: 1.0,
    TokenClass.NUMBER: 1.0,
    TokenClass.STRING: 0.8,
    TokenClass.PUNCTUATION: 0.6,
    TokenClass.DOCSTRING: 0.6,
    TokenClass.COMMENT: 0.5,
    TokenClass.OTHER: 0.5,
    TokenClass.ERROR: 0.3,
    TokenClass.WHITESPACE: 0.2,
}


def resolve_table(table: Mapping | None = None) -> dict[TokenClass, float]:
    """DEFAULT_WEIGHTS overridden by `table` (keys: TokenClass, int or class name)."""
    resolved = dict(DEFAULT_WEIGHTS)
    for key, value in (table or {}).items():
        try:
            cls = TokenClass[key.upper()] if isinstance(key, str) else TokenClass(key)
            weight = float(value)
        except (KeyError, ValueError, TypeError) as exc:
            raise CodeSignalsError(
                f"bad weight table entry {key!r}: {value!r}"
            ) from exc
        if not weight >= 0.0 or weight == float("inf"):
            raise CodeSignalsError(
                f"weight for {cls.name} must be finite and >= 0, got {value!r}"
            )
        resolved[cls] = weight
    return resolved


def token_weights(classes: Iterable[int], table: Mapping | None = None) -> list[float]:
    """The weight of each token's class."""
    resolved = resolve_table(table)
    return [resolved[TokenClass(c)] for c in classes]
