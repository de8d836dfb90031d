"""Continuous batching in ``HFEngine``, in process, on a tiny random model with session adapters.

A row's output is the same alone as in a batch with other rows on other adapters, whoever joins or
leaves meanwhile; concurrent requests really share their forwards; ``BatchCache`` merges, drops and
trims rows as it should.
"""

from __future__ import annotations

import threading

import pytest
import torch

from adapter_core import inject_adapters, use_adapter
from server.engines.base import GenerationRequest
from server.engines.batching import BatchCache
from server.engines.hf import HFEngine
from server.engines.prompt_lookup import propose_draft
from tests.adapter_core.test_layer import random_snapshot

WAIT = 60.0  # generous: the machine is shared; nothing waits this long when it works


@pytest.fixture(scope="module")
def engine(tokenizer):
    from tests.conftest import build_tiny_model

    model = build_tiny_model("llama", len(tokenizer))
    with torch.no_grad():  # sharp attention: a wrong position id or mask column changes the output
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    inject_adapters(model)
    # prefill_chunk 4: prompts take several chunks, so prefills interleave with the steps of other rows.
    return HFEngine(model, tokenizer, "tiny", prefill_chunk=4)


@pytest.fixture(scope="module")
def adapters(engine):
    return [random_snapshot(engine.model, seed, rank=rank) for seed, rank in ((0, 4), (1, 2), (2, 6))]


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def text(chunks) -> str:
    return "".join(c.text for c in chunks)


def logprobs(chunks) -> list[float]:
    return [lp for c in chunks for lp in (c.logprobs or [])]


class Row:
    """One generation in a thread: starts when ``start`` is set, cancels after ``cancel_after`` tokens, and
    sets ``progress[n]`` once it has ``n`` tokens."""

    def __init__(self, engine, request, adapter=None, start=None, cancel_after=None, marks=()):
        self.engine, self.request, self.adapter = engine, request, adapter
        self.start = start
        self.cancel = threading.Event()
        self.cancel_after = cancel_after
        self.progress = {n: threading.Event() for n in marks}
        self.chunks: list = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)

    def _run(self):
        try:
            if self.start is not None:
                assert self.start.wait(WAIT)
            produced = 0
            for chunk in self.engine.generate(self.request, self.adapter, self.cancel):
                self.chunks.append(chunk)
                produced += len(chunk.token_ids)
                for n, event in self.progress.items():
                    if produced >= n:
                        event.set()
                if self.cancel_after is not None and produced >= self.cancel_after:
                    self.cancel.set()
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            for event in self.progress.values():
                event.set()  # never leave a waiter hanging


def run_all(rows: list[Row], start: threading.Event) -> None:
    """Start every row's thread, let them go together, and wait for all of them."""
    for row in rows:
        row.thread.start()
    start.set()
    for row in rows:
        row.thread.join(WAIT)
    assert not any(r.thread.is_alive() for r in rows)
    errors = [r.error for r in rows if r.error is not None]
    assert not errors, errors


def alone(engine, request, adapter=None):
    return list(engine.generate(request, adapter))


def greedy_reference(engine, prompt_ids: list[int], adapter, n: int) -> tuple[list[int], list[float]]:
    """Greedy decoding without a cache (the whole sequence through the model for every token): tokens and
    their logprobs."""
    ids, lps = list(prompt_ids), []
    with torch.no_grad(), use_adapter(engine.model, adapter):
        for _ in range(n):
            logp = torch.log_softmax(engine.model(torch.tensor([ids])).logits[0, -1], -1)
            ids.append(int(logp.argmax()))
            lps.append(float(logp[ids[-1]]))
    return ids[len(prompt_ids):], lps


