"""Continuous batching for ``HFEngine``: every decode step runs all generations in one forward.

A generation (one ``HFEngine.generate`` call, in its own thread) is a ``BatchRow``:

1. its prompt is prefilled alone, in its own cache, by its own thread (``HFEngine``;
   one ``FairTurns`` turn per chunk, round robin between clients);
2. it samples its first token and ``submit``s it: the row joins the batch at the
   next step boundary, its cache merged into the batch cache (one copy);
3. the scheduler thread runs one forward over all rows per step (it takes a turn
   too, so prefills and decode steps alternate) and hands each row its logits;
   the row's thread samples (healing mask, stops, logprobs stay per row), submits
   the next token *before* yielding its chunk, and ``wait``s for the next logits;
4. finished, cancelled or abandoned rows ``leave``; they are dropped at the next
   boundary (one copy), and the left padding no remaining row needs is trimmed.

The batch cache is left-padded: ``BatchCache.valid`` (rows x columns) says which
columns each row attends to, and each row carries its own position ids, so a row
sees exactly the keys it would see alone. A row whose thread has not submitted by
the time the others have (its consumer is slow) is not waited for: it gets a
masked dummy column for that step and rejoins when it submits.

A step feeds each row the tokens it submitted: one when decoding, or its token and
a draft of the tokens likely to follow (prompt lookup, ``engines/prompt_lookup.py``;
rows with fewer tokens are right-padded with masked dummies). The scheduler keeps
the draft's longest prefix that greedy decoding agrees with, masks the columns of
the rest (the row goes on from the last kept position, so nothing is copied), and
``wait`` returns one logits row per kept token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicLayer

from adapter_core.layer import RowAdapters
from server.engines.gate import FairTurns

log = logging.getLogger("dynarank.engine")

POLL_S = 0.05  # how often a waiting row looks at its cancel event
MIN_LAG_S = 0.01  # a row late by more than this (or half a step) is stepped without: it rejoins when it submits
DUMMY_TOKEN = 0  # fed to a row that sits out a step; its column is masked


def check_mergeable(cache) -> None:
    """Rows can be merged only where every cache layer is a plain full-attention ``DynamicLayer``."""
    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if kinds:
        raise NotImplementedError(f"continuous batching needs full-attention cache layers, not {sorted(kinds)}")


class BatchRow:
    """One generation's seat in the batch; fields are shared with the scheduler under its lock."""

    def __init__(self, adapter, cancel: threading.Event | None, cache, position: int):
        self.adapter = adapter
        self.cancel = cancel
        self.cache = cache  # its own prefilled cache until it joins, then None
        self.position = position  # position id of its next input token
        self.pending: list[int] | None = None  # tokens for the next step
        self.drafted = 0  # how many of them, at the end, are a draft to verify greedily
        self.logits: torch.Tensor | None = None  # (tokens submitted, vocab), set by the scheduler
        self.error: BaseException | None = None
        self.ready = threading.Event()  # logits (or an error) delivered
        self.delivered_at = 0.0
        self.lagging = False
        self.done = False  # left: dropped at the next boundary

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


class BatchCache:
    """The batch's KV cache, left-padded, and which of its columns each row attends to."""

    def __init__(self):
        self.cache = None  # a DynamicCache with one row per batch row
        self.valid: torch.Tensor | None = None  # (rows, columns) bool

    @property
    def columns(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]

    def rebuild(self, keep: list[int], joins: list) -> None:
        """Keep the rows at ``keep`` (in order), then append ``joins`` (single-row prefilled caches).

        The only copies of the cache: at a boundary where rows leave or join.
        """
        if self.cache is not None and not keep:
            self.cache = self.valid = None
        elif self.cache is not None and len(keep) < self.valid.shape[0]:
            self._select(keep)
        for cache in joins:
            check_mergeable(cache)
        if joins and self.cache is None:  # the first row's cache becomes the batch cache as it is
            first, joins = joins[0], joins[1:]
            self.cache = first
            self.valid = torch.ones(1, first.get_seq_length(), dtype=torch.bool, device=first.layers[0].keys.device)
        if joins:
            self._append(joins)

    def _select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.valid.device)
        valid = self.valid.index_select(0, index)
        used = valid.any(0).nonzero()
        start = int(used[0]) if len(used) else valid.shape[1]  # leading columns no kept row attends to
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.valid = valid[:, start:]

    def _append(self, joins: list) -> None:
        lengths = [c.get_seq_length() for c in joins]
        old_rows, old_len = self.valid.shape
        width = max(old_len, *lengths)
        rows = old_rows + len(joins)
        valid = torch.zeros(rows, width, dtype=torch.bool, device=self.valid.device)
        valid[:old_rows, width - old_len:] = self.valid
        for i, n in enumerate(lengths):
            valid[old_rows + i, width - n:] = True
        for li, layer in enumerate(self.cache.layers):
            for field in ("keys", "values"):
                old = getattr(layer, field)
                merged = old.new_zeros(rows, old.shape[1], width, old.shape[3])
                merged[:old_rows, :, width - old_len:] = old
                for i, (cache, n) in enumerate(zip(joins, lengths)):
                    merged[old_rows + i, :, width - n:] = getattr(cache.layers[li], field)[0]
                setattr(layer, field, merged)
        self.valid = valid

    def step_inputs(self, feeds: list[list[int] | None], positions: list[int]):
        """``(input_ids, attention_mask, position_ids)`` for one step; ``feeds[i]`` None: row i sits out."""
        width = max(len(f) for f in feeds if f)
        ids = torch.full((len(feeds), width), DUMMY_TOKEN, dtype=torch.long)
        new_valid = torch.zeros(len(feeds), width, dtype=torch.bool)
        for i, feed in enumerate(feeds):
            if feed:
                ids[i, : len(feed)] = torch.tensor(feed)
                new_valid[i, : len(feed)] = True
        pos = torch.tensor(positions).unsqueeze(1) + torch.arange(width)  # a dummy's position is never attended
        device = self.valid.device
        mask = torch.cat([self.valid, new_valid.to(device)], dim=1)
        return ids.to(device), mask, pos.to(device)

    def commit(self, attention_mask: torch.Tensor) -> None:
        """After a forward: the step's columns are part of the cache."""
        self.valid = attention_mask


