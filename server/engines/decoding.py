"""Token-level helpers every engine shares: prompt layout (FIM), detokenization, stops, sampling."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from code_signals import FIM_TOKENS
from server.engines.base import GenerationRequest

_DETOK_CONTEXT = 5  # prompt tokens that seed the incremental decoder (leading-space handling)


def adapter_context(model, adapter):
    """Bind an adapter snapshot (or a per-row list) for the forwards inside the block."""
    if adapter is None:
        return contextlib.nullcontext()
    try:
        from adapter_core import use_adapter
    except ImportError:  # the package may not re-export it
        from adapter_core.layer import use_adapter
    return use_adapter(model, adapter)


def has_fim(tokenizer) -> bool:
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in FIM_TOKENS)


def build_prompt(tokenizer, prompt: str, suffix: str | None) -> str:
    """The text to tokenize: a FIM prompt when a suffix is given and the model knows FIM."""
    if suffix is None or not has_fim(tokenizer):
        return prompt
    pre, suf, mid = FIM_TOKENS
    return f"{pre}{prompt}{suf}{suffix}{mid}"


class IncrementalDecoder:
    """Turns token ids into text deltas that never split a UTF-8 character.

    Decodes a short sliding window (previous tokens + new ones) and emits only
    what the new tokens added, holding back while the window ends in an
    incomplete byte sequence (U+FFFD).
    """

    def __init__(self, tokenizer, context_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(context_ids)
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


class StopMatcher:
    """Cuts generated text at the first stop sequence; holds back a possible stop prefix."""

    def __init__(self, stops):
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Append ``delta``; return the text that is now safe to emit."""
        self.text += delta
        if not self.stops:
            return self._emit(len(self.text))
        longest = max(len(s) for s in self.stops)
        start = max(0, self.emitted - longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(min(hits))
        return self._emit(len(self.text) - self._held_back())

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _held_back(self) -> int:
        # Longest tail of the text that could still grow into a stop sequence.
        for n in range(min(len(self.text), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    """Greedy at temperature 0, else temperature + nucleus sampling from ``generator``."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep the smallest head whose mass reaches top_p (always the first token).
        keep = (torch.cumsum(sorted_p, -1) - sorted_p) < top_p
        pick = torch.multinomial(sorted_p * keep, 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))


def encode_prompt(tokenizer, request: GenerationRequest) -> list[int]:
    """Prompt token ids of a request (FIM layout when it has a suffix); shared by every engine."""
    text = build_prompt(tokenizer, request.prompt, request.suffix)
    ids = tokenizer(text, add_special_tokens=request.add_special_tokens)["input_ids"]
    if not ids:  # completing at the very start of a document: condition on BOS (or EOS) alone
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start] if start is not None else []
    return ids


class TokenizerEngine:
    """The tokenizer-backed half of ``Engine`` every in-tree engine shares."""

    tokenizer: Any

    def encode(self, request: GenerationRequest) -> list[int]:
        return encode_prompt(self.tokenizer, request)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def attach(self, adapters) -> None:
        pass

    def close(self) -> None:
        pass
