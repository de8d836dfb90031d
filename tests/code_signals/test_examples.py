"""Training examples from real edits (click history) and from files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from code_signals import CodeSignalsError, ExampleBuilder, TokenClass, TrainingExample

EDITS = Path(__file__).resolve().parents[3] / "shared" / "data" / "click_edits.jsonl.gz"


@pytest.fixture(scope="module")
def click_edits():
    if not EDITS.exists():
        pytest.skip(f"real edit data not found at {EDITS}")
    with gzip.open(EDITS, "rt", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(60), f)]


def check_example(ex: TrainingExample, max_tokens: int):
    n = len(ex.input_ids)
    assert 0 < n <= max_tokens
    assert len(ex.loss_weights) == len(ex.token_classes) == len(ex.in_error) == n
    assert ex.num_targets > 0
    assert all(w >= 0 for w in ex.loss_weights)
    # Targets come last and contiguously: context (weight 0) then targets.
    first = next(i for i, w in enumerate(ex.loss_weights) if w > 0)
    assert all(w > 0 for w in ex.loss_weights[first:]) or any(
        c == TokenClass.WHITESPACE for c in ex.token_classes[first:]
    )
    assert all(c in iter(TokenClass) for c in ex.token_classes)
    assert ex.edit_type in ("new_code", "modification", "bug_fix")


def test_examples_from_real_click_edits(tokenizer, click_edits):
    builder = ExampleBuilder(tokenizer, max_tokens=128, max_examples=3)
    total, types = 0, set()
    for row in click_edits:
        examples = builder.from_edit(row["before"], row["after"], path=row["path"])
        assert len(examples) <= 3
        for ex in examples:
            check_example(ex, 128)
            assert ex.language == "python" and ex.path == row["path"]
            # The targets decode to text that is in the new version of the file.
            assert ex.target_text and ex.target_text in row["after"]
            types.add(ex.edit_type)
        total += len(examples)
    assert total >= 30
    assert {"new_code", "modification"} <= types


def test_targets_are_the_changed_tokens(tokenizer):
    before = "def area(w, h):\n    return w * h\n"
    after = "def area(w, h):\n    return w * h / 2\n"
    (ex,) = ExampleBuilder(tokenizer, max_tokens=64).from_edit(
        before, after, path="geo.py"
    )
    targets = [i for i, w in zip(ex.input_ids, ex.loss_weights) if w > 0]
    # The prompt's last token (" h") is healed as the engine does: it moves to the targets.
    assert tokenizer.decode(targets) == ex.target_text == " h / 2"
    assert tokenizer.decode(ex.input_ids).startswith("def area")
    assert ex.edit_type == "bug_fix"
    assert not ex.fim  # SmolLM2 has no FIM tokens, so no FIM even when asked
    (ex2,) = ExampleBuilder(tokenizer, max_tokens=64, fim_ratio=1.0).from_edit(
        before, after, path="geo.py"
    )
    assert not ex2.fim and ex2.input_ids == ex.input_ids


def test_whitespace_only_and_deletions_give_nothing(tokenizer):
    builder = ExampleBuilder(tokenizer)
    assert builder.from_edit("x = 1\n", "x  =  1\n\n") == []
    assert builder.from_edit("x = 1\ny = 2\n", "x = 1\n") == []
    assert builder.from_edit("", "") == []


def test_sizes_are_bounded(tokenizer):
    before = "".join(f"value_{i} = {i}\n" for i in range(400))
    after = "".join(
        f"value_{i} = {i * 7} + offset\n" if i % 40 == 0 else f"value_{i} = {i}\n"
        for i in range(400)
    )
    after += "def big():\n" + "".join(
        f"    total_{i} = compute({i})\n" for i in range(300)
    )
    builder = ExampleBuilder(tokenizer, max_tokens=48, max_examples=2)
    examples = builder.from_edit(before, after, path="m.py")
    assert len(examples) == 2
    for ex in examples:
        check_example(ex, 48)
        assert ex.num_targets <= 48 * 3 // 4
    # The biggest change (the new function) is among those kept.
    assert any("def big" in ex.target_text for ex in examples)


def test_from_file_chunks_cover_whole_file(tokenizer):
    source = "".join(f"def f{i}(x):\n    return x + {i}\n\n\n" for i in range(40))
    examples = ExampleBuilder(tokenizer, max_tokens=64).from_file(
        source, path="many.py"
    )
    assert len(examples) > 3
    for ex in examples:
        check_example(ex, 64)
        assert all(
            w > 0 for w in ex.loss_weights
        )  # every token of a file chunk is a target
    assert "".join(tokenizer.decode(ex.input_ids) for ex in examples) == source
    assert examples[1].target_text.startswith("def f")  # cut between functions


def test_builder_rejects_bad_arguments(tokenizer):
    with pytest.raises(CodeSignalsError):
        ExampleBuilder(tokenizer, max_tokens=4)
    with pytest.raises(CodeSignalsError):
        ExampleBuilder(object())
    with pytest.raises(CodeSignalsError):
        ExampleBuilder(tokenizer).from_edit(None, "x")


@pytest.mark.real_model
def test_fim_examples_use_qwen_fim_tokens():
    from transformers import AutoTokenizer

    from server.models import ensure_model

    qwen = AutoTokenizer.from_pretrained(
        ensure_model("qwen2.5-coder-0.5b", progress=False)
    )
    before = "def area(w, h):\n    return 0\n\nprint(area(2, 3))\n"
    after = "def area(w, h):\n    return w * h\n\nprint(area(2, 3))\n"
    builder = ExampleBuilder(qwen, max_tokens=64, fim_ratio=1.0)
    (ex,) = builder.from_edit(before, after, path="geo.py")
    assert ex.fim
    ids = qwen.convert_tokens_to_ids(
        ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
    )
    assert (
        ex.input_ids[0] == ids[0] and ids[1] in ex.input_ids and ids[2] in ex.input_ids
    )
    middle = ex.input_ids.index(ids[2])
    assert all(w == 0 for w in ex.loss_weights[: middle + 1])
    # The healed last prompt token leads the targets, as the engine regenerates it.
    assert qwen.decode(ex.input_ids[middle + 1 :]) == ex.target_text == " w * h"
    assert "print(area" in qwen.decode(
        ex.input_ids[:middle]
    )  # the text after the edit is there
    check_example(ex, 64)


def test_bad_and_extreme_input_never_crashes(tokenizer):
    builder = ExampleBuilder(tokenizer, max_tokens=32)
    long_line = (
        "x = [" + ", ".join(str(i) for i in range(20000)) + "]\n"
    )  # ~120k chars on one line
    examples = builder.from_edit(
        long_line, long_line.replace("19999]", "19999, 7]"), path="data.py"
    )
    assert len(examples) == 1 and len(examples[0].input_ids) <= 32
    nul = builder.from_edit("a = 1\n", "a = 1\x00\nb = 2\n", path="x.c")
    assert all(len(ex.input_ids) <= 32 for ex in nul)
    assert (
        builder.from_edit("", "fn main() {}\n", language="rust")[0].edit_type
        == "new_code"
    )
    assert builder.from_file("", path="empty.py") == []
    huge = (
        "def f():\n    return 1\n" * 20000
    )  # ~440 KB: classified only around the edit
    edited = huge + "def g():\n    return 2\n"
    (ex,) = builder.from_edit(huge, edited, path="huge.py")
    assert "def g" in ex.target_text
