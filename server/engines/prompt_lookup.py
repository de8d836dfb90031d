"""Prompt-lookup drafts: the tokens that followed the last n-gram where it occurred before.

Code repeats itself (a name typed again, a call like the one above, the
suffix of a fill-in-the-middle prompt), so the text that followed an earlier
occurrence of the last few tokens is a good guess at what comes next. The
engine feeds such a draft with the last token in one forward and keeps the
prefix its own greedy choice agrees with (prompt-lookup decoding, the
``prompt_lookup_num_tokens`` of transformers' ``generate``): the output is
exactly greedy decoding's, only with fewer forwards when the guess is good.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_NGRAM = 3  # longest n-gram matched; longer matches are tried first
MIN_NGRAM = 2  # a single repeated token predicts too little to be worth a longer forward
MAX_DRAFT = 8  # tokens proposed per forward


def propose_draft(ids: Sequence[int], max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM,
                  max_draft: int = MAX_DRAFT) -> list[int]:
    """Up to ``max_draft`` tokens that followed the most recent earlier occurrence of the
    longest suffix n-gram of ``ids`` (``min_ngram`` <= n <= ``max_ngram``); [] when none occurs."""
    if max_draft <= 0:
        return []
    ids = list(ids)
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        tail = ids[-n:]
        # Scan backwards so the nearest occurrence wins: nearby code predicts best.
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start:start + n] == tail:
                follow = ids[start + n:start + n + max_draft]
                if follow:
                    return follow
    return []
