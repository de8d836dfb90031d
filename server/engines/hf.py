"""``HFEngine``: the embedded transformers engine (CPU or one GPU).

Generation is our own decode loop over a KV cache rather than
``model.generate``, so that every token is yielded as it is produced and a
cancel event is honoured between any two tokens. Each forward takes one of
the engine's turns (``gate.FairTurns``): concurrent requests interleave token by
token instead of oversubscribing the cores, round robin between clients so one
client's burst cannot starve another's completion, and a request cancelled
while it waits for its turn stops without computing. The adapter binding is
entered per forward so the iterator may be advanced from any thread.
"""

from __future__ import annotations

import inspect
import logging
import threading
from typing import Iterator

import torch
from transformers import DynamicCache

from code_signals.prompts import has_fim
from server.engines.base import ContextLengthError, GenerationChunk, GenerationRequest
from server.engines.decoding import (
    TokenizerEngine,
    adapter_context,
    sample_token,
    stop_token_ids,
)
from server.engines.gate import FairTurns, ServingGate

log = logging.getLogger("dynarank.engine")


class HFEngine(TokenizerEngine):
    """``server.engines.base.Engine`` on a transformers causal LM."""

    def __init__(self, model, tokenizer, model_name: str, gate: ServingGate | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.gate = gate or ServingGate()
        self.fim = has_fim(tokenizer)
        self.max_context = getattr(model.config, "max_position_embeddings", None)
        self.stop_ids = stop_token_ids(tokenizer, self._eos_ids())
        self.turns = FairTurns()  # one forward at a time, round robin between clients
        # transformers 5 renamed `past_key_values` to `cache`; accept either.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        # The model's own EOS ids; stop_token_ids adds the tokenizer's.
        for source in (getattr(self.model, "generation_config", None), self.model.config):
            value = getattr(source, "eos_token_id", None)
            if value is None:
                continue
            ids.update(value if isinstance(value, (list, tuple)) else [value])
        return ids

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _forward(self, ids: list[int], cache, adapter, cancel: threading.Event | None = None) -> torch.Tensor | None:
        """The last position's logits, or None when ``cancel`` was set before this forward got its turn."""
        with self.turns.turn(cancel) as granted:
            if not granted or (cancel is not None and cancel.is_set()):
                return None
            return self._forward_now(ids, cache, adapter)

    def _forward_now(self, ids: list[int], cache, adapter) -> torch.Tensor:
        with torch.inference_mode(), adapter_context(self.model, adapter):
            input_ids = torch.tensor([ids], device=self.device)
            kwargs = {self._cache_arg: cache}
            out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **kwargs)
            return out.logits[0, -1].float()

    def generate(
        self, request: GenerationRequest, adapter=None, cancel: threading.Event | None = None
    ) -> Iterator[GenerationChunk]:
        prompt = self.encode(request)
        n_prompt = len(prompt.ids)
        if not prompt.ids:
            raise ValueError("the prompt is empty after tokenization")
        budget = request.max_tokens
        if self.max_context:
            if n_prompt >= self.max_context:
                raise ContextLengthError(
                    f"the prompt has {n_prompt} tokens; this model's context is {self.max_context} tokens"
                )
            budget = min(budget, self.max_context - n_prompt)
        with self.gate.serving():
            yield from self._decode_loop(request, prompt, budget, adapter, cancel)

    def _decode_loop(self, request, prompt, budget, adapter, cancel) -> Iterator[GenerationChunk]:
        generator = None
        if request.temperature > 0:
            generator = torch.Generator()
            if request.seed is not None:
                generator.manual_seed(request.seed)
            else:
                generator.seed()
        top_k = request.logprobs or 0
        stream = self.token_stream(request, prompt)
        cache = DynamicCache(config=self.model.config)
        next_input = prompt.ids
        for _ in range(budget):
            if cancel is not None and cancel.is_set():
                yield stream.finish("cancelled")
                return
            logits = self._forward(next_input, cache, adapter, cancel)
            if logits is None:  # cancelled while waiting for the turn: this token is never computed
                yield stream.finish("cancelled")
                return
            allowed = stream.allowed()
            if allowed is not None:  # healing: only tokens that reproduce the backed-off text
                masked = torch.full_like(logits, float("-inf"))
                masked[allowed] = logits[allowed]
                logits = masked
            token = sample_token(logits, request.temperature, request.top_p, generator)
            logp = torch.log_softmax(logits, -1)
            lps = tops = None
            if request.logprobs is not None:
                lps = [float(logp[token])]
                if top_k > 0:
                    values, ids = torch.topk(logp, min(top_k, logp.numel()))
                    tops = [{self.token_text(int(i)): float(v) for v, i in zip(values, ids)}]
            chunk = stream.push(token, float(logp[token]), lps, tops)
            yield chunk
            if chunk.finish_reason:
                return
            next_input = [token]
        yield stream.finish("length")
