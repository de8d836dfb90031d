"""``HFEngine``: the embedded transformers engine (CPU or one GPU).

Generation is our own decode loop over a KV cache rather than
``model.generate``, so that every token is yielded as it is produced and a
cancel event is honoured between any two tokens. Concurrent generations share
each decode forward (continuous batching, ``engines/batching.py``): a request's
prompt is prefilled alone (from the first chunk it does not share with a recent
prompt on the same adapter, ``engines/prefix_cache.py``), in chunks, by the request's own thread, one
``gate.FairTurns`` turn per chunk (round robin between clients, so one client's
burst of requests cannot starve another's), then the request joins the batch
whose steps a scheduler thread runs, one turn each. Each request's thread keeps
its sampling, healing mask, stops and logprobs, so a row's output is the same
alone as in any batch. A greedy row alone in the batch feeds a prompt-lookup
draft with its token and keeps what greedy decoding agrees with (several tokens
per forward where the output repeats its context). The adapter is bound per forward: the row's own for its
prefill, all rows' (``adapter_core.layer.RowAdapters``) for a step.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterator

import torch
from transformers import DynamicCache

from code_signals.prompts import has_fim
from server.devices import serving_stream
from server.engines.base import ContextLengthError, GenerationChunk, GenerationRequest
from server.engines.batching import BatchRow, BatchScheduler, check_mergeable
from server.engines.decoding import (
    TokenizerEngine,
    adapter_context,
    is_greedy,
    sample_token,
    stop_token_ids,
)
from server.engines.gate import FairTurns, ServingGate
from server.engines.prefix_cache import PrefixCache
from server.engines.prompt_lookup import MAX_DRAFT, propose_draft
from server.models import cache_argument

log = logging.getLogger("dynarank.engine")


PREFILL_CHUNK = 256  # prompt tokens per prefill forward: the batch waits at most one chunk between two steps


class HFEngine(TokenizerEngine):
    """``server.engines.base.Engine`` on a transformers causal LM."""

    def __init__(self, model, tokenizer, model_name: str, gate: ServingGate | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, prompt_lookup: bool = True, prefix_cache: bool = True):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, not {prefill_chunk}")
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.gate = gate or ServingGate()
        self.fim = has_fim(tokenizer)
        self.max_context = getattr(model.config, "max_position_embeddings", None)
        self.stop_ids = stop_token_ids(tokenizer, self._eos_ids())
        self.prefill_chunk = prefill_chunk
        self.prompt_lookup = prompt_lookup  # greedy rows alone verify drafts from their own context
        # Recent prompts' caches: a prompt that starts like one of them is prefilled only from where they differ.
        self.prefix_cache = PrefixCache() if prefix_cache else None
        self.turns = FairTurns()  # one forward at a time: prefill chunks round robin between clients, and steps
        self.batch = BatchScheduler(self._forward_now, self.turns)
        self._cache_arg = cache_argument(model)
        check_mergeable(self._new_cache())

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

    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def close(self) -> None:
        self.batch.close()

    def _prefill(self, ids: list[int], adapter, cancel: threading.Event | None):
        """The prompt alone, in chunks of ``prefill_chunk``, one turn each: ``(last logits, cache)``, or
        None when ``cancel`` was set first (a chunk waiting for its turn is never computed). The chunks a
        recent prompt shares with it come from the prefix cache, which keeps this one's, even cancelled:
        the next keystroke's prompt starts the same."""
        if self.prefix_cache is not None:
            reused, cache = self.prefix_cache.lookup(adapter, ids, self.prefill_chunk, self._new_cache)
        else:
            reused, cache = 0, self._new_cache()
        logits = None
        for start in range(reused, len(ids), self.prefill_chunk):
            with self.turns.turn(cancel) as granted:
                if not granted or (cancel is not None and cancel.is_set()):
                    self._keep_prefix(adapter, ids[:start], cache, reused)
                    return None
                chunk = torch.tensor([ids[start:start + self.prefill_chunk]], device=self.device)
                logits = self._forward_now(chunk, cache, adapter)[0, -1]
        self._keep_prefix(adapter, ids, cache, reused)
        return logits, cache

    def _keep_prefix(self, adapter, ids: list[int], cache, reused: int) -> None:
        if self.prefix_cache is not None and len(ids) > reused:
            self.prefix_cache.store(adapter, ids, cache, reused, self.prefill_chunk)

    def _forward_now(self, input_ids: torch.Tensor, cache, adapter, attention_mask=None,
                     position_ids=None) -> torch.Tensor:
        """Float32 logits (rows, positions, vocab): a prefill (no mask) keeps its last position, a batch
        step (``attention_mask`` and ``position_ids`` from ``BatchCache``) every position it fed."""
        keep = 1 if attention_mask is None else input_ids.shape[1]
        with torch.inference_mode(), serving_stream(self.device), adapter_context(self.model, adapter):
            kwargs = {self._cache_arg: cache}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, logits_to_keep=keep, **kwargs)
            return out.logits.float()

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
            generator = torch.Generator(device=self.device)
            if request.seed is not None:
                generator.manual_seed(request.seed)
            else:
                generator.seed()
        stream = self.token_stream(request, prompt)
        if budget <= 0:
            yield stream.finish("length")
            return
        prefilled = self._prefill(prompt.ids, adapter, cancel)
        if prefilled is None:  # cancelled before its prompt was computed
            yield stream.finish("cancelled")
            return
        logits, cache = prefilled
        row = BatchRow(adapter, cancel, cache, position=len(prompt.ids))
        context = list(prompt.ids)  # what a prompt-lookup draft is looked up in
        queued = [logits]  # logits to sample from, in order: a step returns one per token it kept
        try:
            for produced in range(1, budget + 1):
                token, chunk = self._sample(request, stream, queued.pop(0), generator)
                context.append(token)
                if chunk.finish_reason:
                    yield chunk
                    return
                if produced < budget and not queued:
                    # Before yielding: the next step need not wait for this generation's consumer.
                    draft = self._draft(row, request, stream, context, budget - produced - 1)
                    self.batch.submit(row, [token, *draft], drafted=len(draft))
                yield chunk
                if produced == budget:
                    break
                if cancel is not None and cancel.is_set():
                    yield stream.finish("cancelled")
                    return
                if not queued:
                    step = self.batch.wait(row)
                    if step is None:  # cancelled while the step ran
                        yield stream.finish("cancelled")
                        return
                    queued = list(step)
            yield stream.finish("length")
        finally:
            self.batch.leave(row)

    def _draft(self, row: BatchRow, request, stream, context: list[int], room: int) -> list[int]:
        """Tokens likely to follow ``context`` (prompt lookup), for a greedy row alone in the batch and
        past its healing constraint: what greedy decoding would produce is kept, so the output is the
        same, in fewer forwards. Batched rows get none: every row would pay for the longest draft."""
        if not self.prompt_lookup or room <= 0 or not is_greedy(request.temperature) \
                or stream.allowed() is not None or not self.batch.alone(row):
            return []
        return propose_draft(context, max_draft=min(room, MAX_DRAFT))

    def _sample(self, request, stream, logits: torch.Tensor, generator) -> tuple[int, GenerationChunk]:
        """One token from ``logits`` (vocab) and its chunk from the row's ``TokenStream``."""
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
            top_k = request.logprobs
            if top_k > 0:
                values, ids = torch.topk(logp, min(top_k, logp.numel()))
                tops = [{self.token_text(int(i)): float(v) for v, i in zip(values, ids)}]
        return token, stream.push(token, float(logp[token]), lps, tops)