class BatchScheduler:
    """Runs the decode steps of all joined rows, one forward each, on its own thread.

    ``forward(input_ids, cache, binding, attention_mask, position_ids) -> logits (rows, tokens, vocab)``
    is the engine's model call. The thread starts with the first row and ends when no row is left.
    """

    def __init__(self, forward: Callable, turns: FairTurns):
        self._forward = forward
        self.turns = turns
        self._client = ("decode", id(self))  # the batch is one client of the turns
        self._cond = threading.Condition()
        self._rows: list[BatchRow] = []  # in batch order
        self._joining: list[BatchRow] = []
        self._cache = BatchCache()
        self._adapters: RowAdapters | None = None  # per-row adapters of the current composition
        self._binding = None
        self._running = False
        self._lag_s = MIN_LAG_S
        self.steps = 0
        self.drafted_tokens = self.accepted_tokens = 0  # prompt-lookup drafts fed, and kept

    # -- the row's side (its generation thread) ---------------------------------------------------------

    def alone(self, row: BatchRow) -> bool:
        """No other row is in the batch or joining it."""
        with self._cond:
            return not any(self._live(r) for r in self._rows + self._joining if r is not row)

    def submit(self, row: BatchRow, tokens: list[int], drafted: int = 0) -> None:
        """Feed ``tokens`` to ``row`` at the next step (the first submit joins the batch); the last
        ``drafted`` of them are a draft, kept only as far as greedy decoding agrees."""
        if not 0 <= drafted < len(tokens):
            raise ValueError(f"submit needs a token before its draft, got {len(tokens)} tokens, {drafted} drafted")
        with self._cond:
            if row.done:  # dropped (the engine closed, a step failed): its wait() answers at once
                return
            row.pending = list(tokens)
            row.drafted = drafted
            row.lagging = False
            row.ready.clear()
            if row.cache is not None and row not in self._joining:
                self._joining.append(row)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, daemon=True, name="dynarank-batch").start()
            self._cond.notify_all()

    def wait(self, row: BatchRow) -> torch.Tensor | None:
        """The logits of the tokens last submitted and kept, one row each; None when the row was cancelled
        first (or dropped: the engine closed)."""
        while not row.ready.wait(POLL_S):
            if row.cancelled():
                return None
        if row.error is not None:
            raise row.error
        return row.logits

    def leave(self, row: BatchRow) -> None:
        """The row is done (finished, cancelled or abandoned); idempotent."""
        with self._cond:
            row.done = True
            if row in self._joining:
                self._joining.remove(row)
            self._cond.notify_all()

    def close(self) -> None:
        """End every row in flight (they finish as cancelled); the thread ends, and a later submit starts anew."""
        with self._cond:
            self._drop_all(None)
            self._cond.notify_all()

    # -- the scheduler thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due():
                    if self._idle():
                        self._drop_all(None)
                        self._running = False
                        return
                    self._cond.wait(self._wait_s())
            try:
                with self.turns.turn(client=self._client):
                    step = self._boundary()
                    if step is None:
                        continue
                    rows, feeds = step
                    started = time.perf_counter()
                    logits, kept = self._step(rows, feeds)
                self._lag_s = max(MIN_LAG_S, (time.perf_counter() - started) / 2)
                self._deliver(rows, kept, logits)
            except BaseException as exc:  # the rows fail with it rather than wait for ever
                log.exception("event=batch_step_failed")
                with self._cond:
                    self._drop_all(exc)

    def _live(self, row: BatchRow) -> bool:
        return not row.done and not row.cancelled()

    def _due(self) -> bool:
        """A step can run: every live row has submitted (or is lagging), and some row, joined or joining, has."""
        now = time.monotonic()
        fed = any(self._live(r) for r in self._joining)
        for row in self._rows:  # wait for the rows still sampling, unless they are late
            if not self._live(row) or row.lagging:
                continue
            if row.pending is not None:
                fed = True
            elif now - row.delivered_at > self._lag_s:
                row.lagging = True
            else:
                return False  # its token is coming
        return fed

    def _idle(self) -> bool:
        return not any(self._live(r) for r in self._rows) and not any(self._live(r) for r in self._joining)

    def _wait_s(self) -> float:
        """Until the first row still sampling would count as lagging (then ``_due`` steps without it)."""
        waiting = [r.delivered_at for r in self._rows if self._live(r) and r.pending is None and not r.lagging]
        return max(0.001, min(waiting) + self._lag_s - time.monotonic()) if waiting else POLL_S

    def _boundary(self):
        """Drop the rows that left, merge the rows that joined, rebind adapters: ``(rows, feeds)`` or None."""
        with self._cond:
            keep = [i for i, r in enumerate(self._rows) if self._live(r)]
            joins = [r for r in self._joining if self._live(r)]
            for row in self._rows + self._joining:
                if not self._live(row):
                    row.logits = None  # a cancelled row still waiting gets None
                    row.ready.set()
            self._joining = []
            if len(keep) < len(self._rows) or joins:
                self._cache.rebuild(keep, [r.cache for r in joins])
                self._rows = [self._rows[i] for i in keep] + joins
                for row in joins:
                    row.cache = None
                self._adapters = RowAdapters([r.adapter for r in self._rows], reuse=self._adapters) \
                    if self._rows else None
                self._binding = self._adapters.binding() if self._adapters else None
            feeds = [r.pending for r in self._rows]
            if not any(feeds):  # everyone left meanwhile
                return None
            for row in self._rows:
                row.pending = None
            return list(self._rows), feeds

    def _step(self, rows: list[BatchRow], feeds) -> tuple[torch.Tensor, list[int]]:
        """One forward: the logits, and how many of each row's fed tokens are kept (0: sat out)."""
        batch, binding = self._cache, self._binding  # close() may replace them meanwhile
        ids, mask, positions = batch.step_inputs(feeds, [r.position for r in rows])
        logits = self._forward(ids, batch.cache, binding, mask, positions)
        fed = [(i, r, f) for i, (r, f) in enumerate(zip(rows, feeds)) if f]  # rows that sat out keep nothing
        accepted = {i: accepted_draft(f, r.drafted, logits[i]) for i, r, f in fed}
        kept = [len(f) - r.drafted + accepted[i] if f else 0 for i, (r, f) in enumerate(zip(rows, feeds))]
        self.drafted_tokens += sum(r.drafted for _, r, _ in fed)
        self.accepted_tokens += sum(accepted.values())
        for i, (feed, keep) in enumerate(zip(feeds, kept)):
            if feed and keep < len(feed):  # the rejected draft's columns: never attended again
                mask[i, mask.shape[1] - ids.shape[1] + keep:] = False
        batch.commit(mask)
        self.steps += 1
        return logits, kept

    def _deliver(self, rows: list[BatchRow], kept: list[int], logits: torch.Tensor) -> None:
        now = time.monotonic()
        with self._cond:
            for i, (row, keep) in enumerate(zip(rows, kept)):
                if not keep or row.done:  # sat out, or left meanwhile (close() answered it)
                    continue
                row.position += keep
                row.logits = logits[i, :keep]
                row.delivered_at = now
                row.ready.set()

    def _drop_all(self, error: BaseException | None) -> None:
        """Under the lock: forget every row (waiting ones get ``error``, or None) and the cache."""
        for row in self._rows + self._joining:
            row.error = error
            row.logits = None
            row.done = True
            row.ready.set()
        self._rows, self._joining = [], []
        self._cache = BatchCache()
        self._adapters = self._binding = None


def accepted_draft(feed: list[int], drafted: int, logits: torch.Tensor) -> int:
    """How many of the last ``drafted`` tokens of ``feed`` greedy decoding would have produced, in a row:
    each must be the argmax of the logits at the position before it (``logits``: one row per fed token)."""
    if drafted == 0:
        return 0
    start = len(feed) - drafted
    predicted = logits[start - 1: len(feed) - 1].argmax(-1).tolist()
    accepted = 0
    for guess, token in zip(predicted, feed[start:]):
        if guess != token:
            break
        accepted += 1
    return accepted
