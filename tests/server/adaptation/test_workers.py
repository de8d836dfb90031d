"""server/adaptation/workers.py on its own: edits -> examples -> train step -> published snapshot.

Real components throughout: the real tokenizer, a tiny random Llama, a real
SessionManager and AdapterStore under ``tmp_path``. Threaded tests wait on
events set by session listeners or work items, never on fixed sleeps.
"""

from __future__ import annotations

import math
import threading
import time
import types

import pytest
import torch

from server.adaptation.workers import AdaptationWorkers
from server.config import Settings
from server.sessions import SessionManager
from server.store import AdapterStore

FILE_V1 = "def area(width, height):\n    return width * height\n"
FILE_V2 = (
    "def area(width, height):\n    return width * height\n\n\n"
    "def perimeter(width, height):\n    total = 2 * (width + height)\n    return total\n"
)
WAIT_S = 60.0  # generous: the machine is shared


@pytest.fixture
def make_stack(tmp_path, tokenizer, tiny_llama):
    """make_stack(**settings) -> namespace(settings, store, sessions, workers); workers are stopped at teardown."""
    made = []

    def make(**overrides):
        settings = Settings(model="tiny", data_dir=tmp_path, **overrides)
        store = AdapterStore(settings.data_dir, settings.served_name, settings.keep_versions)
        sessions = SessionManager(settings, tiny_llama, tokenizer, store)
        workers = AdaptationWorkers(settings, tiny_llama, tokenizer, sessions, None)
        made.append(workers)
        return types.SimpleNamespace(settings=settings, store=store, sessions=sessions, workers=workers)

    yield make
    for workers in made:
        workers.stop(timeout=WAIT_S)


class Recorder:
    """A session listener that keeps messages and signals when a predicate holds."""

    def __init__(self, session=None, until=lambda messages: False):
        self.messages: list[dict] = []
        self.until = until
        self.done = threading.Event()
        self.lock = threading.Lock()
        if session is not None:
            with session.lock:
                session.listeners.add(self)

    def __call__(self, message: dict) -> None:
        with self.lock:
            self.messages.append(message)
            if self.until(self.messages):
                self.done.set()

    def of_type(self, kind: str) -> list[dict]:
        with self.lock:
            return [m for m in self.messages if m["type"] == kind]


def edit_examples(workers):
    examples = workers.builder.from_edit(FILE_V1, FILE_V2, path="a.py", language="python")
    assert examples, "the edit should give at least one example"
    return examples


def factors(snap) -> dict:
    return {n: (snap.A[n].clone(), snap.B[n].clone()) for n in snap.modules}


def same_factors(snap, saved: dict) -> bool:
    return set(snap.modules) == set(saved) and all(
        torch.equal(snap.A[n], a) and torch.equal(snap.B[n], b) for n, (a, b) in saved.items())


# -- edits become examples ------------------------------------------------------------

def test_settled_edit_becomes_queued_examples(make_stack):
    s = make_stack(edit_quiet_s=30.0)
    session, _ = s.sessions.attach(None, "s1")
    rec = Recorder(session)
    session.open_doc("a.py", FILE_V1, 1, "python", s.settings.edit_quiet_s)
    session.edit_doc("a.py", 2, FILE_V2)

    s.workers.settle_edits(now=time.monotonic())  # still typing: nothing settles
    assert len(session.queue) == 0 and rec.messages == []

    s.workers.settle_edits(now=time.monotonic() + 31)
    expected = s.workers.builder.from_edit(FILE_V1, FILE_V2, path="a.py", language="python")
    assert [list(e.input_ids) for e in session.queue] == [list(e.input_ids) for e in expected]
    assert all(e.path == "a.py" for e in session.queue)
    status = rec.messages[-1]
    assert status["type"] == "status" and status["queue_depth"] == len(expected) and status["version"] == 0

    s.workers.settle_edits(now=time.monotonic() + 62)  # an edit settles once
    assert len(session.queue) == len(expected)


