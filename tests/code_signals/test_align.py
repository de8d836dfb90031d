"""Alignment of character classes to a real tokenizer, and the weight table."""

from __future__ import annotations

import pytest

from code_signals import (
    DEFAULT_WEIGHTS,
    CodeSignalsError,
    Span,
    TokenClass,
    align_to_tokens,
    classify,
    token_weights,
)

T = TokenClass


def test_alignment_rule_on_synthetic_spans():
    # "  def" : whitespace then keyword, "x+" : identifier and operator tie.
    spans = [
        Span(0, 2, T.WHITESPACE),
        Span(2, 5, T.KEYWORD),
        Span(5, 6, T.IDENTIFIER_USE),
        Span(6, 7, T.OPERATOR),
    ]
    assert align_to_tokens(spans, [(0, 5), (5, 7), (0, 2), (3, 3), (7, 9)]) == [
        T.KEYWORD,  # whitespace does not decide when other characters are there
        T.IDENTIFIER_USE,  # 1 vs 1: priority puts names before operators
        T.WHITESPACE,
        T.OTHER,  # empty offsets: special token
        T.OTHER,  # past the text
    ]


def test_alignment_with_real_tokenizer(tokenizer):
    text = 'def greet(name):\n    return "hi " + name  # say\n'
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    classes = align_to_tokens(classify(text, "python"), enc["offset_mapping"])
    assert len(classes) == len(enc["input_ids"])
    by_token = {}
    for (a, b), cls in zip(enc["offset_mapping"], classes):
        by_token.setdefault(text[a:b].strip(), set()).add(cls)
    assert by_token["def"] == {T.KEYWORD}
    assert by_token["return"] == {T.KEYWORD}  # " return" with its leading space
    assert by_token["greet"] == {T.IDENTIFIER_DEF}
    assert T.IDENTIFIER_USE in by_token["name"] and T.IDENTIFIER_DEF in by_token["name"]
    assert by_token["+"] == {T.OPERATOR}
    assert T.COMMENT in by_token["say"] or T.COMMENT in by_token["#"]


def test_alignment_with_special_tokens(tokenizer):
    text = "x = 1\n"
    enc = tokenizer(
        text, return_offsets_mapping=True
    )  # may add BOS/EOS with (0, 0) offsets
    classes = align_to_tokens(classify(text, "python"), enc["offset_mapping"])
    assert len(classes) == len(enc["input_ids"])
    assert T.IDENTIFIER_DEF in classes and T.NUMBER in classes


def test_weights_default_order():
    w = DEFAULT_WEIGHTS
    assert set(w) == set(TokenClass)
    top = min(w[T.KEYWORD], w[T.IDENTIFIER_DEF], w[T.IDENTIFIER_USE])
    for cls in TokenClass:
        if cls not in (T.KEYWORD, T.IDENTIFIER_DEF, T.IDENTIFIER_USE):
            assert w[cls] < top, cls


def test_token_weights_and_overrides():
    classes = [T.KEYWORD, T.WHITESPACE, int(T.STRING)]
    assert token_weights(classes) == [
        DEFAULT_WEIGHTS[T.KEYWORD],
        DEFAULT_WEIGHTS[T.WHITESPACE],
        DEFAULT_WEIGHTS[T.STRING],
    ]
    assert token_weights(
        classes, {"keyword": 3.0, T.WHITESPACE: 0, int(T.STRING): 0.5}
    ) == [3.0, 0.0, 0.5]
    with pytest.raises(CodeSignalsError):
        token_weights(classes, {"not_a_class": 1.0})
    with pytest.raises(CodeSignalsError):
        token_weights(classes, {T.KEYWORD: -1})
