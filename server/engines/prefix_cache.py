"""Prompt KV caches kept between generations: a prompt that starts like a recent one is prefilled only from
where the two differ. An editor asks again at nearly every keystroke, with the same text up to the cursor.

An entry holds one prefilled prompt's ids and cache, for one adapter snapshot (compared by identity: a
snapshot is immutable, so its keys and values for a prefix never change; the base model is ``None``; a live
adapter, whose weights train in place, is never cached). Reuse is counted in whole prefill chunks, so a
reused prompt runs the very forwards a fresh one would from there and gives the same tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from adapter_core.snapshot import AdapterSnapshot

MAX_ENTRIES = 8  # prompts kept, least recently used dropped first: a few sessions' documents
# Bytes of keys and values kept. Qwen2.5-Coder-0.5B in float32 takes 24 KiB a token: 8 editor prompts of
# 2,100 tokens (the 8,000-character window) fit; a long HTTP prompt may push out the others, or not be kept.
MAX_BYTES = 512 * 2**20


def cacheable(adapter) -> bool:
    return adapter is None or isinstance(adapter, AdapterSnapshot)


def common_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class _Entry:
    def __init__(self, adapter, ids: list[int], layers: list[tuple]):
        self.adapter = adapter
        self.ids = ids
        self.layers = layers  # per layer (keys, values), (batch, heads, tokens, head dim)
        self.nbytes = sum(t.nbytes for pair in layers for t in pair)


class PrefixCache:
    """Recently prefilled prompts, per adapter snapshot; thread-safe (each request prefills in its own thread)."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES):
        if max_entries < 1 or max_bytes < 1:
            raise ValueError(f"max_entries and max_bytes must be at least 1, not {max_entries} and {max_bytes}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: list[_Entry] = []  # most recently used last
        self._lock = threading.Lock()
        self.reused_tokens = 0  # prompt tokens not prefilled again, since start
        self.prefilled_tokens = 0  # prompt tokens prefilled, since start

    def figures(self) -> dict:
        with self._lock:
            return {"reused_tokens": self.reused_tokens, "prefilled_tokens": self.prefilled_tokens,
                    "entries": len(self._entries), "bytes": sum(e.nbytes for e in self._entries)}

    def lookup(self, adapter, ids: list[int], chunk: int, new_cache: Callable):
        """``(n, cache)``: a new cache holding the keys and values of ``ids[:n]``, ``n`` a multiple of the
        engine's prefill ``chunk`` and below ``len(ids)`` (the last token is always fed, for its logits);
        ``(0, new cache)`` when no kept prompt for ``adapter`` shares a whole chunk with ``ids``."""
        cache = new_cache()
        best, reuse = None, 0
        if cacheable(adapter):
            with self._lock:
                for entry in self._entries:
                    if entry.adapter is adapter:
                        n = min(common_length(entry.ids, ids), len(ids) - 1) // chunk * chunk
                        if n > reuse:
                            best, reuse = entry, n
                if best is not None:
                    self._entries.remove(best)
                    self._entries.append(best)
        if best is not None:
            for index, (keys, values) in enumerate(best.layers):
                # Views of the kept tensors: a prefill adds to a layer by concatenating, never in place.
                cache.update(keys[..., :reuse, :], values[..., :reuse, :], index)
        return reuse, cache

    def store(self, adapter, ids: list[int], cache, reused: int, chunk: int) -> None:
        """Keep ``cache``, just prefilled for ``ids`` (``reused`` of them came from ``lookup``). It replaces
        the kept prompts of ``adapter`` it shares a chunk or more with: they were earlier states of the same
        document (other documents share at most the prompt's first markers)."""
        with self._lock:
            self.reused_tokens += reused
            self.prefilled_tokens += len(ids) - reused
        if not cacheable(adapter):
            return
        if sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) > self.max_bytes:
            return
        layers = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]  # the batch may merge it
        entry = _Entry(adapter, list(ids), layers)
        with self._lock:
            self._entries = [e for e in self._entries
                             if not (e.adapter is adapter and common_length(e.ids, ids) >= chunk)]
            self._entries.append(entry)
            del self._entries[:-self.max_entries]
            while sum(e.nbytes for e in self._entries) > self.max_bytes:
                del self._entries[0]