def test_a_row_alone_is_plain_greedy_decoding(engine, adapters):
    """The reference the batch tests compare with is itself right (positions, cache, chunked prefill)."""
    for request, adapter in ((GenerationRequest(prompt="def parse_args(argv):\n    parser = ", max_tokens=12,
                                                logprobs=0), adapters[0]),
                             (GenerationRequest(prompt="import os\n", max_tokens=12, logprobs=0), None)):
        chunks = alone(engine, request, adapter)
        want_tokens, want_logprobs = greedy_reference(engine, engine.encode(request).ids, adapter,
                                                      len(tokens(chunks)))
        assert tokens(chunks) == want_tokens
        torch.testing.assert_close(logprobs(chunks), want_logprobs, atol=1e-4, rtol=1e-4)


def test_a_row_gives_the_same_output_alone_and_in_a_mixed_batch(engine, adapters):
    a, b, c = adapters
    full = text(alone(engine, GenerationRequest(prompt="hello world", max_tokens=24), b))
    stop = full[8:11]
    assert stop and full.index(stop) >= 1  # a stop sequence the row meets part way through
    plans = {
        # name: (request, adapter)
        "long_a": (GenerationRequest(prompt="def parse_args(argv):\n    parser = ", max_tokens=40, logprobs=2), a),
        "long_base": (GenerationRequest(prompt="import os\nimport sys\n", max_tokens=36, logprobs=0), None),
        "stop_b": (GenerationRequest(prompt="hello world", max_tokens=24, stop=(stop,), logprobs=0), b),
        "short_c": (GenerationRequest(prompt="x = [", max_tokens=5, logprobs=1), c),
        "late_c": (GenerationRequest(prompt="class Tree:\n    def __init__(self", max_tokens=12, logprobs=0), c),
        "late_a": (GenerationRequest(prompt="for i in range(", max_tokens=10, logprobs=3), a),
    }
    expected = {name: alone(engine, req, ad) for name, (req, ad) in plans.items()}
    assert expected["stop_b"][-1].finish_reason == "stop"
    assert len({tuple(tokens(expected[n])) for n in plans}) == len(plans)

    steps_before = engine.batch.steps
    start = threading.Event()
    rows = {name: Row(engine, req, ad, start=start, marks=(6,)) for name, (req, ad) in plans.items()
            if not name.startswith("late")}
    # Two rows join mid-way, once the long rows are well under way; one row is cancelled after 4 tokens.
    rows["late_c"] = Row(engine, plans["late_c"][0], c, start=rows["long_a"].progress[6])
    rows["late_a"] = Row(engine, plans["late_a"][0], a, start=rows["long_base"].progress[6])
    rows["cancelled_b"] = Row(engine, GenerationRequest(prompt="while True:", max_tokens=40), b, start=start,
                              cancel_after=4)
    run_all(list(rows.values()), start)

    for name in plans:
        got, want = rows[name].chunks, expected[name]
        assert tokens(got) == tokens(want), name
        assert text(got) == text(want), name
        assert got[-1].finish_reason == want[-1].finish_reason, name
        assert len(logprobs(want)) == len(tokens(want))
        torch.testing.assert_close(logprobs(got), logprobs(want), atol=1e-4, rtol=1e-4)
        for g, w in zip(got, want):
            if w.top_logprobs:
                assert g.top_logprobs[0].keys() == w.top_logprobs[0].keys(), name
    cancelled = rows["cancelled_b"].chunks
    assert cancelled[-1].finish_reason == "cancelled" and 4 <= len(tokens(cancelled)) <= 5
    # They did share steps: far fewer than the sum of their tokens.
    produced = sum(len(tokens(r.chunks)) for r in rows.values())
    assert engine.batch.steps - steps_before < produced * 0.75


