"""Serving-first scheduling between completions and background training.

Completions and adaptation steps share the same CPU cores (or GPU). A
completion must never wait behind training, so training yields: it runs its
micro-steps only while no completion is active.

API (one ``ServingGate`` per engine, ``engine.gate``; also
the workers get it from the app state):

Serving side (done by ``HFEngine.generate``; other engines do the same)::

    with gate.serving():          # registered from request start to last token
        ...generate...

Training side (background workers), between micro-steps::

    with gate.training_slice():   # waits until no completion is active, then
        run_one_micro_step()      # marks training as running for the metrics

    gate.wait_idle(timeout=1.0)   # -> bool; only wait, do not mark anything

``grace_s`` (constructor): after the last completion ends, training waits this
long before it may start, because an IDE usually sends the next completion
within a few hundred milliseconds of the previous one. A micro-step that has
already started is not interrupted; keep micro-steps short.

``active`` is the number of completions in flight, ``training`` whether a
training slice is running, ``training_waits`` how many times a slice had to
wait for serving.

``FairTurns`` shares an engine's forward passes between concurrent
completions: one at a time, round robin between *clients* (a websocket
connection, an HTTP request; named by ``serving_client`` in the generating
thread), so a client with many completions in flight gets no more forwards
than a client with one. The bridge sets ``serving_client``; ``HFEngine`` takes
one turn per forward.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator

# Who the generation running in this thread serves (set by server.engines.bridge in its worker thread).
serving_client: contextvars.ContextVar[Hashable | None] = contextvars.ContextVar("dynarank_serving_client",
                                                                                  default=None)


class ServingGate:
    def __init__(self, grace_s: float = 0.05):
        self.grace_s = grace_s
        self._cond = threading.Condition()
        self._active = 0
        self._last_end = 0.0
        self._training = 0
        self.training_waits = 0

    @property
    def active(self) -> int:
        return self._active

    @property
    def training(self) -> bool:
        return self._training > 0

    @contextlib.contextmanager
    def serving(self):
        """Register one completion for the duration of the block."""
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._last_end = time.monotonic()
                self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no completion is active (and the grace period has passed).

        Returns False if ``timeout`` seconds passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                if self._active == 0:
                    quiet_for = now - self._last_end
                    if quiet_for >= self.grace_s:
                        return True
                    wait = self.grace_s - quiet_for
                else:
                    wait = None
                if deadline is not None:
                    left = deadline - now
                    if left <= 0:
                        return False
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)

    @contextlib.contextmanager
    def training_slice(self, timeout: float | None = None):
        """Wait for idle serving, then run the block as one training slice.

        Raises TimeoutError if serving stayed busy for ``timeout`` seconds.
        """
        if self._active or time.monotonic() - self._last_end < self.grace_s:
            self.training_waits += 1
        if not self.wait_idle(timeout):
            raise TimeoutError("serving stayed busy")
        with self._cond:
            self._training += 1
        try:
            yield
        finally:
            with self._cond:
                self._training -= 1


class FairTurns:
    """One step (forward pass) at a time, handed out round robin between clients.

    ``with turns.turn(cancel) as granted:`` runs the block as the only holder when
    ``granted``; it is False when ``cancel`` was set while waiting (the caller
    stops without computing). Waiting steps are queued per client
    (``serving_client`` of the calling context, else the thread): when the holder
    leaves, the turn goes to the waiting client served least recently (one never
    served first), oldest step first within it. So every waiting client gets a
    turn after at most one step of each other client, however many generations
    the others have in flight.
    """

    POLL_S = 0.05  # how often a waiter looks at its cancel event
    MAX_REMEMBERED = 256  # clients whose last turn is remembered (the oldest go first)

    def __init__(self):
        self._mutex = threading.Lock()
        self._busy = False
        self._waiting: OrderedDict[Hashable, deque[threading.Event]] = OrderedDict()  # in order of arrival
        self._served: OrderedDict[Hashable, None] = OrderedDict()  # least recently served first

    @property
    def waiting(self) -> int:
        with self._mutex:
            return sum(len(q) for q in self._waiting.values())

    @contextlib.contextmanager
    def turn(self, cancel: threading.Event | None = None, client: Hashable | None = None) -> Iterator[bool]:
        key = client if client is not None else serving_client.get()
        if key is None:
            key = ("thread", threading.get_ident())
        with self._mutex:
            if not self._busy:  # nobody holds it, so nobody waits either (a release hands over to waiters)
                self._busy = True
                self._mark_served(key)
                ticket = None
            else:
                ticket = threading.Event()
                self._waiting.setdefault(key, deque()).append(ticket)
        if ticket is not None and not self._wait(ticket, key, cancel):
            yield False
            return
        try:
            yield True
        finally:
            self._release()

    def _wait(self, ticket: threading.Event, key, cancel: threading.Event | None) -> bool:
        """Wait until ``_release`` hands this ticket the turn (True) or ``cancel`` is set first (False)."""
        if cancel is None:
            ticket.wait()
            return True
        while not ticket.wait(self.POLL_S):
            if cancel.is_set():
                with self._mutex:
                    if ticket.is_set():  # handed over meanwhile: take it (the caller stops after it)
                        return True
                    queue = self._waiting.get(key)
                    if queue is not None:
                        queue.remove(ticket)
                        if not queue:
                            del self._waiting[key]
                return False
        return True

    def _release(self) -> None:
        with self._mutex:
            key = self._next()
            if key is None:
                self._busy = False
                return
            queue = self._waiting[key]
            ticket = queue.popleft()
            if not queue:
                del self._waiting[key]
            self._mark_served(key)
            ticket.set()  # the turn passes directly: _busy stays True

    def _next(self):
        for key in self._waiting:  # clients never served (or long forgotten), in order of arrival
            if key not in self._served:
                return key
        for key in self._served:  # then the least recently served
            if key in self._waiting:
                return key
        return None

    def _mark_served(self, key) -> None:
        self._served.pop(key, None)
        self._served[key] = None
        if len(self._served) > self.MAX_REMEMBERED:
            for old in [k for k in self._served if k not in self._waiting][: len(self._served) - self.MAX_REMEMBERED]:
                del self._served[old]
