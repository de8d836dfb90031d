"""Serving-first scheduling between completions and background training.

Completions and adaptation steps share the same CPU cores (or GPU). A
completion should wait for training as little as possible, yet a steady stream
of completions must not stop adaptation, so training yields to serving at a
fine grain and keeps a fair share of the time.

API (one ``ServingGate`` per engine, ``engine.gate``; also
the workers get it from the app state):

Serving side (done by ``HFEngine.generate``; other engines do the same)::

    with gate.serving():          # registered from request start to last token
        ...generate...

Training side (background workers), one slice per train step::

    with gate.training_slice() as stats:   # waits at the start (the rule below), then
        run_one_step()                      # pauses at every pause point while serving is busy

    gate.wait_idle(timeout=1.0)   # -> bool; only wait, do not mark anything

Serving is *busy* while a completion is active and for ``grace_s`` after the last
one ended (an editor asks again soon after a completion: see ``GRACE_S``).

Inside a slice the step passes a pause point at every decoder-layer boundary, in
forward and in backward (``adapter_core.pause_points``, installed once per model
by the workers; only the training thread pauses there, a serving forward never
does). At each one ``pause_point`` applies the fair-share rule:

    while serving is busy, training runs one segment (one layer, forward or
    backward), then waits until serving is quiet, or until it has waited
    (1 - share) / share times as long as that segment ran.

So a completion waits for at most one layer of training at a time, and under a
continuous load training still gets ``training_share`` of the wall time
(``TRAINING_SHARE``: a step of S seconds then takes about S / share). The start
of a slice is a pause point too, with the thread's usual segment length for the
segment it has not run yet. Pausing only blocks: a paused step computes what an
unpaused one does. A paused step holds its session's ``train_lock``, which
serving never takes (completions read the published snapshot under the session's
``lock``); it takes no ``FairTurns`` turn.

``active`` is the number of completions in flight, ``training`` whether a
training slice is running (paused or not), ``paused`` how many are paused now;
``training_waits`` counts slices that had to wait at their start,
``training_pauses`` pauses inside slices.

``FairTurns`` shares an engine's forward passes between concurrent
completions: one at a time, round robin between *clients* (a websocket
connection, an HTTP request; named by ``serving_client`` in the generating
thread), so a client with many completions in flight gets no more forwards
than a client with one. The bridge sets ``serving_client``; ``HFEngine`` takes
one turn per prefill chunk of a request's prompt, and its batch scheduler one
turn per decode step shared by every row in the batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator

from adapter_core.pause_points import pausing

# Who the generation running in this thread serves (set by server.engines.bridge in its worker thread).
serving_client: contextvars.ContextVar[Hashable | None] = contextvars.ContextVar("dynarank_serving_client",
                                                                                  default=None)

# How long serving stays busy after the last completion ends. Editors ask again soon after one:
# VS Code debounces inline-completion requests by at most 50 ms (microsoft/vscode#152747) and asks
# again without a debounce after an accept (#240239); Copilot-like clients wait 75-150 ms after the
# last keystroke (Zed: Copilot 75 ms, Codestral 150 ms; our extension's dynarank.debounceMs 150 ms),
# and a user typing on adds the time between keys. 0.1 s covers the re-ask after an accept and
# VS Code's debounce plus a round trip; a request that comes later waits for at most one layer of
# training, so a longer grace would only take time from training after every completion.
GRACE_S = 0.1
# Share of the wall time training gets while serving is continuously busy (see the module doc): the
# trade between completion latency under such a load (completions share the machine with one layer
# of training this much of the time) and adaptation (a step takes about 1 / share times as long).
TRAINING_SHARE = 0.25
# A training thread's guess of one segment before it has timed one: a slow layer, so that the first
# slice under load does not start early.
FIRST_SEGMENT_S = 0.25
SEGMENT_EMA = 0.25  # weight of the newest segment in a thread's usual segment length


@dataclasses.dataclass
class SliceStats:
    """What one training slice waited for serving: at its start and at its pause points (seconds)."""

    waited_s: float = 0.0
    paused_s: float = 0.0
    pauses: int = 0


@dataclasses.dataclass
class _RunningSlice:
    """A slice in progress: its stats, when it last resumed, and its training thread's usual segment length."""

    stats: SliceStats
    resumed: float
    segment_s: float | None


