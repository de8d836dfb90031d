"""``HFEngine``: the embedded transformers engine (CPU or one GPU).

Generation is our own decode loop over a KV cache rather than
``model.generate``, so that every token is yielded as it is produced and a
cancel event is honoured between any two tokens. Each forward takes the
engine's step lock: concurrent requests interleave token by token instead of
oversubscribing the cores, and the adapter binding is entered per forward so
the iterator may be advanced from any thread.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from typing import Iterator

import torch
from transformers import DynamicCache

from server.engine import GenerationChunk, GenerationRequest
from server.scheduling import ServingGate

log = logging.getLogger("dynarank.engine")

FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
_DETOK_CONTEXT = 5  # prompt tokens that seed the incremental decoder (leading-space handling)


class ContextLengthError(ValueError):
    """The prompt does not leave room for a single new token."""


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


class HFEngine:
    """``server.engine.Engine`` on a transformers causal LM."""

    def __init__(self, model, tokenizer, model_name: str, gate: ServingGate | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.gate = gate or ServingGate()
        self.fim = has_fim(tokenizer)
        self.max_context = getattr(model.config, "max_position_embeddings", None)
        self.eos_ids = self._eos_ids()
        self._lock = threading.Lock()
        # transformers 5 renamed `past_key_values` to `cache`; accept either.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if value is None:
                continue
            ids.update(value if isinstance(value, (list, tuple)) else [value])
        return ids

    @property
    def device(self):
        return next(self.model.parameters()).device

    def encode(self, request: GenerationRequest) -> list[int]:
        return encode_prompt(self.tokenizer, request)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _forward(self, ids: list[int], cache, adapter) -> torch.Tensor:
        with self._lock, torch.inference_mode(), adapter_context(self.model, adapter):
            input_ids = torch.tensor([ids], device=self.device)
            kwargs = {self._cache_arg: cache}
            out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **kwargs)
            return out.logits[0, -1].float()

    def generate(
        self, request: GenerationRequest, adapter=None, cancel: threading.Event | None = None
    ) -> Iterator[GenerationChunk]:
        prompt_ids = self.encode(request)
        n_prompt = len(prompt_ids)
        if not prompt_ids:
            raise ValueError("the prompt is empty after tokenization")
        budget = request.max_tokens
        if self.max_context:
            if n_prompt >= self.max_context:
                raise ContextLengthError(
                    f"the prompt has {n_prompt} tokens; this model's context is {self.max_context} tokens"
                )
            budget = min(budget, self.max_context - n_prompt)
        with self.gate.serving():
            yield from self._decode_loop(request, prompt_ids, budget, adapter, cancel)

    def _decode_loop(self, request, prompt_ids, budget, adapter, cancel) -> Iterator[GenerationChunk]:
        n_prompt = len(prompt_ids)
        generator = None
        if request.temperature > 0:
            generator = torch.Generator()
            if request.seed is not None:
                generator.manual_seed(request.seed)
            else:
                generator.seed()
        top_k = request.logprobs or 0
        want_logprobs = request.logprobs is not None
        decoder = IncrementalDecoder(self.tokenizer, prompt_ids[-_DETOK_CONTEXT:])
        stops = StopMatcher(request.stop)
        cache = DynamicCache(config=self.model.config)

        def final(reason: str, token_ids=(), lps=None, tops=None, text=""):
            return GenerationChunk(text=text, token_ids=list(token_ids), logprobs=lps, finish_reason=reason,
                                   top_logprobs=tops, prompt_tokens=n_prompt)

        next_input = prompt_ids
        for step in range(budget):
            if cancel is not None and cancel.is_set():
                yield final("cancelled", lps=[] if want_logprobs else None)
                return
            logits = self._forward(next_input, cache, adapter)
            token = sample_token(logits, request.temperature, request.top_p, generator)
            if token in self.eos_ids:
                yield final("stop", text=stops.flush(), lps=[] if want_logprobs else None)
                return
            lps = tops = None
            if want_logprobs:
                logp = torch.log_softmax(logits, -1)
                lps = [float(logp[token])]
                if top_k > 0:
                    values, ids = torch.topk(logp, min(top_k, logp.numel()))
                    tops = [{self.token_text(int(i)): float(v) for v, i in zip(values, ids)}]
            text = stops.feed(decoder.push(token))
            if stops.stopped:
                yield final("stop", [token], lps, tops, text)
                return
            if step == budget - 1:
                yield final("length", [token], lps, tops, text + stops.flush())
                return
            yield GenerationChunk(text=text, token_ids=[token], logprobs=lps, top_logprobs=tops)
            next_input = [token]
        yield final("length", lps=[] if want_logprobs else None)
