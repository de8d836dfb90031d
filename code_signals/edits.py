"""What changed between two versions of a document, and how to read LSP edits.

- `apply_range_edits`: LSP `contentChanges` (UTF-16 positions) applied to a text.
- `changed_regions`: the regions that differ between `before` and `after`.
- `classify_edit_type`: new code / bug fix / modification, for the task-aware rank.
- `EditCoalescer`: turns a stream of keystroke snapshots into settled edits.
"""

from __future__ import annotations

import bisect
import collections
import re
from dataclasses import dataclass

from rapidfuzz.distance import Indel

from .classes import TokenClass
from .errors import CodeSignalsError
from .lexical import classify_lexical

_SPACE = re.compile(r"\s+")


# ---------------------------------------------------------------- LSP edits

# Where a line ends: after "\n", or after a "\r" that no "\n" follows ("\r\n" is one break).
_LINE_SPLIT = re.compile(r"(?<=\n)|(?<=\r)(?!\n)")


def _split_lines(text: str) -> list[str]:
    """The LSP lines of `text`, each with its line break; the last has none (it is "" when
    `text` ends with a break), so there is one more line than there are breaks."""
    return _LINE_SPLIT.split(text)


def _break_len(line: str) -> int:
    if line.endswith("\r\n"):
        return 2
    return 1 if line.endswith(("\n", "\r")) else 0


def _line_index(lines: list[str], line, character) -> int:
    """Index in `lines[line]` of an LSP position; `character` counts UTF-16 code units.

    No Python loop over characters: an ASCII line maps units to characters one to one
    (`isascii` is O(1)); any other line is encoded to UTF-16 once, and the index is the
    length of its first `character` units decoded."""
    if (
        not isinstance(line, int)
        or not isinstance(character, int)
        or line < 0
        or character < 0
    ):
        raise CodeSignalsError(
            f"bad LSP position line={line!r} character={character!r}"
        )
    if line >= len(lines):
        raise CodeSignalsError(
            f"LSP position line {line} is past the document's {len(lines)} lines"
        )
    text = lines[line]
    content = text[: len(text) - _break_len(text)]  # the line without its line break
    units = len(content)
    if not content.isascii():
        # surrogatepass: a lone surrogate is one UTF-16 unit, as in the editor.
        encoded = content.encode("utf-16-le", "surrogatepass")
        units = len(encoded) // 2
    if character > units:
        raise CodeSignalsError(
            f"LSP position {line}:{character} is past the end of line {line} ({units} UTF-16 units)"
        )
    if units == len(content) or character == 0:  # one unit per character
        return character
    decoded = encoded[: 2 * character].decode("utf-16-le", "surrogatepass")
    if content.startswith(decoded):
        return len(decoded)
    # The position splits a pair (the prefix ends in half a character), or the line has lone
    # surrogates that decoding paired up: binary search over encoded prefixes.
    # units(i) rises by 1 or 2 per character, so the index lies in [character - wide, character].
    wide = units - len(content)
    lo, hi = max(0, character - wide), min(character, len(content))
    while lo < hi:  # the first i with units(i) >= character
        mid = (lo + hi) // 2
        if _utf16_len(content[:mid]) < character:
            lo = mid + 1
        else:
            hi = mid
    if _utf16_len(content[:lo]) != character:
        raise CodeSignalsError(
            f"LSP position {line}:{character} splits a surrogate pair"
        )
    return lo


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def apply_range_edits(text: str, changes: list[dict]) -> str:
    """Apply LSP `TextDocumentContentChangeEvent`s in order: `{"text": full}`
    replaces the document, `{"range": {"start": {"line", "character"}, "end":
    {...}}, "text": new}` replaces a range. Raises CodeSignalsError when a change
    is malformed or its range does not fit the document (a version mismatch).

    The document is split into lines once per call and joined once at the end; in
    between, a change costs the length of the lines it touches and of its text, not
    a pass over the whole document (nor a Python loop over characters)."""
    if not isinstance(text, str):
        raise CodeSignalsError("document text must be str")
    lines: list[str] | None = None
    for i, change in enumerate(changes):
        if not isinstance(change, dict) or not isinstance(change.get("text"), str):
            raise CodeSignalsError(f"change {i} must be a dict with a str 'text'")
        rng = change.get("range")
        if rng is None:
            text, lines = change["text"], None
            continue
        if lines is None:
            lines = _split_lines(text)
        try:
            start, end = rng["start"], rng["end"]
            l1 = start["line"]
            a = _line_index(lines, l1, start["character"])
            l2 = end["line"]
            b = _line_index(lines, l2, end["character"])
        except (KeyError, TypeError) as exc:
            raise CodeSignalsError(
                f"change {i} has a malformed range: {rng!r}"
            ) from exc
        if (l2, b) < (l1, a):
            raise CodeSignalsError(f"change {i}: range end comes before its start")
        new = change["text"]
        last = l2 == len(lines) - 1
        segment = lines[l1][:a] + new + lines[l2][b:]
        if l1 > 0 and segment.startswith("\n") and lines[l1 - 1].endswith("\r"):
            l1 -= 1  # "\r" + "\n" now form one line break: that line joins the segment
            segment = lines[l1] + segment
        if "\n" in new or "\r" in new:
            pieces = _split_lines(segment)
            if not last:
                pieces.pop()  # the segment ends with a line break: its empty tail is no line
        else:  # the segment is one line: its head has no break, its tail only its own
            pieces = [segment]
        lines[l1 : l2 + 1] = pieces
    return text if lines is None else "".join(lines)


