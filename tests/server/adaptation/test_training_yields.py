"""Training yields to serving inside a step: the worker's step pauses at a decoder-layer boundary while a
completion is active, in forward and in backward, and resumes after it with the result an uninterrupted
step gives; a completion on the same model runs meanwhile; under continuous serving steps still complete
(the gate's fair share); the ``adapted`` push goes out before the version is written.

Real components (tiny Llama, real SessionManager, AdapterStore, HFEngine); waits are on events.
"""

from __future__ import annotations

import logging
import re
import threading

import pytest
import torch

from adapter_core.pause_points import current_pause
from server.engines.base import GenerationRequest
from server.engines.gate import ServingGate
from server.engines.hf import HFEngine
from tests.server.adaptation import test_workers
from tests.server.adaptation.test_workers import FILE_V1, FILE_V2, Recorder, edit_examples, factors, same_factors

make_stack = test_workers.make_stack  # the workers tests' fixture: a real stack over a tiny Llama

WAIT_S = 60.0
NEVER_SHARE = 1e-9  # a share so small that a paused step waits for serving to end, however long it takes


class HoldAt:
    """Stands in for the gate's ``pause_point``: when the step reaches ``at`` it signals ``reached`` and
    waits until the test has started serving, then pauses by the gate's rule; logs what happens in order."""

    def __init__(self, gate: ServingGate, at):
        self.real, self.at = gate.pause_point, at
        self.reached, self.serving = threading.Event(), threading.Event()
        self.log: list = []
        self.threads: set[int] = set()
        gate.pause_point = self  # a slice's pause points call the gate's pause_point

    def __call__(self, where=None, running=None) -> None:
        self.threads.add(threading.get_ident())
        if where != self.at:
            self.real(where, running)
            return
        self.reached.set()
        assert self.serving.wait(WAIT_S)
        self.real(where, running)
        self.log.append("resumed")


def _stack(make_stack, share: float, **settings):
    s = make_stack(persist_every=1000, **settings)
    s.workers.gate = ServingGate(grace_s=0.0, training_share=share)
    return s


def _step_in_thread(workers, session, example) -> threading.Thread:
    """The worker's step on its own thread, with one intra-op thread (the count is per thread: steps
    compare exactly when each runs like this)."""
    def step():
        torch.set_num_threads(1)
        workers.run_step(lambda: workers.train_session(session, example))

    t = threading.Thread(target=step)
    t.start()
    return t


@pytest.mark.parametrize("at", [("forward", 1), ("backward", 1), ("backward", 0)])
def test_a_step_pauses_at_a_layer_boundary_while_serving_and_resumes_with_the_same_result(make_stack, tokenizer, at):
    s = _stack(make_stack, NEVER_SHARE)
    gate = s.workers.gate
    example = edit_examples(s.workers)[0]
    session, _ = s.sessions.attach(None, "paused")
    twin, _ = s.sessions.attach(None, "twin")
    assert same_factors(twin.current(), factors(session.current()))  # both start from the same factors
    reference = _step_in_thread(s.workers, twin, example)  # serving quiet: never pauses
    reference.join(WAIT_S)
    assert gate.training_pauses == 0 and twin.current().version == 1

    hold = HoldAt(gate, at)
    trainer = _step_in_thread(s.workers, session, example)
    assert hold.reached.wait(WAIT_S), "the step never reached the layer boundary"
    with gate.serving():
        hold.serving.set()
        assert gate.wait_paused(WAIT_S), "the step did not pause for serving"
        # A completion on the session's published version runs while its step is paused (no lock held
        # that serving needs); the serving thread never reaches a pause point.
        engine = HFEngine(s.workers.model, tokenizer, "tiny", gate=gate)
        chunks = list(engine.generate(GenerationRequest(prompt="def f(x):", max_tokens=3), adapter=session.current()))
        assert chunks[-1].finish_reason
        assert session.current().version == 0 and trainer.is_alive()
        hold.log.append("serving ended")
    trainer.join(WAIT_S)
    assert not trainer.is_alive()
    assert hold.log == ["serving ended", "resumed"]
    assert hold.threads == {trainer.ident}
    assert session.current().version == twin.current().version == 1
    assert session.last_loss == twin.last_loss
    assert same_factors(session.current(), factors(twin.current()))


