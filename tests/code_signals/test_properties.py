"""Property tests: arbitrary text never crashes, spans cover the text exactly once."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from code_signals import (
    LANGUAGES,
    CodeSignalsError,
    EditCoalescer,
    TokenClass,
    align_to_tokens,
    apply_range_edits,
    changed_regions,
    chunk_source,
    classify,
)

CODE_ALPHABET = st.sampled_from(
    list("abcxyz_019 \t\n()[]{}<>:;,.=+-*/%!&|^~?@#$'\"`\\")
    + ["def ", "class ", "return ", "fn ", "func ", "é", "🎉", "\x00", "\r"]
)
code_text = st.lists(CODE_ALPHABET, max_size=80).map("".join)
any_text = st.text(max_size=200)  # includes lone surrogates and control characters
languages = st.sampled_from([*LANGUAGES, "text", "unknown"])
FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def assert_cover(text, spans):
    pos = 0
    for span in spans:
        assert span.start == pos < span.end
        assert isinstance(span.cls, TokenClass)
        pos = span.end
    assert pos == len(text)


@FAST
@given(text=st.one_of(code_text, any_text), language=languages)
def test_classify_covers_text_exactly_once(text, language):
    assert_cover(text, classify(text, language))


@FAST
@given(text=code_text, language=languages, data=st.data())
def test_alignment_never_fails(text, language, data):
    spans = classify(text, language)
    n = len(text)
    offsets = data.draw(
        st.lists(st.tuples(st.integers(0, n + 2), st.integers(0, n + 2)), max_size=20)
    )
    assert len(align_to_tokens(spans, offsets)) == len(offsets)


@FAST
@given(
    text=st.one_of(code_text, any_text),
    max_chars=st.integers(1, 60),
    language=languages,
)
def test_chunks_concatenate_to_text(text, max_chars, language):
    chunks = chunk_source(text, language, max_chars)
    assert "".join(chunks) == text
    assert all(0 < len(c) <= max_chars for c in chunks)


@FAST
@given(before=code_text, after=code_text)
def test_changed_regions_rebuild_after(before, after):
    rebuilt, pos = [], 0
    for c in changed_regions(before, after, small=8):
        rebuilt.append(before[pos : c.before_start])
        rebuilt.append(c.new(after))
        pos = c.before_end
    rebuilt.append(before[pos:])
    assert "".join(rebuilt) == after


@FAST
@given(text=code_text, line=st.integers(-1, 6), char=st.integers(-1, 30), new=code_text)
def test_range_edits_apply_or_raise_clearly(text, line, char, new):
    change = {
        "range": {
            "start": {"line": line, "character": char},
            "end": {"line": line, "character": char},
        },
        "text": new,
    }
    try:
        out = apply_range_edits(text, [change])
    except CodeSignalsError:
        return
    assert len(out) == len(text) + len(new)


@FAST
@given(steps=st.lists(st.tuples(code_text, st.floats(0, 3)), max_size=15))
def test_coalescer_never_crashes(steps):
    c, now = EditCoalescer(quiet_s=1.0), 0.0
    for text, dt in steps:
        now += dt
        pair = c.feed(text, now)
        assert pair is None or pair[0] != pair[1]
    c.flush(force=True)
