"""Fair, bounded admission and prompt cancellation, in process.

- ``FairTurns``: the engine's steps go round robin between clients, and a waiter whose cancel event is set
  leaves without its turn.
- ``HFEngine``: generations cancelled while another holds the step compute nothing more and end at once.
- ``GenerationBridge``: a per-client cap, and a slot held until the generation's threads have ended.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server.engines.base import GenerationChunk, GenerationRequest
from server.engines.bridge import GenerationBridge
from server.engines.gate import FairTurns, ServingGate, serving_client
from server.errors import ClientError

WAIT = 30.0  # generous: the machine may be busy; nothing below waits this long when it works


def _wait_until(predicate, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


# -- FairTurns ---------------------------------------------------------------------------------------------


def test_turns_go_round_robin_between_clients_not_threads():
    """A client with 4 threads gets no more steps than a client with 1 while both wait."""
    turns = FairTurns()
    order: list[str] = []
    gate = threading.Event()  # everyone queues first, then the holder lets go

    def worker(client: str, steps: int):
        serving_client.set(client)
        gate.wait()
        for _ in range(steps):
            with turns.turn() as granted:
                assert granted
                order.append(client)
                time.sleep(0.003)  # a "forward": long enough for every other thread to queue again

    threads = [threading.Thread(target=worker, args=("flood", 40)) for _ in range(4)]
    threads.append(threading.Thread(target=worker, args=("victim", 10)))
    with turns.turn(client="holder"):
        for t in threads:
            t.start()
        gate.set()
        assert _wait_until(lambda: turns.waiting == 5)
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert order.count("victim") == 10 and order.count("flood") == 160
    # Round robin: the flood's 4 threads got about one step per victim step (a plain lock gives them ~4).
    flood_before_victim_done = order[: len(order) - order[::-1].index("victim")].count("flood")
    assert flood_before_victim_done <= 10 + 6, order[:40]


def test_a_cancelled_waiter_leaves_without_its_turn():
    turns = FairTurns()
    cancel = threading.Event()
    result = []

    def waiter():
        with turns.turn(cancel, client="w") as granted:
            result.append(granted)

    with turns.turn(client="holder"):
        t = threading.Thread(target=waiter)
        t.start()
        assert _wait_until(lambda: turns.waiting == 1)
        cancel.set()
        t.join(WAIT)  # returns while the holder still holds the step
        assert not t.is_alive() and result == [False] and turns.waiting == 0
    with turns.turn(client="next") as granted:  # the step is free again: nothing leaked
        assert granted


# -- HFEngine ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tokenizer):
    from server.engines.hf import HFEngine
    from tests.conftest import build_tiny_model

    return HFEngine(build_tiny_model("llama", len(tokenizer)), tokenizer, "tiny")


def test_generations_cancelled_while_waiting_for_the_step_compute_nothing(engine, monkeypatch):
    """The probe's stall: cancelled completions queued behind a forward each ran one more (prefill) forward
    after the cancel. Now they end at once, while the forward they waited behind is still running."""
    forwards: dict[str, int] = {}
    block = threading.Event()
    holding = threading.Event()
    real_forward = engine.model.forward

    def forward(*args, **kwargs):
        name = threading.current_thread().name
        forwards[name] = forwards.get(name, 0) + 1
        if name == "holder":
            holding.set()
            assert block.wait(WAIT)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", forward)
    results: dict[str, list] = {}

    def generate(name: str, cancel: threading.Event):
        serving_client.set(name)
        results[name] = list(engine.generate(GenerationRequest(prompt="def f(x):", max_tokens=50), cancel=cancel))

    holder = threading.Thread(target=generate, args=("holder", threading.Event()), name="holder")
    holder.start()
    assert holding.wait(WAIT)
    cancels = [threading.Event() for _ in range(4)]
    waiters = [threading.Thread(target=generate, args=(f"w{i}", c), name=f"w{i}") for i, c in enumerate(cancels)]
    try:
        for w in waiters:
            w.start()
        assert _wait_until(lambda: engine.turns.waiting == 4)
        for c in cancels:
            c.set()
        for w in waiters:
            w.join(WAIT)
        # They ended while the holder's forward is still blocked, and never ran a forward of their own.
        assert not any(w.is_alive() for w in waiters)
        assert holder.is_alive()
    finally:
        block.set()
        holder.join(WAIT)
    assert all(forwards.get(f"w{i}", 0) == 0 for i in range(4)), forwards
    for i in range(4):
        chunks = results[f"w{i}"]
        assert [c.finish_reason for c in chunks] == ["cancelled"] and not chunks[0].token_ids
    assert results["holder"][-1].finish_reason in ("length", "stop") and forwards["holder"] >= 1


def test_cancel_mid_generation_stops_at_the_next_token(engine):
    """Cancelled from another thread while two generations share the step: at most one more token."""
    cancel = threading.Event()
    other_cancel = threading.Event()
    other = threading.Thread(target=lambda: list(engine.generate(
        GenerationRequest(prompt="class A:", max_tokens=400), cancel=other_cancel)))
    other.start()
    produced, after = 0, None
    chunk = None
    try:
        for chunk in engine.generate(GenerationRequest(prompt="x", max_tokens=400), cancel=cancel):
            produced += len(chunk.token_ids)
            if produced == 3:
                cancel.set()
                after = produced
    finally:
        other_cancel.set()
        other.join(WAIT)
    assert chunk is not None and chunk.finish_reason == "cancelled"
    assert after is not None and produced - after <= 1


# -- GenerationBridge ----------------------------------------------------------------------------------------


class BlockingEngine:
    """Yields one token, then blocks (ignoring cancel) until released: a forward that is still running."""

    model_name = "fake"
    tokenizer = None

    def __init__(self):
        self.gate = ServingGate()
        self.release = threading.Event()
        self.clients: list = []

    def generate(self, request, adapter=None, cancel=None):
        self.clients.append(serving_client.get())
        yield GenerationChunk(text="a", token_ids=[1])
        self.release.wait(WAIT)
        yield GenerationChunk(text="", token_ids=[], finish_reason="cancelled" if cancel.is_set() else "length")


def test_bridge_caps_each_client_and_holds_the_slot_until_the_thread_ends():
    engine = BlockingEngine()
    bridge = GenerationBridge(engine, max_inflight=8)
    request = [GenerationRequest(prompt="x")]

    async def scenario():
        gens = [bridge.start("t", request, None, model_name="m", client="c1", client_limit=2) for _ in range(2)]
        with pytest.raises(ClientError) as refused:
            bridge.start("t", request, None, model_name="m", client="c1", client_limit=2)
        assert refused.value.code == "too_many_requests"
        other = bridge.start("t", request, None, model_name="m", client="c2", client_limit=2)  # its own cap
        other.close()
        assert bridge.inflight_of("c1") == 2 and bridge.inflight == 2

        # Take the first token of one, then abandon it (a disconnect): its thread is still in the engine.
        stream = gens[0].chunks()
        _, chunk = await stream.__anext__()
        assert chunk.text == "a"
        await stream.aclose()
        gens[1].close()  # never iterated: no thread, the slot is free at once
        assert gens[0].cancel.is_set()
        assert bridge.inflight_of("c1") == 1 and bridge.inflight == 1  # held by the running thread
        with pytest.raises(ClientError):
            bridge.start("t", request, None, model_name="m", client="c1", client_limit=1)
        engine.release.set()
        assert await asyncio.to_thread(bridge.wait_idle, WAIT)
        assert bridge.inflight_of("c1") == 0
        bridge.start("t", request, None, model_name="m", client="c1", client_limit=1).close()

    asyncio.run(scenario())
    assert engine.clients == ["c1"]  # the engine thread ran as the generation's client


def test_bridge_global_limit_counts_every_client():
    bridge = GenerationBridge(BlockingEngine(), max_inflight=2)
    request = [GenerationRequest(prompt="x")]
    held = [bridge.start("t", request, None, model_name="m", client=c, client_limit=4) for c in ("a", "b")]
    with pytest.raises(ClientError) as refused:
        bridge.start("t", request, None, model_name="m", client="c", client_limit=4)
    assert refused.value.code == "too_many_requests"
    for gen in held:
        gen.close()
    assert bridge.inflight == 0 and bridge.wait_idle(0)
