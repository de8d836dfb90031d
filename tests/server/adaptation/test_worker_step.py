"""server/adaptation/workers.py: a taken step runs exactly once, in a training slice, whatever it raises.

A TimeoutError the step raises itself is its own failure: it is reported and the step is not run again
(the worker once ran a step a second time on it). Fake steps count their calls; waits are on events.
"""

from __future__ import annotations

import logging
import threading
import types

import pytest

from server.adaptation.workers import AdaptationWorkers
from server.config import Settings
from server.engines.gate import ServingGate

WAIT_S = 60.0


class Step:
    """A step function that counts its calls, notes whether it ran in a training slice, and may raise."""

    def __init__(self, gate, error: Exception | None = None):
        self.gate, self.error = gate, error
        self.calls, self.in_slice = 0, []

    def __call__(self):
        self.calls += 1
        self.in_slice.append(self.gate.training)
        if self.error is not None:
            raise self.error


@pytest.fixture
def make_workers(tmp_path):
    made = []

    def make():
        gate = ServingGate(grace_s=0)
        no_sessions = types.SimpleNamespace(sessions=list, take=lambda: None)
        workers = AdaptationWorkers(Settings(model="tiny", data_dir=tmp_path, train_threads=0), None, None,
                                    no_sessions, gate)
        made.append(workers)
        return workers, gate

    yield make
    for workers in made:
        workers.stop(timeout=WAIT_S)


def test_a_step_that_raises_timeout_error_runs_once_and_is_reported(make_workers, caplog):
    workers, gate = make_workers()
    step = Step(gate, TimeoutError("the step's own timeout"))
    asked_again = threading.Event()
    offered = []

    def source():  # offers the step once; the next turn of the loop asks again
        if offered:
            asked_again.set()
            return None
        offered.append(step)
        return step

    workers.sources.append(source)
    with caplog.at_level(logging.ERROR, logger="dynarank.workers"):
        workers.start()
        assert asked_again.wait(WAIT_S), "the worker never came back for more work"
        workers.stop(timeout=WAIT_S)
    assert step.calls == 1 and step.in_slice == [True]
    failures = [r for r in caplog.records if r.getMessage() == "adaptation step failed"]
    assert len(failures) == 1 and isinstance(failures[0].exc_info[1], TimeoutError)
    assert str(failures[0].exc_info[1]) == "the step's own timeout"


def test_with_serving_quiet_the_step_runs_once_in_a_slice(make_workers):
    workers, gate = make_workers()
    step = Step(gate)
    workers.run_step(step)
    assert step.calls == 1 and step.in_slice == [True] and not gate.training
    failing = Step(gate, ValueError("bad step"))
    with pytest.raises(ValueError):
        workers.run_step(failing)
    assert failing.calls == 1 and not gate.training  # the slice is left however the step ends
