"""Background adaptation: worker threads that train session adapters and jobs.

Each loop turn settles coalesced edits into examples, takes the next piece of
work round robin across sources (sessions, then fine-tuning jobs), and runs one
``train_step`` on the shared frozen base model in a ``ServingGate`` training
slice: the step starts when serving is quiet or its fair share is due, and
pauses at every decoder-layer boundary while a completion runs (the pause
points are installed on the model once, here). A session step publishes a new
snapshot by reference and tells the session's listeners before anything is
written to disk.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from adapter_core.pause_points import install_pause_points
from server.adaptation.examples import document_examples, edit_example_builder
from server.adaptation.learner import adapt_on_example, idle_step
from server.devices import training_stream
from server.engines.gate import ServingGate
from server.feedback import settle_feedback
from server.observability.metrics import log_event
from server.sessions import Session, SessionManager

log = logging.getLogger("dynarank.workers")

# How often an idle worker looks for settled edits: an edit settles edit_quiet_s after its last
# keystroke, and this poll adds up to that much to the time until its step starts.
SETTLE_POLL_S = 0.05


class AdaptationWorkers:
    def __init__(self, settings, model, tokenizer, sessions: SessionManager, gate: ServingGate | None,
                 metrics=None):
        self.settings = settings
        self.model = model
        self.sessions = sessions
        self.gate = gate or ServingGate()
        self.metrics = metrics
        self.sources = []  # extra callables returning a zero-arg step function or None (jobs)
        self._builder = None
        self._tokenizer = tokenizer
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._turn = 0
        self._take_lock = threading.Lock()
        self._device = next(model.parameters()).device if model is not None else torch.device("cpu")
        if model is not None:  # before any thread runs on the model: hooks are added to live modules
            install_pause_points(model)

    @property
    def builder(self):
        if self._builder is None:
            self._builder = edit_example_builder(self._tokenizer)
        return self._builder

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._stop.clear()  # a stopped pool can be started again
        for i in range(max(1, self.settings.adaptation_workers)):
            t = threading.Thread(target=self._run, name=f"adapt-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop taking work; the step in progress finishes (threads are joined)."""
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    # -- loop --------------------------------------------------------------------

    def _run(self) -> None:
        if self.settings.train_threads and not torch.cuda.is_available():
            # Per-thread on CPU: serving threads keep the process-wide count.
            torch.set_num_threads(self.settings.train_threads)
        self._warm_up()
        while not self._stop.is_set():
            try:
                self.settle_edits()
                work = self._take()
                if work is None:
                    self._train_idle()
                    self._wake.wait(SETTLE_POLL_S)
                    self._wake.clear()
                    continue
                self.run_step(work)
            except Exception:
                log.exception("adaptation step failed")
                time.sleep(0.5)

    def _warm_up(self) -> None:
        """Build the example builder and parse once before the first edit arrives, so that edit's
        time to live does not pay for it (about 0.15 s)."""
        if self._tokenizer is None:
            return
        try:
            self.builder.from_edit("x = 1\n", "x = 2\n", path="warm_up.py", language="python")
        except Exception:
            log.warning("warming up the example builder failed", exc_info=True)

    def run_step(self, work) -> None:
        """Run one taken step, exactly once, in a training slice: it starts when serving is quiet or the
        gate's fair share is due and pauses at layer boundaries while serving is busy (ServingGate).
        An exception of the step goes to the caller; a dict it returns joins its log line."""
        t0 = time.monotonic()
        with self.gate.training_slice() as yielded, training_stream(self._device):
            done = work()
        # One line per step: how long it took, how much of that it gave to serving, and what it published.
        published = done if isinstance(done, dict) else {}
        log_event("training_step", total_s=round(time.monotonic() - t0, 4), waited_s=round(yielded.waited_s, 4),
                  paused_s=round(yielded.paused_s, 4), pauses=yielded.pauses, **published)

    def _take(self):
        with self._take_lock:
            takers = [self._take_session, *self.sources]
            for i in range(len(takers)):
                taker = takers[(self._turn + i) % len(takers)]
                work = taker()
                if work is not None:
                    self._turn = (self._turn + i + 1) % len(takers)
                    return work
        return None

    def _take_session(self):
        item = self.sessions.take()
        if item is None:
            return None
        session, example = item
        return lambda: self.train_session(session, example)

    def _train_idle(self) -> None:
        """One idle step (server.sessions.replay) for the session that used the server last and has
        idle steps left, but only while no completion runs: idle training never delays serving."""
        waiting = [s for s in self.sessions.sessions() if s.replay.idle_credit > 0 and not s.queue]
        if not waiting or not self.gate.wait_idle(timeout=0):
            return
        session = max(waiting, key=lambda s: s.last_used)
        self.run_step(lambda: self.train_session(session))  # idle a moment ago: pauses if a completion starts

    def settle_edits(self, now: float | None = None) -> None:
        """Turn settled edit bursts into examples on each session's queue."""
        now = time.monotonic() if now is None else now
        for session in self.sessions.sessions():
            edits = session.settle(now)
            for before, after, path, language in edits:
                try:
                    examples = self.builder.from_edit(before, after, path=path, language=language)
                except Exception as exc:
                    log.warning("no examples from edit of %s: %s", path, exc)
                    continue
                if examples:
                    session.enqueue(examples)
                    session.notify(session.status())
                    self._metric_queue(session)
            for path, text, language in session.settle_documents():
                try:  # the opened document's identifiers and style, as low-weight replay rows
                    examples = document_examples(self.builder, text, path, language)
                except Exception as exc:
                    log.warning("no examples from document %s: %s", path, exc)
                    continue
                session.replay.add_documents(examples)
            if settle_feedback(session, self.builder, self.settings):  # accepted completions the user kept
                session.notify(session.status())
                self._metric_queue(session)

    # -- one session step ---------------------------------------------------------

    def train_session(self, session: Session, example=None) -> dict | None:
        """One step on ``example`` with the session's replay rows, or (``example=None``) one idle step.
        Returns ``{"session", "version"}`` of the version it published, None if it published none."""
        with session.train_lock:
            if self.sessions.get(session.owner, session.id) is not session:
                return None  # evicted meanwhile
            if example is None:
                stats, snap = idle_step(self.model, session.adapter, session.policy, session.replay)
            else:
                stats, snap = adapt_on_example(self.model, session.adapter, session.policy, example, session.replay)
            if snap is None:
                return None  # skipped step: nothing new to publish
            summary = session.publish(snap, stats.loss)
        self.sessions.published(snap)
        # The version is live: tell the tabs before writing it (the write is not what they wait for).
        self._metric_step(session, stats, snap)
        session.notify({"type": "adapted", "version": snap.version, "loss": round(stats.loss, 6),
                        "ranks": summary["ranks"], "mean_rank": summary["mean_rank"]})
        session.notify(session.status())
        if snap.version - session.persisted_version >= max(1, self.settings.persist_every):
            # After the step, not under train_lock; and never waiting for a write of the background writer
            # already under way (it writes the newest version within persist_interval_s anyway).
            try:
                self.sessions.persist(session, wait=False)
            except Exception:
                log.exception("persisting session %s failed", session.id)
        return {"session": session.id, "version": snap.version}

    # -- metrics (owned by server/observability/metrics.py; used only if present) ---------------
    # Server-wide counters go to /metrics; per-session figures stay keyed by (owner, session id) and
    # are dropped for a session the manager no longer holds (see Metrics.track_session).

    def _metric_queue(self, session: Session) -> None:
        if self.metrics is not None:
            self.metrics.session_queue(session, len(session.queue))

    def _metric_step(self, session: Session, stats, snap) -> None:
        m = self.metrics
        if m is None:
            return
        m.session_step(session, stats.loss, snap.ranks)
        self._metric_queue(session)
