"""server/adaptation/training_file.py: JSONL training files checked line by line, and their examples."""

from __future__ import annotations

import json

import pytest

from server.adaptation.training_file import SHAPE, TrainingFileError, examples, parse
from tests.privacy_repo import AWS_KEY, PRIVATE_KEY


def jsonl(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def test_parse_accepts_both_shapes_and_skips_blank_lines():
    data = jsonl({"prompt": "def f(", "completion": "x):\n"}) + b"\n  \n" + jsonl({"text": "y = 2\n"})
    assert parse(data) == [{"prompt": "def f(", "completion": "x):\n"}, {"text": "y = 2\n"}]
    assert parse(b'{"text": "caf\xc3\xa9"}\r\n') == [{"text": "café"}]  # CRLF line ends


@pytest.mark.parametrize("data, message", [
    (jsonl({"text": "a"}, {"text": "b"}) + b'{"text": "c"\n', "line 3: not valid JSON"),
    (jsonl({"text": "a"}) + b"[1, 2]\n", "line 2: expected an object with prompt and completion, or text"),
    (jsonl({"prompt": "a"}), "line 1: expected an object with prompt and completion, or text"),
    (jsonl({"prompt": "a", "completion": "b", "extra": 1}), "line 1: expected an object"),
    (jsonl({"prompt": "a", "completion": 3}), "line 1: expected an object"),
    (jsonl({"messages": [{"role": "user", "content": "hi"}]}), "line 1: expected an object"),
    (jsonl({"text": "a"}, {"prompt": "a", "completion": "  \n"}), "line 2: the completion is empty"),
    (jsonl({"text": ""}), "line 1: the text is empty"),
    (b"", "the file has no examples"),
    (b"\n\n", "the file has no examples"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "the file is binary"),
    (jsonl({"text": "a"}) + b'{"text": "\xff\xfe"}\n', "line 2: not UTF-8 text"),
    (jsonl({"text": "a"}, {"prompt": "key = ", "completion": f'"{AWS_KEY}"'}), "line 2: holds a secret (AWS access key)"),
    (jsonl({"text": PRIVATE_KEY}), "line 1: holds a secret (private key)"),
])
def test_parse_names_the_first_bad_line(data, message):
    with pytest.raises(TrainingFileError) as err:
        parse(data)
    assert message in str(err.value)


@pytest.mark.parametrize("line", [
    b"[" * 100_000 + b"]" * 100_000,  # json.loads would end in RecursionError (a 500 on upload)
    b'{"text": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
    b'{"prompt": "a", "completion": ' + b"{" * 65 + b"}" * 65 + b"}",  # just past the limit
], ids=["100k", "5k-in-a-value", "65"])
def test_a_line_nested_too_deep_is_a_bad_line_like_any_other(line):
    with pytest.raises(TrainingFileError) as err:
        parse(jsonl({"text": "a"}) + line + b"\n")
    assert str(err.value) == "line 2: JSON nested deeper than 64 levels; " + SHAPE


def test_brackets_inside_strings_are_not_nesting():
    record = {"prompt": "x = " + "[" * 200, "completion": "{" * 200 + "]"}
    assert parse(jsonl(record)) == [record]


def test_examples_train_on_the_completion_and_on_all_of_a_text(tokenizer):
    from code_signals import ExampleBuilder

    builder = ExampleBuilder(tokenizer, max_tokens=256, max_examples=4)
    prompt = "def add(a, b):\n    return"
    pair, text = examples(builder, [{"prompt": prompt, "completion": " a + b\n"}, {"text": "total = add(1, 2)\n"}])
    first = next(i for i, w in enumerate(pair.loss_weights) if w > 0)
    assert first > 0 and all(w > 0 for w in pair.loss_weights[first:])
    # Context: the prompt (its last token may move to the targets, as token healing serves it).
    assert prompt.startswith(tokenizer.decode(pair.input_ids[:first]))
    assert tokenizer.decode(pair.input_ids[first:]).endswith(" a + b\n")
    assert prompt + " a + b\n" == tokenizer.decode(pair.input_ids)
    assert all(w > 0 for w in text.loss_weights) and text.target_text.startswith("total = add(1, 2)")
