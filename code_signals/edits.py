"""What changed between two versions of a document, and how to read LSP edits.

- `apply_range_edits`: LSP `contentChanges` (UTF-16 positions) applied to a text.
- `changed_regions`: the regions that differ between `before` and `after`.
- `classify_edit_type`: new code / bug fix / modification, for the task-aware rank.
- `EditCoalescer`: turns a stream of keystroke snapshots into settled edits.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from .classes import TokenClass
from .errors import CodeSignalsError
from .lexical import classify_lexical

_EOL = re.compile(r"\r\n|\r|\n")
_SPACE = re.compile(r"\s+")


# ---------------------------------------------------------------- LSP edits


def _line_starts(text: str) -> list[int]:
    return [0] + [m.end() for m in _EOL.finditer(text)]


def _offset(text: str, starts: list[int], line, character) -> int:
    """Character index of an LSP position; `character` counts UTF-16 code units."""
    if (
        not isinstance(line, int)
        or not isinstance(character, int)
        or line < 0
        or character < 0
    ):
        raise CodeSignalsError(
            f"bad LSP position line={line!r} character={character!r}"
        )
    if line >= len(starts):
        raise CodeSignalsError(
            f"LSP position line {line} is past the document's {len(starts)} lines"
        )
    begin = starts[line]
    end = starts[line + 1] if line + 1 < len(starts) else len(text)
    content = _EOL.sub("", text[begin:end])  # the line without its line break
    units = 0
    for i, ch in enumerate(content):
        if units == character:
            return begin + i
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > character:
            raise CodeSignalsError(
                f"LSP position {line}:{character} splits a surrogate pair"
            )
    if units == character:
        return begin + len(content)
    raise CodeSignalsError(
        f"LSP position {line}:{character} is past the end of line {line} ({units} UTF-16 units)"
    )


def apply_range_edits(text: str, changes: list[dict]) -> str:
    """Apply LSP `TextDocumentContentChangeEvent`s in order: `{"text": full}`
    replaces the document, `{"range": {"start": {"line", "character"}, "end":
    {...}}, "text": new}` replaces a range. Raises CodeSignalsError when a change
    is malformed or its range does not fit the document (a version mismatch)."""
    if not isinstance(text, str):
        raise CodeSignalsError("document text must be str")
    for i, change in enumerate(changes):
        if not isinstance(change, dict) or not isinstance(change.get("text"), str):
            raise CodeSignalsError(f"change {i} must be a dict with a str 'text'")
        rng = change.get("range")
        if rng is None:
            text = change["text"]
            continue
        try:
            start, end = rng["start"], rng["end"]
            starts = _line_starts(text)
            a = _offset(text, starts, start["line"], start["character"])
            b = _offset(text, starts, end["line"], end["character"])
        except (KeyError, TypeError) as exc:
            raise CodeSignalsError(
                f"change {i} has a malformed range: {rng!r}"
            ) from exc
        if b < a:
            raise CodeSignalsError(f"change {i}: range end comes before its start")
        text = text[:a] + change["text"] + text[b:]
    return text


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
    line. Regions closer than `merge_gap` characters (in `after`) are merged."""
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
    regions: list[Change] = []
    matcher = difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
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
