"""Range edits, changed regions, edit types and burst coalescing."""

from __future__ import annotations

import pytest

from code_signals import (
    CodeSignalsError,
    EditCoalescer,
    apply_range_edits,
    changed_regions,
    classify_edit_type,
    is_whitespace_only,
)


def rng(l1, c1, l2, c2):
    return {
        "start": {"line": l1, "character": c1},
        "end": {"line": l2, "character": c2},
    }


def test_apply_range_edits_basic_and_sequential():
    text = "def f():\n    return 1\n"
    out = apply_range_edits(
        text,
        [
            {"range": rng(1, 11, 1, 12), "text": "2"},
            {"range": rng(0, 4, 0, 5), "text": "g"},
            {"range": rng(2, 0, 2, 0), "text": "x = g()\n"},
        ],
    )
    assert out == "def g():\n    return 2\nx = g()\n"
    assert apply_range_edits(text, [{"text": "new"}]) == "new"


def test_apply_range_edits_utf16_and_crlf():
    text = "s = '🎉a'\r\nb = 1\r\n"
    # 🎉 is two UTF-16 units: 'a' sits at character 7, not 6.
    assert (
        apply_range_edits(text, [{"range": rng(0, 7, 0, 8), "text": "Z"}])
        == "s = '🎉Z'\r\nb = 1\r\n"
    )
    assert (
        apply_range_edits(text, [{"range": rng(1, 4, 1, 5), "text": "2"}])
        == "s = '🎉a'\r\nb = 2\r\n"
    )
    with pytest.raises(CodeSignalsError, match="surrogate"):
        apply_range_edits(text, [{"range": rng(0, 6, 0, 6), "text": "x"}])


@pytest.mark.parametrize(
    "change",
    [
        {"range": rng(5, 0, 5, 0), "text": "x"},  # line past the end
        {"range": rng(0, 40, 0, 41), "text": "x"},  # character past the line
        {"range": rng(0, 3, 0, 1), "text": "x"},  # end before start
        {"range": {"start": {"line": 0}}, "text": "x"},  # malformed
        {"range": rng(0, 0, 0, 0)},  # no text
        {"range": rng(-1, 0, 0, 0), "text": "x"},
    ],
)
def test_apply_range_edits_rejects_ranges_that_do_not_fit(change):
    with pytest.raises(CodeSignalsError):
        apply_range_edits("abc\ndef\n", [change])


def test_changed_regions_single_and_multiple():
    before = "a = 1\nb = 2\n"
    after = "a = 10\nb = 2\n"
    (c,) = changed_regions(before, after)
    assert c.old(before) == "" and c.new(after) == "0"
    assert changed_regions("same", "same") == []
    lines = [f"line_{i} = {i}\n" for i in range(600)]
    before = "".join(lines)
    changed = list(lines)
    changed[10] = "line_10 = 'ten'\n"
    changed[500] = "line_500 = 'five hundred'\n"
    after = "".join(changed)
    regions = changed_regions(before, after)
    assert [r.new(after) for r in regions] == ["'ten'", "'five hundred'"]


def test_whitespace_only():
    assert is_whitespace_only("x = 1", "x  =  1\n")
    assert not is_whitespace_only("x = 1", "x = 2")


@pytest.mark.parametrize(
    "old, new, kind",
    [
        ("", "def helper(x):\n    return x * 2\n", "new_code"),
        ("   ", "print(1)\n", "new_code"),
        ("", " + 1", "bug_fix"),
        ("", "  # note", "modification"),
        (
            "pass",
            "total = 0\nfor x in items:\n    total += x\nreturn total",
            "new_code",
        ),
        ("i < n", "i <= n", "bug_fix"),
        ("return x", "return x + 1", "bug_fix"),
        ("# old comment", "# new comment", "modification"),
        (
            "def f(a, b):\n    x = a\n    y = b\n    return x + y",
            "def f(a, b):\n    return a + b",
            "modification",
        ),
    ],
)
def test_classify_edit_type(old, new, kind):
    assert classify_edit_type(old, new) == kind


def test_coalescer_burst_settles_after_quiet_period():
    c = EditCoalescer(quiet_s=1.0)
    assert c.feed("x = ", 0.0) is None
    typed = "x = "
    for i, ch in enumerate("value + 1"):  # fast typing: nothing comes out
        typed += ch
        assert c.feed(typed, 0.1 * (i + 1)) is None
    assert c.pending
    assert c.flush(now=1.0) is None  # not quiet long enough yet (last key at 0.9)
    assert c.flush(now=2.0) == ("x = ", "x = value + 1")
    assert not c.pending and c.flush(force=True) is None


def test_coalescer_emits_when_edit_moves_or_user_pauses():
    doc = "a = 1\n" + "\n" * 500 + "b = 2\n"
    c = EditCoalescer(quiet_s=2.0, region_gap=100)
    c.feed(doc, 0.0)
    d1 = doc.replace("a = 1", "a = 11")
    assert c.feed(d1, 0.1) is None
    d2 = d1.replace("b = 2", "b = 22")  # far away: the first burst is done
    assert c.feed(d2, 0.2) == (doc, d1)
    d3 = d2.replace("b = 22", "b = 223")
    assert c.feed(d3, 5.0) == (d1, d2)  # pause before this keystroke closes the burst
    assert c.flush(force=True) == (d2, d3)


def test_coalescer_drops_undone_burst_and_caps_long_bursts():
    c = EditCoalescer(quiet_s=1.0, max_burst_s=2.0)
    c.feed("x", 0.0)
    c.feed("xy", 0.1)
    c.feed("x", 0.2)  # undone
    assert c.flush(now=10.0) is None
    text, out = "x", []
    for i in range(50):  # continuous typing for 5 s
        text += "a"
        res = c.feed(text, 10.0 + 0.1 * i)
        if res:
            out.append(res)
    assert 1 <= len(out) <= 3
    with pytest.raises(CodeSignalsError):
        EditCoalescer(quiet_s=-1)