def test_closing_a_document_settles_its_burst_at_once(make_stack):
    s = make_stack(edit_quiet_s=30.0)
    session, _ = s.sessions.attach(None, "s1")
    session.open_doc("a.py", FILE_V1, 1, "python", s.settings.edit_quiet_s)
    session.edit_doc("a.py", 2, FILE_V2)
    session.close_doc("a.py")
    s.workers.settle_edits(now=time.monotonic())
    assert len(session.queue) > 0


def test_edit_without_examples_and_failing_builder_are_skipped(make_stack, monkeypatch):
    s = make_stack(edit_quiet_s=0.0)
    quiet, bad, good = (s.sessions.attach(None, sid)[0] for sid in ("quiet", "bad", "good"))
    for session, path in ((quiet, "q.py"), (bad, "bad.py"), (good, "g.py")):
        session.open_doc(path, FILE_V1, 1, "python", 0.0)
    quiet.edit_doc("q.py", 2, FILE_V1 + "\n\n   \n")  # whitespace only: no example
    bad.edit_doc("bad.py", 2, FILE_V2)
    good.edit_doc("g.py", 2, FILE_V2)
    quiet_rec = Recorder(quiet)

    builder = s.workers.builder
    real_from_edit = builder.from_edit

    def from_edit(before, after, path=None, language=None):
        if path == "bad.py":
            raise ValueError("tokenizer exploded")
        return real_from_edit(before, after, path=path, language=language)

    monkeypatch.setattr(builder, "from_edit", from_edit)
    s.workers.settle_edits(now=time.monotonic() + 1)
    assert len(quiet.queue) == 0 and quiet_rec.messages == []  # nothing queued, nothing announced
    assert len(bad.queue) == 0
    assert len(good.queue) > 0  # the others' failures did not stop this one


def test_loop_survives_edits_without_examples(make_stack):
    s = make_stack(edit_quiet_s=0.0)
    session, _ = s.sessions.attach(None, "s1")
    rec = Recorder(session, until=lambda ms: any(m["type"] == "adapted" for m in ms))
    session.open_doc("a.py", FILE_V1, 1, "python", 0.0)
    s.workers.start()
    session.edit_doc("a.py", 2, FILE_V1 + "\n\n")  # whitespace: no example
    session.edit_doc("a.py", 3, FILE_V1[:10])  # a deletion: no example
    s.workers.wake()
    session.edit_doc("a.py", 4, FILE_V2)  # a real edit
    s.workers.wake()
    assert rec.done.wait(WAIT_S), f"no adapted message; got {rec.messages}"
    assert session.current().version >= 1 and session.steps >= 1


# -- one step -------------------------------------------------------------------------

def test_train_session_publishes_the_next_version(make_stack):
    s = make_stack(persist_every=1000)
    session, _ = s.sessions.attach(None, "s1")
    rec = Recorder(session)
    example = edit_examples(s.workers)[0]
    before = session.current()
    saved = factors(before)

    s.workers.train_session(session, example)

    after = session.current()
    assert after is not before and after.version == before.version + 1
    assert not same_factors(after, saved)  # it learned something
    assert same_factors(before, saved)  # a completion holding the old snapshot still sees the old factors
    assert session.steps == 1 and math.isfinite(session.last_loss)
    assert session.history[-1]["version"] == after.version and session.history[-1]["loss"] == session.last_loss

    adapted = rec.of_type("adapted")
    assert len(adapted) == 1
    msg = adapted[0]
    assert msg["version"] == after.version and msg["loss"] == round(session.last_loss, 6)
    assert msg["ranks"] == after.ranks
    assert msg["mean_rank"] == pytest.approx(sum(after.ranks.values()) / len(after.ranks), abs=1e-3)
    assert [m["type"] for m in rec.messages] == ["adapted", "status"]
    assert rec.messages[-1]["version"] == after.version

    s.workers.train_session(session, example)
    assert session.current().version == before.version + 2 and session.steps == 2
    assert s.store.versions(None, session.adapter_name) == []  # persist_every not reached


