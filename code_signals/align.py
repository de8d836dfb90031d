"""Character spans -> one class per model token.

Rule for a token whose characters fall in several classes: the class covering the
most of its non-whitespace characters wins (so " def" is KEYWORD, not
WHITESPACE); a tie goes to the class that comes first in ALIGN_PRIORITY
(keywords and names first). A token made only of whitespace is WHITESPACE; a
token with an empty offset range (special tokens such as BOS or FIM markers) is
OTHER. A token is flagged in error when any of its characters is.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from .classes import Span, TokenClass

ALIGN_PRIORITY = (
    TokenClass.IDENTIFIER_DEF,
    TokenClass.KEYWORD,
    TokenClass.IDENTIFIER_USE,
    TokenClass.NUMBER,
    TokenClass.STRING,
    TokenClass.DOCSTRING,
    TokenClass.OPERATOR,
    TokenClass.COMMENT,
    TokenClass.PUNCTUATION,
    TokenClass.ERROR,
    TokenClass.OTHER,
    TokenClass.WHITESPACE,
)
_RANK = {cls: i for i, cls in enumerate(ALIGN_PRIORITY)}


def align_to_tokens(
    spans: Sequence[Span], offsets: Sequence[tuple[int, int]]
) -> list[TokenClass]:
    """One TokenClass per (start, end) character offset pair, as a HF fast
    tokenizer returns with `return_offsets_mapping=True` for the same text."""
    return [cls for cls, _ in align_with_errors(spans, offsets)]


def align_with_errors(
    spans: Sequence[Span], offsets: Sequence[tuple[int, int]]
) -> list[tuple[TokenClass, bool]]:
    """Like align_to_tokens, also saying whether each token touches an ERROR region."""
    starts = [s.start for s in spans]
    out: list[tuple[TokenClass, bool]] = []
    for tok_start, tok_end in offsets:
        if tok_end <= tok_start:
            out.append((TokenClass.OTHER, False))
            continue
        i = max(bisect.bisect_right(starts, tok_start) - 1, 0)
        first = spans[i] if i < len(spans) else None
        # Fast path: the token lies inside one span (most tokens do).
        if first is not None and first.start <= tok_start and tok_end <= first.end:
            out.append((first.cls, first.in_error))
            continue
        counts: dict[TokenClass, int] = {}
        in_error = False
        while i < len(spans) and spans[i].start < tok_end:
            span = spans[i]
            overlap = min(span.end, tok_end) - max(span.start, tok_start)
            if overlap > 0:
                counts[span.cls] = counts.get(span.cls, 0) + overlap
                in_error = in_error or span.in_error
            i += 1
        if len(counts) > 1:  # leading/trailing spaces do not decide the class
            counts.pop(TokenClass.WHITESPACE, None)
        if not counts:
            out.append((TokenClass.OTHER, False))  # offsets beyond the text
            continue
        best = max(counts, key=lambda c: (counts[c], -_RANK[c]))
        out.append((best, in_error))
    return out