class ServingGate:
    def __init__(self, grace_s: float = GRACE_S, training_share: float = TRAINING_SHARE):
        if not grace_s >= 0:
            raise ValueError(f"grace_s must be >= 0, got {grace_s}")
        if not 0 < training_share <= 1:
            raise ValueError(f"training_share must be in (0, 1], got {training_share}")
        self.grace_s = grace_s
        self.training_share = training_share
        self._cond = threading.Condition()
        self._active = 0
        self._last_end = float("-inf")
        self._training = 0
        self._paused = 0
        self.training_waits = 0
        self.training_pauses = 0
        self._local = threading.local()  # per training thread: .slice (running), .segment_s (its usual segment)

    @property
    def active(self) -> int:
        return self._active

    @property
    def training(self) -> bool:
        return self._training > 0

    @property
    def paused(self) -> int:
        return self._paused

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

    def _quiet_in(self, now: float) -> float | None:
        """Seconds until serving is quiet: 0 when it is, None while a completion is active."""
        if self._active:
            return None
        return max(0.0, self.grace_s - (now - self._last_end))

    def _wait_quiet(self, until: float | None) -> bool:
        """Under ``_cond``: wait until serving is quiet (True) or the monotonic time ``until`` (False)."""
        while True:
            now = time.monotonic()
            quiet_in = self._quiet_in(now)
            if quiet_in == 0:
                return True
            if until is not None:
                if now >= until:
                    return False
                quiet_in = until - now if quiet_in is None else min(quiet_in, until - now)
            self._cond.wait(quiet_in)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no completion is active (and the grace period has passed).

        Returns False if ``timeout`` seconds passed first.
        """
        with self._cond:
            return self._wait_quiet(None if timeout is None else time.monotonic() + timeout)

    def wait_paused(self, timeout: float | None = None) -> bool:
        """Block until a training slice is paused at a pause point (monitors, tests); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._paused > 0, timeout)

    def _share_wait_s(self, ran_s: float) -> float:
        """How long training waits for busy serving after running ``ran_s`` seconds (the fair share)."""
        return ran_s * (1 - self.training_share) / self.training_share

    @contextlib.contextmanager
    def training_slice(self, timeout: float | None = None) -> Iterator[SliceStats]:
        """Run the block as one training slice: start once serving is quiet or the fair share is
        due, and pause at the block's pause points (``pause_point``) while serving is busy.

        Raises TimeoutError if serving stayed busy for ``timeout`` seconds before the share was due.
        """
        local = self._local
        if getattr(local, "slice", None) is not None:
            raise RuntimeError("training slices do not nest")
        start = time.monotonic()
        segment_s = getattr(local, "segment_s", None)
        due = start + self._share_wait_s(FIRST_SEGMENT_S if segment_s is None else segment_s)
        give_up = None if timeout is None else start + timeout
        with self._cond:
            if self._quiet_in(start) != 0:
                self.training_waits += 1
                quiet = self._wait_quiet(due if give_up is None else min(due, give_up))
                if not quiet and give_up is not None and give_up < due:
                    raise TimeoutError("serving stayed busy")
            self._training += 1
        resumed = time.monotonic()
        running = _RunningSlice(SliceStats(waited_s=resumed - start), resumed, segment_s)
        local.slice = running
        try:
            # The slice goes with the callable rather than being looked up by thread: on CUDA, autograd
            # runs the backward pause points in a thread of its own.
            with pausing(lambda where: self.pause_point(where, running)):
                yield running.stats
        finally:
            local.slice = None
            local.segment_s = running.segment_s
            with self._cond:
                self._training -= 1

    def pause_point(self, where: Hashable = None, running: _RunningSlice | None = None) -> None:
        """Between two segments of a step (``adapter_core.pause_points``): wait by the fair-share rule
        while serving is busy. ``running``: the slice (default: the calling thread's); none: nothing."""
        running = running or getattr(self._local, "slice", None)
        if running is None:
            return
        now = time.monotonic()
        ran = now - running.resumed
        previous = running.segment_s
        running.segment_s = ran if previous is None else (1 - SEGMENT_EMA) * previous + SEGMENT_EMA * ran
        with self._cond:
            if self._quiet_in(now) != 0:
                self.training_pauses += 1
                running.stats.pauses += 1
                self._paused += 1
                self._cond.notify_all()  # for wait_paused
                try:
                    self._wait_quiet(now + self._share_wait_s(ran))
                finally:
                    self._paused -= 1
        running.resumed = time.monotonic()
        running.stats.paused_s += running.resumed - now


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