# ---------------------------------------------------------------- diffs


@dataclass(frozen=True)
class Change:
    """before[before_start:before_end] became after[after_start:after_end]."""

    before_start: int
    before_end: int
    after_start: int
    after_end: int

    def old(self, before: str) -> str:
        return before[self.before_start : self.before_end]

    def new(self, after: str) -> str:
        return after[self.after_start : self.after_end]


def common_prefix_len(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # binary search on slices: C-speed compares, no Python char loop
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def common_suffix_len(a: str, b: str, limit: int) -> int:
    lo, hi = 0, min(len(a), len(b), limit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid : len(a) - lo] == b[len(b) - mid : len(b) - lo]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _trim(before: str, after: str, b0: int, b1: int, a0: int, a1: int) -> Change:
    p = common_prefix_len(before[b0:b1], after[a0:a1])
    s = common_suffix_len(
        before[b0 + p : b1], after[a0 + p : a1], limit=min(b1 - b0, a1 - a0) - p
    )
    return Change(b0 + p, b1 - s, a0 + p, a1 - s)


def changed_regions(
    before: str, after: str, merge_gap: int = 80, small: int = 4000
) -> list[Change]:
    """The regions that differ, in document order. Common prefix and suffix are
    cut first; a middle part larger than `small` characters is diffed line by
    line (`_line_changes`: bounded work, whatever the lines). Regions closer than
    `merge_gap` characters (in `after`) are merged."""
    if before == after:
        return []
    whole = _trim(before, after, 0, len(before), 0, len(after))
    if (
        max(whole.before_end - whole.before_start, whole.after_end - whole.after_start)
        <= small
    ):
        return [whole]
    # Line diff of the middle part only.
    old_mid = before[whole.before_start : whole.before_end]
    new_mid = after[whole.after_start : whole.after_end]
    old_lines = old_mid.splitlines(keepends=True)
    new_lines = new_mid.splitlines(keepends=True)
    old_pos = [0, *_accumulate(len(x) for x in old_lines)]
    new_pos = [0, *_accumulate(len(x) for x in new_lines)]
    ids: dict[str, int] = {}  # each distinct line -> a small int: compared and hashed in C
    old_ids = [ids.setdefault(line, len(ids)) for line in old_lines]
    new_ids = [ids.setdefault(line, len(ids)) for line in new_lines]
    regions: list[Change] = []
    for i1, i2, j1, j2 in _line_changes(old_ids, new_ids):
        change = _trim(
            before,
            after,
            whole.before_start + old_pos[i1],
            whole.before_start + old_pos[i2],
            whole.after_start + new_pos[j1],
            whole.after_start + new_pos[j2],
        )
        if regions and change.after_start - regions[-1].after_end <= merge_gap:
            last = regions.pop()
            change = Change(
                last.before_start, change.before_end, last.after_start, change.after_end
            )
        regions.append(change)
    return regions or [whole]


# A line diff of n x m lines takes one bit-parallel LCS (rapidfuzz, C, holding the GIL) while
# n * m is at most this: at most about 20 ms and 4 MB. Larger parts are first cut at lines found once on each side
# (patience diff), at most _MAX_ANCHOR_DEPTH times over; what is still too large is one region.
_MAX_DIFF_CELLS = 1 << 25
_MAX_ANCHOR_DEPTH = 8


def _line_changes(a: list[int], b: list[int]) -> list[tuple[int, int, int, int]]:
    """The blocks `(i1, i2, j1, j2)` where lines `a[i1:i2]` became `b[j1:j2]`, in order; the
    lines between blocks are equal. Time is bounded by the sizes, never cubic (unlike
    difflib's SequenceMatcher on many repeated lines)."""
    out: list[tuple[int, int, int, int]] = []
    _diff_part(a, b, 0, len(a), 0, len(b), 0, out)
    return out


def _diff_part(a, b, a0, a1, b0, b1, depth, out) -> None:
    while a0 < a1 and b0 < b1 and a[a0] == b[b0]:
        a0, b0 = a0 + 1, b0 + 1
    while a0 < a1 and b0 < b1 and a[a1 - 1] == b[b1 - 1]:
        a1, b1 = a1 - 1, b1 - 1
    if a0 == a1 and b0 == b1:
        return
    if a0 == a1 or b0 == b1:
        out.append((a0, a1, b0, b1))
        return
    if (a1 - a0) * (b1 - b0) <= _MAX_DIFF_CELLS:
        for op in Indel.opcodes(a[a0:a1], b[b0:b1]):
            if op.tag == "equal":
                continue
            block = (a0 + op.src_start, a0 + op.src_end, b0 + op.dest_start, b0 + op.dest_end)
            if out and out[-1][1] == block[0] and out[-1][3] == block[2]:
                i1, _, j1, _ = out.pop()  # touching the previous block (a delete, then an insert)
                block = (i1, block[1], j1, block[3])
            out.append(block)
        return
    anchors = _unique_anchors(a, b, a0, a1, b0, b1) if depth < _MAX_ANCHOR_DEPTH else []
    if not anchors:
        out.append((a0, a1, b0, b1))
        return
    for i, j in anchors:
        _diff_part(a, b, a0, i, b0, j, depth + 1, out)
        a0, b0 = i + 1, j + 1
    _diff_part(a, b, a0, a1, b0, b1, depth + 1, out)


def _unique_anchors(a, b, a0, a1, b0, b1) -> list[tuple[int, int]]:
    """Pairs `(i, j)`, increasing in both, of lines that occur once in `a[a0:a1]` and once in
    `b[b0:b1]` with `a[i] == b[j]`: the longest such chain (patience sorting, n log n)."""
    count_a = collections.Counter(a[a0:a1])
    count_b = collections.Counter(b[b0:b1])
    where_b = {b[j]: j for j in range(b0, b1) if count_b[b[j]] == 1}
    pairs = [
        (i, where_b[a[i]])
        for i in range(a0, a1)
        if count_a[a[i]] == 1 and a[i] in where_b
    ]
    # Longest increasing subsequence of the j's (the i's already increase).
    tails: list[int] = []  # tails[n]: the pair ending the chain of n + 1 pairs with the smallest j
    tail_js: list[int] = []  # their j's, increasing
    back = [-1] * len(pairs)  # the pair before each one in its chain
    for k, (_, j) in enumerate(pairs):
        pos = bisect.bisect_left(tail_js, j)
        back[k] = tails[pos - 1] if pos else -1
        if pos == len(tails):
            tails.append(k)
            tail_js.append(j)
        else:
            tails[pos], tail_js[pos] = k, j
    chain, k = [], tails[-1] if tails else -1
    while k >= 0:
        chain.append(pairs[k])
        k = back[k]
    return chain[::-1]


def _accumulate(values):
    total = 0
    for v in values:
        total += v
        yield total


def is_whitespace_only(old: str, new: str) -> bool:
    """True when the two differ only in whitespace (reindent, blank lines)."""
    return _SPACE.sub("", old) == _SPACE.sub("", new)


# ---------------------------------------------------------------- edit types

NEW_CODE, MODIFICATION, BUG_FIX = "new_code", "modification", "bug_fix"
EDIT_TYPES = (NEW_CODE, MODIFICATION, BUG_FIX)

_CODE_CLASSES = frozenset(
    {
        TokenClass.KEYWORD,
        TokenClass.IDENTIFIER_USE,
        TokenClass.IDENTIFIER_DEF,
        TokenClass.OPERATOR,
        TokenClass.NUMBER,
    }
)


def classify_edit_type(old: str, new: str) -> str:
    """Heuristic, from the replaced text `old` and its replacement `new`:

    - new_code: a pure insertion (nothing but whitespace replaced) of at least
      a line (it holds a line break) or of more than 120 characters; or an
      insertion of at least 3 lines and 4x the size of what it replaced;
    - bug_fix: a small change (both sides at most 2 lines and 120 characters,
      the new side not empty; a short in-line insertion counts) that touches
      code tokens (operators, numbers, keywords, names), not only comments or
      strings;
    - modification: everything else (refactors, deletions, comment rewrites).
    """
    old_s, new_s = old.strip(), new.strip()
    if not new_s:
        return MODIFICATION
    if not old_s and ("\n" in new.strip(" \t") or len(new_s) > 120):
        return NEW_CODE
    new_lines = new_s.count("\n") + 1
    if new_lines >= 3 and len(new_s) >= 4 * len(old_s):
        return NEW_CODE
    small = (
        old_s.count("\n") < 2
        and new_s.count("\n") < 2
        and max(len(old_s), len(new_s)) <= 120
    )
    if small and new_s:
        changed = {s.cls for text in (old_s, new_s) for s in classify_lexical(text)}
        if changed & _CODE_CLASSES:
            return BUG_FIX
    return MODIFICATION


# ---------------------------------------------------------------- bursts


class EditCoalescer:
    """Coalesces one document's keystroke snapshots into settled edits.

    Feed every new full text with its timestamp (seconds). A burst is the run of
    snapshots since the last emitted edit. `feed` returns `(before, after)` for
    the previous burst when the new snapshot shows it has settled:
    - the user was quiet for at least `quiet_s` before this snapshot, or
    - this snapshot edits more than `region_gap` characters away from the
      burst's changed region (the cursor moved elsewhere), or
    - the burst has lasted `max_burst_s` (long typing still yields examples).
    The snapshot that closes a burst starts the next one. `flush(now)` emits the
    pending burst once `quiet_s` has passed (call it from a timer), or at once
    with `force=True` (document closed). Bursts that end where they began are
    dropped.
    """

    def __init__(
        self, quiet_s: float = 1.5, region_gap: int = 200, max_burst_s: float = 30.0
    ):
        if quiet_s < 0 or region_gap < 0 or max_burst_s <= 0:
            raise CodeSignalsError(
                "EditCoalescer needs quiet_s >= 0, region_gap >= 0, max_burst_s > 0"
            )
        self.quiet_s, self.region_gap, self.max_burst_s = (
            quiet_s,
            region_gap,
            max_burst_s,
        )
        self._base: str | None = None  # text when the burst began
        self._last: str | None = None  # latest text
        self._last_time = 0.0
        self._burst_time = 0.0

    @property
    def pending(self) -> bool:
        return self._base is not None and self._base != self._last

    def feed(self, text: str, timestamp: float) -> tuple[str, str] | None:
        if not isinstance(text, str):
            raise CodeSignalsError("EditCoalescer.feed needs str text")
        if self._base is None:
            self._base = self._last = text
            self._last_time = self._burst_time = timestamp
            return None
        emitted = None
        if self.pending and (
            timestamp - self._last_time >= self.quiet_s
            or timestamp - self._burst_time >= self.max_burst_s
            or self._moved(text)
        ):
            emitted = (self._base, self._last)
            self._base = self._last
        if not self.pending:
            self._burst_time = timestamp  # a burst starts with its first change
        self._last = text
        self._last_time = timestamp
        return emitted

    def flush(
        self, now: float | None = None, force: bool = False
    ) -> tuple[str, str] | None:
        if not self.pending or not (
            force or (now is not None and now - self._last_time >= self.quiet_s)
        ):
            return None
        emitted = (self._base, self._last)
        self._base = self._last
        return emitted

    def _moved(self, text: str) -> bool:
        """Does the step last -> text edit far from the burst's region (both in `last` coordinates)?"""
        base, last = self._base, self._last
        burst = _trim(base, last, 0, len(base), 0, len(last))
        step = _trim(last, text, 0, len(last), 0, len(text))
        if step.before_start == step.before_end and step.after_start == step.after_end:
            return False  # no change at all
        return (
            step.before_start > burst.after_end + self.region_gap
            or step.before_end < burst.after_start - self.region_gap
        )