def test_each_published_version_is_announced_and_a_failing_listener_does_not_fail_the_step(make_stack):
    """The session manager's ``on_publish`` hears every version a step publishes (vLLM prefetches it)."""
    s = make_stack(persist_every=1000)
    session, _ = s.sessions.attach(None, "s1")
    example = edit_examples(s.workers)[0]
    heard = []
    s.sessions.on_publish = heard.append
    s.workers.train_session(session, example)
    assert heard == [session.current()]

    def broken(snap):
        raise RuntimeError("the engine could not take it")

    s.sessions.on_publish = broken
    assert s.workers.train_session(session, example) == {"session": "s1", "version": 2}
    assert session.current().version == 2


def test_train_session_persists_every_n_versions(make_stack):
    s = make_stack(persist_every=2)
    session, _ = s.sessions.attach(None, "s1")
    example = edit_examples(s.workers)[0]
    s.workers.train_session(session, example)
    assert s.store.versions(None, session.adapter_name) == []
    s.workers.train_session(session, example)
    assert s.store.versions(None, session.adapter_name) == [2]
    stored, live = s.store.load(None, session.adapter_name), session.current()
    assert stored.version == live.version == 2 and stored.ranks == live.ranks
    for name in live.modules:
        torch.testing.assert_close(stored.delta(name), live.delta(name), rtol=1e-5, atol=1e-7)


def test_evicted_session_is_not_trained(make_stack):
    s = make_stack(max_sessions=1)
    old, _ = s.sessions.attach(None, "old")
    rec = Recorder(old)
    example = edit_examples(s.workers)[0]
    old.enqueue([example])
    s.sessions.detach(old)
    s.sessions.attach(None, "new")  # over max_sessions: the idle one is evicted
    assert s.sessions.get(None, "old") is None

    before = old.current()
    s.workers.train_session(old, example)
    assert old.current() is before and old.steps == 0 and old.adapter.version == before.version
    assert rec.messages == []


def test_replaced_session_object_is_not_trained(make_stack):
    s = make_stack()
    stale, _ = s.sessions.attach(None, "s1")
    example = edit_examples(s.workers)[0]
    s.sessions.delete_session(None, "s1")
    fresh, _ = s.sessions.attach(None, "s1")  # same id, a new session
    assert fresh is not stale
    rec = Recorder(fresh)
    s.workers.train_session(stale, example)
    assert stale.steps == 0 and fresh.steps == 0 and fresh.current().version == 0
    assert rec.messages == []


# -- the loop -------------------------------------------------------------------------

class CountedSource:
    """A job source giving `n` work items that record themselves in `order`."""

    def __init__(self, order: list, n: int, on_run=None):
        self.order, self.left, self.on_run = order, n, on_run
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            if self.left == 0:
                return None
            self.left -= 1
            k = self.left

        def work():
            self.order.append(f"job{k}")
            if self.on_run is not None:
                self.on_run()

        return work


def test_round_robin_across_sessions_and_job_sources(make_stack):
    s = make_stack(adaptation_workers=1, persist_every=1000, idle_steps=0)  # queued steps only
    example = edit_examples(s.workers)[0]
    order: list[str] = []
    done = threading.Event()

    def check():
        if len(order) == 7:
            done.set()

    for sid in ("A", "B"):
        session, _ = s.sessions.attach(None, sid)
        session.enqueue([example, example])
        session.listeners.add(lambda m, sid=sid: (m["type"] == "adapted" and order.append(sid), check()))
    s.workers.sources.append(CountedSource(order, 3, on_run=check))

    s.workers.start()
    assert done.wait(WAIT_S), order
    s.workers.stop(timeout=WAIT_S)
    # Sources take turns (sessions, then jobs) and sessions take turns among themselves;
    # once the job source runs dry the sessions go on.
    assert order == ["A", "job2", "B", "job1", "A", "job0", "B"]
    assert [s.sessions.get(None, sid).steps for sid in ("A", "B")] == [2, 2]


