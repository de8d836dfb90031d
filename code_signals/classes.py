"""Token classes and the character spans that carry them."""

from __future__ import annotations

import enum
from typing import NamedTuple


class TokenClass(enum.IntEnum):
    """What a piece of source text is, as far as training cares.

    Values are stable small integers so they can be stored in tensors and used as
    the per-token class input of a rank policy.
    """

    WHITESPACE = 0  # spaces, tabs, newlines
    KEYWORD = 1  # reserved words, built-in type names, true/false/null
    IDENTIFIER_DEF = 2  # a name being defined: function, class, variable, parameter
    IDENTIFIER_USE = 3  # any other name
    OPERATOR = 4  # + - = == -> . :: and friends
    PUNCTUATION = 5  # brackets, commas, semicolons, colons
    STRING = 6  # string and character literals, quotes included
    NUMBER = 7  # numeric literals
    COMMENT = 8  # comments
    DOCSTRING = (
        9  # documentation strings and doc comments (/** */, ///, Python docstrings)
    )
    OTHER = 10  # anything else (decorator @, special tokens, unknown)
    ERROR = 11  # characters the parser could not place at all


def is_keyword_or_identifier(cls: int) -> bool:
    """True for the classes that get the highest importance (keywords and names)."""
    return cls in (
        TokenClass.KEYWORD,
        TokenClass.IDENTIFIER_DEF,
        TokenClass.IDENTIFIER_USE,
    )


class Span(NamedTuple):
    """Characters text[start:end] are of class `cls`. `in_error` is True when the
    span lies inside a region the parser had to recover from (an ERROR node)."""

    start: int
    end: int
    cls: TokenClass
    in_error: bool = False