def test_concurrent_requests_share_each_forward(engine, adapters, monkeypatch):
    calls = []
    real_forward = engine.model.forward

    def counting_forward(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", counting_forward)
    engine.prefill_chunk = 64  # one prefill forward per request
    try:
        start = threading.Event()
        rows = [Row(engine, GenerationRequest(prompt=f"def f{i}(x):", max_tokens=30), adapters[i % 3], start=start)
                for i in range(8)]
        run_all(rows, start)
    finally:
        engine.prefill_chunk = 4
    produced = sum(len(tokens(r.chunks)) for r in rows)
    assert produced == 8 * 30
    # 8 prefills plus about one step per token of the longest row, not one forward per token.
    assert len(calls) <= 8 + 30 + 16, calls
    assert max(calls) >= 6  # most rows were in the same step


def test_a_slow_consumer_does_not_hold_up_the_batch(engine, adapters):
    """A row whose consumer stops reading is stepped without; the others finish meanwhile, and it still gets
    exactly its alone output once its consumer reads on."""
    slow_request = GenerationRequest(prompt="def slow(x):", max_tokens=12)
    fast_request = GenerationRequest(prompt="import re\n", max_tokens=25)
    want_slow = alone(engine, slow_request, adapters[0])
    want_fast = alone(engine, fast_request, adapters[1])
    release = threading.Event()
    slow_chunks: list = []

    def slow_consumer():
        for i, chunk in enumerate(engine.generate(slow_request, adapters[0])):
            slow_chunks.append(chunk)
            if i == 2:
                assert release.wait(WAIT)  # stops reading for as long as the fast row runs

    slow = threading.Thread(target=slow_consumer)
    slow.start()
    fast = Row(engine, fast_request, adapters[1])
    fast.thread.start()
    fast.thread.join(WAIT)
    assert not fast.thread.is_alive() and fast.error is None
    release.set()
    slow.join(WAIT)
    assert not slow.is_alive()
    assert tokens(fast.chunks) == tokens(want_fast) and text(fast.chunks) == text(want_fast)
    assert tokens(slow_chunks) == tokens(want_slow) and text(slow_chunks) == text(want_slow)


def test_a_failed_step_fails_its_rows_and_the_engine_recovers(engine, monkeypatch):
    real_forward = engine.model.forward
    failing = threading.Event()

    def forward(*args, **kwargs):
        if failing.is_set() and kwargs.get("attention_mask") is not None:  # a batch step, not a prefill
            raise RuntimeError("device lost")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", forward)
    failing.set()
    with pytest.raises(RuntimeError, match="device lost"):
        alone(engine, GenerationRequest(prompt="x", max_tokens=5))
    failing.clear()
    assert len(tokens(alone(engine, GenerationRequest(prompt="x", max_tokens=5)))) == 5


# -- BatchCache ---------------------------------------------------------------------------------------------


def _row_cache(engine, length: int, fill: float):
    """A prefilled-looking single-row cache: every key/value entry is ``fill``."""
    cache = engine._new_cache()
    cfg = engine.model.config
    heads, dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        cache.update(torch.full((1, heads, length, dim), fill), torch.full((1, heads, length, dim), -fill), i)
    return cache


def test_rows_join_left_padded_and_leaving_trims_the_padding(engine):
    batch = BatchCache()
    batch.rebuild([], [_row_cache(engine, 3, 1.0)])
    batch.rebuild([0], [_row_cache(engine, 7, 2.0), _row_cache(engine, 2, 3.0)])
    assert batch.valid.tolist() == [[False] * 4 + [True] * 3, [True] * 7, [False] * 5 + [True] * 2]
    keys = batch.cache.layers[0].keys
    assert keys.shape[0] == 3 and keys.shape[2] == 7
    assert (keys[0, :, 4:] == 1).all() and (keys[1] == 2).all() and (keys[2, :, 5:] == 3).all()
    assert (batch.cache.layers[1].values[2, :, 5:] == -3).all()
    # The long row leaves: the padding no remaining row needs goes.
    batch.rebuild([0, 2], [])
    assert batch.valid.tolist() == [[True] * 3, [False] + [True] * 2]
    assert batch.cache.layers[0].keys.shape[2] == 3 and (batch.cache.layers[0].keys[0] == 1).all()
    # A step: one row feeds two tokens (a draft), the other one, right-padded with a masked dummy.
    ids, mask, pos = batch.step_inputs([[5, 6], [7]], [3, 2])
    assert ids.tolist() == [[5, 6], [7, 0]]
    assert mask.tolist() == [[True] * 5, [False, True, True, True, False]]
    assert pos.tolist() == [[3, 4], [2, 3]]
    batch.rebuild([], [])
    assert batch.cache is None and batch.columns == 0


def test_closing_the_engine_ends_the_rows_in_flight_and_a_later_request_still_runs(engine):
    row = Row(engine, GenerationRequest(prompt="def f(x):", max_tokens=400), marks=(3,))
    row.thread.start()
    assert row.progress[3].wait(WAIT)
    engine.close()
    row.thread.join(WAIT)
    assert not row.thread.is_alive() and row.error is None
    assert row.chunks[-1].finish_reason == "cancelled" and len(tokens(row.chunks)) < 400
    assert len(tokens(alone(engine, GenerationRequest(prompt="x", max_tokens=4)))) == 4


def test_prompt_lookup_keeps_greedy_output_in_fewer_steps(engine, adapters, monkeypatch):
    """A greedy row alone feeds drafts looked up in its context; what it keeps is what greedy decoding
    gives (checked against decoding without a cache), and accepted drafts save steps. A drafter that
    spoils every draft's third token makes rejections certain: their columns must be masked."""
    from server.engines import hf

    def spoiled(ids, **kw):
        draft = propose_draft(ids, **kw)
        return draft[:2] + [(draft[2] + 1) % len(engine.tokenizer)] + draft[3:] if len(draft) > 2 else draft

    prompts = ["def parse_args(argv):\n    parser = ", "a b c d a b c d a b c d a b"]
    steps = {"off": 0, "on": 0, "spoiled": 0}
    kept = {}
    try:
        for prompt, adapter in zip(prompts, (adapters[0], None)):
            request = GenerationRequest(prompt=prompt, max_tokens=24, logprobs=0)
            want_tokens, want_logprobs = greedy_reference(engine, engine.encode(request).ids, adapter, 24)
            for mode in steps:
                engine.prompt_lookup = mode != "off"
                monkeypatch.setattr(hf, "propose_draft", spoiled if mode == "spoiled" else propose_draft)
                before = engine.batch.steps, engine.batch.drafted_tokens, engine.batch.accepted_tokens
                chunks = alone(engine, request, adapter)
                steps[mode] += engine.batch.steps - before[0]
                drafted, accepted = kept.get(mode, (0, 0))
                kept[mode] = (drafted + engine.batch.drafted_tokens - before[1],
                              accepted + engine.batch.accepted_tokens - before[2])
                assert tokens(chunks) == want_tokens, mode
                torch.testing.assert_close(logprobs(chunks), want_logprobs, atol=1e-4, rtol=1e-4)
    finally:
        engine.prompt_lookup = True
    assert kept["off"] == (0, 0)
    assert 0 < kept["on"][1] <= kept["on"][0] and steps["on"] < steps["off"]
    assert 0 < kept["spoiled"][1] < kept["spoiled"][0]  # kept up to the spoiled token, the rest rejected


def test_rows_in_a_batch_feed_no_drafts(engine, adapters):
    """Drafts are for a row alone: in a batch every row would pay for the longest one."""
    start = threading.Event()
    prompt = "a b c d a b c d a b c d a b"
    rows = [Row(engine, GenerationRequest(prompt=prompt, max_tokens=16), adapters[i], start=start)
            for i in range(3)]
    drafted = engine.batch.drafted_tokens
    run_all(rows, start)
    alone_tokens = tokens(alone(engine, GenerationRequest(prompt=prompt, max_tokens=16), adapters[0]))
    assert tokens(rows[0].chunks) == alone_tokens
    assert engine.batch.drafted_tokens - drafted <= 2 * 16  # at most while a row was briefly alone
