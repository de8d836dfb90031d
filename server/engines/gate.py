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
"""

from __future__ import annotations

import contextlib
import threading
import time


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
