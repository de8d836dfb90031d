"""Range edits and line diffs stay cheap on inputs built to be slow, and keep their results.

`apply_range_edits` used to walk a line character by character in Python and recompute
every line start for each change (about 70 ms per change on a 500,000-character line);
`changed_regions` used difflib's SequenceMatcher, cubic in the number of repeated lines
(3 minutes for "a\\n" * 2400 -> "a\\nb\\n" * 1200). The bounds below are CPU time of this
process (`time.process_time`, so other load on the machine barely moves them) and sit
10-100x above what the code takes and far below what the old code took.
"""

from __future__ import annotations

import itertools
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from code_signals import CodeSignalsError, apply_range_edits, changed_regions
from code_signals import edits as edits_module

# -- the reference: the old, slow and obviously right position arithmetic -----------

_EOL = re.compile(r"\r\n|\r|\n")


def _reference_offset(text, starts, line, character):
    if not isinstance(line, int) or not isinstance(character, int) or line < 0 or character < 0:
        raise CodeSignalsError(f"bad LSP position line={line!r} character={character!r}")
    if line >= len(starts):
        raise CodeSignalsError(f"LSP position line {line} is past the document's {len(starts)} lines")
    begin = starts[line]
    end = starts[line + 1] if line + 1 < len(starts) else len(text)
    content = _EOL.sub("", text[begin:end])
    units = 0
    for i, ch in enumerate(content):
        if units == character:
            return begin + i
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > character:
            raise CodeSignalsError(f"LSP position {line}:{character} splits a surrogate pair")
    if units == character:
        return begin + len(content)
    raise CodeSignalsError(
        f"LSP position {line}:{character} is past the end of line {line} ({units} UTF-16 units)"
    )


def reference_apply(text, changes):
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
            starts = [0] + [m.end() for m in _EOL.finditer(text)]
            a = _reference_offset(text, starts, start["line"], start["character"])
            b = _reference_offset(text, starts, end["line"], end["character"])
        except (KeyError, TypeError) as exc:
            raise CodeSignalsError(f"change {i} has a malformed range: {rng!r}") from exc
        if b < a:
            raise CodeSignalsError(f"change {i}: range end comes before its start")
        text = text[:a] + change["text"] + text[b:]
    return text


def outcome(fn, text, changes):
    try:
        return "ok", fn(text, changes)
    except CodeSignalsError as exc:
        return "error", str(exc)


def units(s: str) -> int:
    return len(s.encode("utf-16-le", "surrogatepass")) // 2


def draw_position(data, text: str) -> dict:
    """A position in `text` or just past a line's end (or one line past the last)."""
    starts = [0] + [m.end() for m in _EOL.finditer(text)]
    line = data.draw(st.integers(0, len(starts)))
    if line < len(starts):
        end = starts[line + 1] if line + 1 < len(starts) else len(text)
        width = units(_EOL.sub("", text[starts[line]:end]))
    else:
        width = 2
    return {"line": line, "character": data.draw(st.integers(0, width + 1))}


# Line breaks of every kind (and "\r" then "\n" that may meet), astral characters, lone surrogates.
PIECES = st.sampled_from(list("ab \t\n\r") + ["\r\n", "\n\n", "é", "🎉", "\ud83c", "\udf89"])
small_text = st.lists(PIECES, max_size=25).map("".join)
FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(text=small_text, data=st.data())
def test_range_edits_match_the_reference_change_by_change(text, data):
    """Results and error messages as before, over sequences of changes at positions that
    mostly fit (each drawn against the text the previous changes left)."""
    changes, current = [], text
    for _ in range(data.draw(st.integers(1, 6))):
        a, b = draw_position(data, current), draw_position(data, current)
        if (a["line"], a["character"]) > (b["line"], b["character"]) and data.draw(st.booleans()):
            a, b = b, a
        change = {"range": {"start": a, "end": b}, "text": data.draw(small_text)}
        if data.draw(st.integers(0, 9)) == 0:
            change = {"text": data.draw(small_text)}  # a full replacement between range changes
        changes.append(change)
        kind, current = outcome(reference_apply, current, [change])
        if kind == "error":
            break
    assert outcome(apply_range_edits, text, changes) == outcome(reference_apply, text, changes)


@FAST
@given(
    text=small_text,
    changes=st.lists(
        st.one_of(
            st.fixed_dictionaries({"range": st.fixed_dictionaries({
                "start": st.fixed_dictionaries({"line": st.integers(-1, 5), "character": st.integers(-1, 9)}),
                "end": st.fixed_dictionaries({"line": st.integers(-1, 5), "character": st.integers(-1, 9)}),
            }), "text": small_text}),
            st.sampled_from([
                {"range": {"start": {"line": 0}}, "text": "x"},
                {"range": {"start": {"line": 0, "character": 0}, "end": []}, "text": "x"},
                {"range": "0:0", "text": "x"},
                {"range": {"start": {"line": "0", "character": 0}, "end": {"line": 0, "character": 0}},
                 "text": "x"},
                {"range": {"start": {"line": 0, "character": 0}, "end": {"line": 0, "character": 0}}},
                {"text": "a\r\nb\n"},
                "not a change",
            ]),
        ),
        max_size=5,
    ),
)
def test_range_edits_match_the_reference_on_any_input(text, changes):
    assert outcome(apply_range_edits, text, changes) == outcome(reference_apply, text, changes)


