"""The sessions' background writer: what changed is on disk within ``persist_interval_s``.

Training writes a session's adapter every ``persist_every`` versions; a version published and then left
alone (the user stopped typing) would wait for the next K-th, or for shutdown, and be lost to a crash.
This thread writes every session whose version or open documents changed, once per interval, and
applies the stored-session retention policy at start and every ``RETENTION_EVERY_S``. It runs off the
event loop and holds no lock but the one session's it is writing.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("dynarank.sessions")

RETENTION_EVERY_S = 60.0
IDLE_WAIT_S = 60.0  # with persist_interval_s = 0: wake only for retention or a request


class SessionPersister:
    def __init__(self, manager, interval_s: float):
        self.manager = manager
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="session-persister", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop; a write in progress finishes (the caller persists whatever is left)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def request(self) -> None:
        """Write the changed sessions now rather than at the next tick."""
        self._wake.set()

    def _run(self) -> None:
        next_retention = 0.0  # at start
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_retention:
                self._guarded(self.manager.apply_retention, "applying the retention policy")
                next_retention = now + RETENTION_EVERY_S
            self._wake.wait(min(self.interval_s or IDLE_WAIT_S, max(0.0, next_retention - time.monotonic())))
            requested = self._wake.is_set()
            self._wake.clear()
            if self._stop.is_set():
                return
            if self.interval_s or requested:
                self._guarded(self.manager.persist_changed, "persisting sessions")

    @staticmethod
    def _guarded(fn, what: str) -> None:
        try:
            fn()
        except Exception:  # a full disk must not end the thread: the next tick tries again
            log.exception("%s failed", what)