def test_stop_joins_after_the_current_step(make_stack):
    s = make_stack(adaptation_workers=2)
    started, stopping, finished = threading.Event(), threading.Event(), threading.Event()
    taken = []

    def source():
        if taken:
            return None
        taken.append(1)

        def slow_step():
            started.set()
            assert stopping.wait(WAIT_S)
            finished.set()

        return slow_step

    s.workers.sources.append(source)
    before = set(threading.enumerate())
    s.workers.start()
    threads = set(threading.enumerate()) - before
    assert len(threads) == 2  # adaptation_workers
    assert started.wait(WAIT_S)
    stopping.set()
    s.workers.stop(timeout=WAIT_S)
    assert finished.is_set()  # the step in progress ran to its end
    assert not any(t.is_alive() for t in threads)
    assert taken == [1]


def test_stop_is_idempotent_and_safe_before_start(make_stack):
    make_stack().workers.stop(timeout=1)  # never started: returns at once
    s = make_stack()
    before = set(threading.enumerate())
    s.workers.start()
    threads = set(threading.enumerate()) - before
    assert threads
    s.workers.stop(timeout=WAIT_S)
    s.workers.stop(timeout=WAIT_S)
    assert not any(t.is_alive() for t in threads)


def test_a_stopped_pool_trains_again_after_start(make_stack):
    s = make_stack()
    ran = threading.Event()
    s.workers.start()
    s.workers.stop(timeout=WAIT_S)
    s.workers.sources.append(lambda: (lambda: ran.set()) if not ran.is_set() else None)
    s.workers.start()
    try:
        assert ran.wait(WAIT_S)  # the restarted threads take work
    finally:
        s.workers.stop(timeout=WAIT_S)


# -- replay and idle steps ------------------------------------------------------------

def test_an_opened_document_joins_the_replay_buffer_and_idle_steps_follow_each_edit(make_stack):
    s = make_stack(edit_quiet_s=30.0, idle_steps=2, replay_rows=1)
    session, _ = s.sessions.attach(None, "s1")
    session.open_doc("a.py", FILE_V1, 1, "python", s.settings.edit_quiet_s)
    session.open_doc("a.py", FILE_V1, 1, "python", s.settings.edit_quiet_s)  # a reopened document counts once
    session.edit_doc("a.py", 2, FILE_V2)
    s.workers.settle_edits(now=time.monotonic() + 31)
    assert len(session.replay.documents) >= 1
    assert all(d.weight == pytest.approx(s.settings.document_weight) for d in session.replay.documents)
    n_examples = len(session.queue)
    # Every example trains once, then each earns 2 idle steps: a version per step, and then it stops.
    expected = n_examples * 3
    rec = Recorder(session, until=lambda msgs: sum(m["type"] == "adapted" for m in msgs) >= expected)
    s.workers.start()
    assert rec.done.wait(WAIT_S * 3), rec.of_type("adapted")
    assert session.replay.idle_credit == 0
    versions = session.current().version
    s.workers.wake()
    s.workers.settle_edits()  # nothing new: the idle budget is spent, so no further versions
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and session.current().version == versions:
        s.workers.wake()
        time.sleep(0.05)  # polling a condition that must stay false, for a bounded time
    assert session.current().version == versions


def test_a_private_document_never_joins_the_replay_buffer(make_stack):
    s = make_stack(idle_steps=1)  # documents are replayed in idle steps only
    session, _ = s.sessions.attach(None, "s1")
    session.open_doc(".env", "API_KEY=Zx81kQ2mPq7Lr4Tv9Wb3Hs6Jd0\n", 1, None, s.settings.edit_quiet_s)
    session.open_doc("a.py", FILE_V1, 1, "python", s.settings.edit_quiet_s)
    s.workers.settle_edits()
    assert session.replay.documents and all(d.path == "a.py" for d in session.replay.documents)