def test_crlf_joined_by_an_edit_is_one_line_break():
    # "\r" ends line 0; inserting "\n" after it makes "\r\n": one break, so two lines, not three.
    text = apply_range_edits("a\rb", [{"range": {"start": {"line": 1, "character": 0},
                                                 "end": {"line": 1, "character": 0}}, "text": "\n"}])
    assert text == "a\r\nb"
    out = apply_range_edits(text, [{"range": {"start": {"line": 1, "character": 1},
                                              "end": {"line": 1, "character": 1}}, "text": "!"}])
    assert out == "a\r\nb!"
    with pytest.raises(CodeSignalsError, match="past the document's 2 lines"):
        apply_range_edits(text, [{"range": {"start": {"line": 2, "character": 0},
                                            "end": {"line": 2, "character": 0}}, "text": "x"}])


def end_of_line_changes(line: int, character: int, count: int, text: str = "") -> list[dict]:
    pos = {"line": line, "character": character}
    return [{"range": {"start": pos, "end": pos}, "text": text}] * count


def cpu_seconds(fn, *args):
    t0 = time.process_time()
    result = fn(*args)
    return time.process_time() - t0, result


@pytest.mark.timeout(60)
def test_many_changes_at_the_end_of_a_long_line_are_cheap():
    """The probe: 200 changes at the end of a 500,000-character line (old code: ~14 s)."""
    line = "x" * 500_000
    spent, out = cpu_seconds(apply_range_edits, line, end_of_line_changes(0, 500_000, 200))
    assert out == line
    assert spent < 2.0, f"{spent:.2f} s CPU for 200 changes"
    # Non-ASCII, astral characters: the position is found by encoding, not by a Python loop.
    emoji = "🎉a" * 100_000
    spent, out = cpu_seconds(apply_range_edits, emoji, end_of_line_changes(0, 300_000, 200, "z"))
    assert out == emoji + "z" * 200
    assert spent < 4.0, f"{spent:.2f} s CPU for 200 changes on an astral line"


@pytest.mark.timeout(60)
def test_many_changes_in_a_document_of_many_lines_are_cheap():
    """256 changes that add lines across a 50,000-line document (old code: ~5 s: it found
    every line start again for each change)."""
    doc = "".join(f"line {i:6d} = {'y' * 27}\n" for i in range(50_000))
    changes = [{"range": {"start": {"line": 190 * k, "character": 5}, "end": {"line": 190 * k, "character": 11}},
                "text": "ab\ncd"} for k in range(256)]
    spent, out = cpu_seconds(apply_range_edits, doc, changes)
    assert out.count("\n") == 50_000 + 256 and out.startswith("line ab\ncd = ")
    assert spent < 1.0, f"{spent:.2f} s CPU"


# -- changed_regions -----------------------------------------------------------------


def rebuild(before: str, after: str, regions) -> str:
    parts, pos = [], 0
    for c in regions:
        assert pos <= c.before_start <= c.before_end
        parts += [before[pos:c.before_start], c.new(after)]
        pos = c.before_end
    return "".join(parts) + before[pos:]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("lines, small", [(1_600, 0), (2_400, 4000), (20_000, 4000), (200_000, 4000)])
def test_line_diff_of_repeated_lines_is_bounded(lines, small):
    """ "a\\n" * n -> "a\\nb\\n" * (n / 2): difflib took 48 s at 1,600 lines (diffed by lines
    from the first character: small=0) and 3 minutes at 2,400 (the probe's 4.8 KB edit)."""
    before, after = "a\n" * lines, "a\nb\n" * (lines // 2)
    spent, regions = cpu_seconds(changed_regions, before, after, 80, small)
    assert rebuild(before, after, regions) == after
    assert spent < 2.0, f"{spent:.2f} s CPU for {lines} lines"


def test_far_apart_edits_of_a_large_file_stay_separate_regions():
    # 30,000 lines on each side is past one LCS (2^25 line pairs): the file is cut at unique lines first.
    lines = [f"value_{i} = compute({i}, {i * 7 % 13})\n" for i in range(30_000)]
    assert len(lines) ** 2 > edits_module._MAX_DIFF_CELLS
    changed = list(lines)
    changed[100] = "value_100 = 'one hundred'\n"
    changed[29_000] = "value_29000 = 'many'\n"
    before, after = "".join(lines), "".join(changed)
    spent, regions = cpu_seconds(changed_regions, before, after)
    assert [r.new(after) for r in regions] == ["'one hundred'", "'many'"]
    assert spent < 2.0


line_lists = st.lists(st.sampled_from(["a\n", "b\n", "c = 1\n", "}\n", "\n", "x\r\n", "def f():\n"]), max_size=40)


@FAST
@given(old=line_lists, new=line_lists, cells=st.sampled_from([1, 4, 16, 1 << 25]))
def test_line_diff_rebuilds_after_whatever_the_bound(old, new, cells):
    """With a tiny bound every path runs: unique-line anchors, nested parts, whole-part fallback."""
    before, after = "".join(old), "".join(new)
    original = edits_module._MAX_DIFF_CELLS
    edits_module._MAX_DIFF_CELLS = cells
    try:
        regions = changed_regions(before, after, merge_gap=0, small=0)
    finally:
        edits_module._MAX_DIFF_CELLS = original
    assert rebuild(before, after, regions) == after
    assert all(a.after_end <= b.after_start for a, b in itertools.pairwise(regions))
    assert (regions == []) == (before == after)
