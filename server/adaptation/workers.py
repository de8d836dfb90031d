"""Background adaptation: worker threads that train session adapters and jobs.

Each loop turn settles coalesced edits into examples, takes the next piece of
work round robin across sources (sessions, then fine-tuning jobs), waits for a
quiet moment in serving (``ServingGate``), and runs one ``train_step`` on the
shared frozen base model. A session step publishes a new snapshot by reference
and tells the session's listeners.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from server.adaptation.examples import document_examples, edit_example_builder
from server.adaptation.learner import adapt_on_example, idle_step
from server.engines.gate import ServingGate
from server.feedback import settle_feedback
from server.sessions import Session, SessionManager

log = logging.getLogger("dynarank.workers")

# A step waits at most this long for serving to go quiet, then runs anyway so a
# stream of completions cannot starve adaptation for ever.
MAX_YIELD_S = 3.0


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
        while not self._stop.is_set():
            try:
                self.settle_edits()
                work = self._take()
                if work is None:
                    self._train_idle()
                    self._wake.wait(0.1)
                    self._wake.clear()
                    continue
                self.run_step(work)
            except Exception:
                log.exception("adaptation step failed")
                time.sleep(0.5)

    def run_step(self, work) -> None:
        """Run one taken step, exactly once: in a training slice, or, if serving stayed busy for
        MAX_YIELD_S, without one. Only the gate's TimeoutError means that; one the step raises is the
        step's own failure and goes to the caller."""
        started = False
        try:
            with self.gate.training_slice(timeout=MAX_YIELD_S):
                started = True
                work()
        except TimeoutError:
            if started:
                raise  # the step's own
            work()  # serving stayed busy: run anyway, so completions cannot starve adaptation

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
        with self.gate.training_slice():  # idle a moment ago: waits only if a completion just started
            self.train_session(session)

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

    def train_session(self, session: Session, example=None) -> None:
        """One step on ``example`` with the session's replay rows, or (``example=None``) one idle step."""
        with session.train_lock:
            if self.sessions.get(session.owner, session.id) is not session:
                return  # evicted meanwhile
            if example is None:
                stats, snap = idle_step(self.model, session.adapter, session.policy, session.replay)
            else:
                stats, snap = adapt_on_example(self.model, session.adapter, session.policy, example, session.replay)
            if snap is None:
                return  # skipped step: nothing new to publish
            summary = session.publish(snap, stats.loss)
        if snap.version - session.persisted_version >= max(1, self.settings.persist_every):
            # After the step, not under train_lock; and never waiting for a write of the background writer
            # already under way (it writes the newest version within persist_interval_s anyway).
            try:
                self.sessions.persist(session, wait=False)
            except Exception:
                log.exception("persisting session %s failed", session.id)
        self._metric_step(session, stats, snap)
        session.notify({"type": "adapted", "version": snap.version, "loss": round(stats.loss, 6),
                        "ranks": summary["ranks"], "mean_rank": summary["mean_rank"]})
        session.notify(session.status())

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
