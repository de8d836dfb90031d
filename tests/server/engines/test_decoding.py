"""The engines' shared text pipeline: healing, stop tokens, and shaping a completion."""

from __future__ import annotations

import pytest

from code_signals.prompts import heal_prefix
from server.engines.base import GenerationRequest
from server.engines.decoding import (
    CompletionShaper,
    Prompt,
    TokenStream,
    VocabIndex,
    encode_prompt,
    stop_token_ids,
)


@pytest.fixture(scope="module")
def qwen_tokenizer(qwen_coder):
    return qwen_coder[1]


@pytest.fixture(scope="module")
def vocab(qwen_tokenizer):
    return VocabIndex(qwen_tokenizer)


@pytest.mark.parametrize("text, kept, healed", [
    ("def add(a, b):\n    ", "def add(a, b):\n", "    "),
    ("        return len(self.ite", "        return len(self.", "ite"),
    ("path = os.", "path = os", "."),
])
def test_heal_prefix_backs_off_the_last_token(qwen_tokenizer, text, kept, healed):
    assert heal_prefix(qwen_tokenizer, text) == (kept, healed)


def test_heal_prefix_leaves_special_tokens_and_empty_text(qwen_tokenizer):
    assert heal_prefix(qwen_tokenizer, "") == ("", "")
    assert heal_prefix(qwen_tokenizer, "def") == ("def", "")  # nothing would be left to condition on
    assert heal_prefix(qwen_tokenizer, "x<|endoftext|>") == ("x<|endoftext|>", "")


def test_healed_fim_prompt_moves_the_backed_off_text_into_the_middle(qwen_tokenizer):
    prompt = encode_prompt(qwen_tokenizer, GenerationRequest(prompt="if x:\n    ", suffix="\nelse:\n", heal=True))
    text = qwen_tokenizer.decode(prompt.ids)
    assert prompt.healed == "    " and text.startswith("<|fim_prefix|>if x:\n<|fim_suffix|>")


def test_vocab_index_allows_tokens_that_reproduce_the_pending_text(vocab):
    allowed = vocab.allowed("    ")
    texts = {vocab.texts[i] for i in allowed}
    assert "   " in texts and " " in texts and "     " in texts  # shorter and longer ones both fit
    assert all(t.startswith("    ") or "    ".startswith(t) for t in texts)
    assert "return" not in texts and "<|endoftext|>" not in texts


def test_stop_tokens_include_fim_file_and_chat_markers(qwen_tokenizer):
    ids = stop_token_ids(qwen_tokenizer)
    for token in ("<|endoftext|>", "<|im_end|>", "<|fim_middle|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>"):
        assert qwen_tokenizer.convert_tokens_to_ids(token) in ids, token
    assert qwen_tokenizer.convert_tokens_to_ids("return") not in ids


def shape(text: str, mode=None, prefix="", suffix=None, pieces=3) -> str:
    """Feed text in a few pieces (as tokens arrive), then flush."""
    shaper = CompletionShaper(mode, prefix, suffix)
    step = max(1, len(text) // pieces)
    out = "".join(shaper.feed(text[i:i + step]) for i in range(0, len(text), step))
    return out + shaper.flush()


def test_block_mode_from_the_indentation_completes_the_rest_of_the_block():
    prefix = "def add(a, b):\n    "
    assert shape("return a + b\n\ndef subtract(a, b):\n    return a - b\n", "block", prefix) == "return a + b"
    body = "total = a + b\n    if total:\n        return total\n    return 0\n\nprint(1)"
    assert shape(body, "block", prefix) == "total = a + b\n    if total:\n        return total\n    return 0"
    # At column 0 the block is one top-level item.
    assert shape("def f():\n    return 1\n\ndef g():\n", "block", "x = 1\n") == "def f():\n    return 1"


def test_block_mode_inside_a_line_ends_with_the_statement():
    body = "\n    total = a + b\n    if total:\n        return total\n\nprint(1)"
    assert shape(body, "block", "def add(a, b):") == "\n    total = a + b\n    if total:\n        return total"
    assert shape("a, b)\n    y = 2\n", "block", "    x = f(") == "a, b)"


def test_line_mode_keeps_the_first_line_with_content():
    assert shape("items)\n        return x\n", "line", "    return len(self.") == "items)"
    assert shape("\n    return 1\n    y = 2", "line", "def f():") == "\n    return 1"


def test_a_line_repeating_the_suffix_ends_the_completion():
    suffix = "\n\nprint(is_even(4))\n"
    out = shape("return n % 2 == 0\n\nprint(is_even(5))  # Output: False", None, "def is_even(n):\n    ", suffix)
    assert out == "return n % 2 == 0"
    assert shape("x = 1\n}\n", None, "func f() {\n\t", "\n}\n") == "x = 1"


def test_a_markdown_fence_ends_the_completion_and_no_dangling_newline_is_kept():
    assert shape("return len(self.items)\n```\n\nThis returns the size.", None, "    ") == "return len(self.items)"
    assert shape("a = 1\n\n\n", None, "") == "a = 1"


def test_no_more_whitespace_after_the_indentation_the_user_has():
    assert shape("    return x", None, "def f():\n    ") == "return x"
    assert shape("    return x", None, "def f():\n") == "    return x"  # at column 0 the model indents


def test_token_stream_reproduces_and_drops_the_healed_text(qwen_tokenizer, vocab):
    request = GenerationRequest(prompt="def add(a, b):\n    ", heal=True, trim=True, mode="block")
    prompt = encode_prompt(qwen_tokenizer, request)
    stream = TokenStream(qwen_tokenizer, request, prompt, stop_token_ids(qwen_tokenizer), vocab)
    tokens = qwen_tokenizer("   ")["input_ids"] + qwen_tokenizer(" return a + b\n\ndef f():")["input_ids"]
    assert stream.allowed() is not None and tokens[0] in stream.allowed()
    chunks = [stream.push(t, logprob=-0.5) for t in tokens]
    assert stream.allowed() is None  # healed after the first token
    last = stream.finish("length") if not chunks[-1].finish_reason else chunks[-1]
    text = "".join(c.text for c in chunks) + ("" if last is chunks[-1] else last.text)
    assert text == "return a + b" and last.finish_reason in ("stop", "length")
    assert last.confidence == {"mean_logprob": -0.5, "first_token_prob": pytest.approx(0.606531, abs=1e-6)}


def test_a_stop_token_ends_the_stream_without_its_text(qwen_tokenizer):
    request = GenerationRequest(prompt="x = ")
    stream = TokenStream(qwen_tokenizer, request, Prompt(qwen_tokenizer("x = ")["input_ids"]),
                         stop_token_ids(qwen_tokenizer))
    first = stream.push(qwen_tokenizer.convert_tokens_to_ids("1"))
    end = stream.push(qwen_tokenizer.convert_tokens_to_ids("<|fim_pad|>"))
    assert first.text == "1" and end.finish_reason == "stop" and end.text == "" and end.token_ids == []


def test_a_stop_sequence_releases_the_shaped_partial_line(qwen_tokenizer):
    request = GenerationRequest(prompt="x = ", stop=("\n",), trim=True)
    stream = TokenStream(qwen_tokenizer, request, Prompt(qwen_tokenizer("x = ")["input_ids"]),
                         stop_token_ids(qwen_tokenizer))
    chunks = []
    for token in qwen_tokenizer("a + b\nc")["input_ids"]:
        chunks.append(stream.push(token))
        if chunks[-1].finish_reason:
            break
    assert "".join(c.text for c in chunks) == "a + b" and chunks[-1].finish_reason == "stop"
