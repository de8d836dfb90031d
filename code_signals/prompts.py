"""The layout of a completion prompt, shared by the serving engines and the training examples.

Adapters learn in the format they are asked in: a fill-in-the-middle prompt when
there is text after the cursor and the model has FIM tokens, the plain prefix
otherwise, and in both cases the prompt's last token backed off (token healing)
so that the model, not the cursor, chooses the token boundary.
"""

from __future__ import annotations

FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")


def has_fim(tokenizer) -> bool:
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in FIM_TOKENS)


def build_prompt(tokenizer, prompt: str, suffix: str | None) -> str:
    """The text to tokenize: a FIM prompt when a suffix is given and the model knows FIM."""
    if suffix is None or not has_fim(tokenizer):
        return prompt
    pre, suf, mid = FIM_TOKENS
    return f"{pre}{prompt}{suf}{suffix}{mid}"


def heal_prefix(tokenizer, text: str) -> tuple[str, str]:
    """(text without its last token, that token's text), or (text, "") when it cannot be backed off.

    A prompt that ends mid-token (``"    "`` before ``return``, ``self.ite``) pins
    the model to an unnatural token boundary: Qwen writes ``"):\\n" "   " " return"``,
    never ``"    " "return"``. Backing the last token off and making the first
    generated tokens reproduce it lets the model choose the boundary itself.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2 or ids[-1] in tokenizer.all_special_ids:  # a lone token is the whole context: keep it
        return text, ""
    last = tokenizer.decode(ids[-1:], clean_up_tokenization_spaces=False)
    if not last or "\ufffd" in last or not text.endswith(last):
        return text, ""
    return text[: len(text) - len(last)], last


def completion_prompt_ids(
    tokenizer, prefix: str, suffix: str | None, *, heal: bool = True, add_special_tokens: bool = True
) -> tuple[list[int], str]:
    """(prompt token ids, healed text) of a completion at the end of ``prefix``.

    ``healed`` is the text backed off the prefix: the completion must reproduce it first.
    At the very start of a document the prompt is the BOS (or EOS) token alone.
    """
    prompt, healed = heal_prefix(tokenizer, prefix) if heal else (prefix, "")
    text = build_prompt(tokenizer, prompt, suffix)
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start] if start is not None else []
    return ids, healed
