"""Regex classifier for text without a grammar (unknown languages, enormous
files, preprocessor bodies). Never fails: every character matches some rule.

Rules, first match wins: whitespace; comments (`//`, `/* */`, and `#` at the
start of a line or after whitespace); strings in ", ' or ` quotes (triple quotes
too; an unterminated string runs to the end of the line); numbers; words
(keywords from a cross-language list, a word right after a defining keyword such
as `def`/`function`/`fn` is a definition, the rest are uses); runs of operator
characters; brackets/commas/semicolons/colons as punctuation; anything else OTHER.
"""

from __future__ import annotations

import re

from .classes import Span, TokenClass

KEYWORDS = frozenset(
    [
        "abstract",
        "and",
        "as",
        "assert",
        "async",
        "await",
        "auto",
        "break",
        "case",
        "catch",
        "char",
        "class",
        "const",
        "continue",
        "def",
        "default",
        "defer",
        "del",
        "delete",
        "do",
        "double",
        "elif",
        "else",
        "enum",
        "except",
        "export",
        "extends",
        "extern",
        "false",
        "final",
        "finally",
        "float",
        "fn",
        "for",
        "from",
        "func",
        "function",
        "global",
        "go",
        "goto",
        "if",
        "impl",
        "implements",
        "import",
        "in",
        "inline",
        "int",
        "interface",
        "is",
        "lambda",
        "let",
        "long",
        "loop",
        "match",
        "mod",
        "module",
        "mut",
        "namespace",
        "new",
        "nil",
        "none",
        "None",
        "nonlocal",
        "not",
        "null",
        "or",
        "package",
        "pass",
        "private",
        "protected",
        "pub",
        "public",
        "raise",
        "return",
        "self",
        "short",
        "signed",
        "sizeof",
        "static",
        "struct",
        "super",
        "switch",
        "template",
        "this",
        "throw",
        "throws",
        "trait",
        "true",
        "True",
        "False",
        "try",
        "type",
        "typedef",
        "typeof",
        "union",
        "unsafe",
        "unsigned",
        "use",
        "var",
        "void",
        "volatile",
        "where",
        "while",
        "with",
        "yield",
    ]
)

# A name after one of these is being defined.
DEFINING_KEYWORDS = frozenset(
    [
        "def",
        "class",
        "function",
        "fn",
        "func",
        "struct",
        "enum",
        "interface",
        "trait",
        "type",
        "let",
        "const",
        "var",
        "mod",
        "module",
        "namespace",
        "union",
    ]
)

_PATTERN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>//[^\n]*|/\*.*?(?:\*/|\Z)|(?:(?<=\s)|^)\#[^\n]*)
  | (?P<string>\"\"\".*?(?:\"\"\"|\Z)|'''.*?(?:'''|\Z)
       |"(?:\\.|[^"\\\n])*(?:"|$)|'(?:\\.|[^'\\\n])*(?:'|$)|`(?:\\.|[^`\\])*(?:`|\Z))
  | (?P<number>(?:0[xXbBoO][0-9a-fA-F_]+|\d[\d_]*(?:\.\d[\d_]*)?(?:[eE][+-]?\d+)?)\w*)
  | (?P<word>[^\W\d]\w*)
  | (?P<op>[-+*/%=<>!&|^~?.@$\\]+)
  | (?P<punct>[()\[\]{},;:])
  | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL | re.MULTILINE,
)

_SIMPLE = {
    "ws": TokenClass.WHITESPACE,
    "comment": TokenClass.COMMENT,
    "string": TokenClass.STRING,
    "number": TokenClass.NUMBER,
    "op": TokenClass.OPERATOR,
    "punct": TokenClass.PUNCTUATION,
    "other": TokenClass.OTHER,
}


def classify_lexical(
    text: str, offset: int = 0, start: int = 0, end: int | None = None
) -> list[Span]:
    """Spans for text[start:end], shifted by `offset`, covering it exactly once."""
    end = len(text) if end is None else end
    spans: list[Span] = []
    after_defining = False
    for match in _PATTERN.finditer(text, start, end):
        kind = match.lastgroup
        if kind == "word":
            word = match.group()
            if word in KEYWORDS:
                cls = TokenClass.KEYWORD
            elif after_defining:
                cls = TokenClass.IDENTIFIER_DEF
            else:
                cls = TokenClass.IDENTIFIER_USE
            after_defining = word in DEFINING_KEYWORDS
        else:
            cls = _SIMPLE[kind]
            if kind != "ws":
                after_defining = False
        if (
            kind == "comment"
            and match.group().startswith(("/**", "///", "//!"))
            and match.group() != "/**/"
        ):
            cls = TokenClass.DOCSTRING
        spans.append(Span(match.start() + offset, match.end() + offset, cls))
    return spans