def test_under_continuous_serving_a_step_still_completes_by_its_share(make_stack):
    s = _stack(make_stack, 0.5)
    gate = s.workers.gate
    session, _ = s.sessions.attach(None, "busy")
    example = edit_examples(s.workers)[0]
    layers = s.workers.model.config.num_hidden_layers
    with gate.serving():  # never quiet while the step runs
        trainer = _step_in_thread(s.workers, session, example)
        trainer.join(WAIT_S)
        assert not trainer.is_alive(), "the step did not complete under continuous serving"
        assert session.current().version == 1
    assert gate.training_waits == 1  # it waited at its start, for its share only
    # It yielded at every pause point: each decoder layer in forward and backward, and the three
    # between the step's phases (head, optimizer, policy).
    assert gate.training_pauses == 2 * layers + 3


def test_a_pause_point_outside_a_slice_never_blocks():
    gate = ServingGate(grace_s=0.0, training_share=NEVER_SHARE)
    with gate.serving():
        gate.pause_point(("forward", 0))  # not a training thread of this gate: returns at once
    assert gate.training_pauses == 0 and gate.paused == 0


def test_a_slices_pause_callable_pauses_in_any_thread():
    """On CUDA autograd runs backward (and its pause points) in a thread of its own: the callable a slice
    hands to the pause points must pause there too, by the slice's rule."""
    gate = ServingGate(grace_s=0.0, training_share=NEVER_SHARE)
    order = []
    with gate.training_slice() as stats:
        pause = current_pause()
        with gate.serving():
            other = threading.Thread(target=lambda: (pause(("backward", 0)), order.append("resumed")))
            other.start()
            assert gate.wait_paused(WAIT_S)
            order.append("serving ended")
        other.join(WAIT_S)
    assert not other.is_alive() and order == ["serving ended", "resumed"]
    assert stats.pauses == 1 and gate.training_pauses == 1


def test_bad_gate_settings_are_refused():
    with pytest.raises(ValueError, match="training_share"):
        ServingGate(training_share=0)
    with pytest.raises(ValueError, match="training_share"):
        ServingGate(training_share=1.5)
    with pytest.raises(ValueError, match="grace_s"):
        ServingGate(grace_s=-1)
    gate = ServingGate()
    with gate.training_slice(), pytest.raises(RuntimeError, match="nest"), gate.training_slice():
        pass


def test_an_edit_goes_live_under_continuous_serving(make_stack):
    s = _stack(make_stack, 0.5, edit_quiet_s=0.0)
    gate = s.workers.gate
    session, _ = s.sessions.attach(None, "live")
    rec = Recorder(session, until=lambda msgs: any(m["type"] == "adapted" for m in msgs))
    session.open_doc("a.py", FILE_V1, 1, "python", 0.0)
    with gate.serving():  # a completion stream that never pauses
        s.workers.start()
        session.edit_doc("a.py", 2, FILE_V2)
        s.workers.wake()
        assert rec.done.wait(WAIT_S), f"no adapted push under continuous serving: {rec.messages}"
    assert gate.training_pauses > 0  # the workers installed the pause points on the model


def test_each_step_logs_what_it_published_and_what_it_gave_to_serving(make_stack, caplog):
    s = make_stack(persist_every=1000)
    session, _ = s.sessions.attach(None, "logged")
    example = edit_examples(s.workers)[0]
    with caplog.at_level(logging.INFO, logger="dynarank.access"):
        s.workers.run_step(lambda: s.workers.train_session(session, example))
        s.workers.run_step(lambda: None)  # a step that publishes nothing (a job's)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event=training_step")]
    assert len(lines) == 2
    assert re.fullmatch(r"event=training_step total_s=\S+ waited_s=\S+ paused_s=\S+ pauses=0 session=logged version=1",
                        lines[0])
    assert re.fullmatch(r"event=training_step total_s=\S+ waited_s=\S+ paused_s=\S+ pauses=0", lines[1])


def test_the_adapted_push_goes_out_before_the_version_is_written(make_stack):
    s = make_stack(persist_every=1)
    session, _ = s.sessions.attach(None, "s1")
    stored_at_push = []
    session.listeners.add(lambda m: m["type"] == "adapted" and stored_at_push.append(
        s.store.versions(None, session.adapter_name)))
    s.workers.train_session(session, edit_examples(s.workers)[0])
    assert stored_at_push == [[]]  # live and announced first ...
    assert s.store.versions(None, session.adapter_name) == [1]  # ... written before the step returns
