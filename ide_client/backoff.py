"""Reconnect delays: exponential with jitter, so many clients of a restarted
server do not all knock at the same instant."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Backoff:
    initial: float = 0.25
    factor: float = 2.0
    maximum: float = 10.0
    jitter: float = 0.2  # +- this fraction of each delay
    max_attempts: int | None = None  # None: keep trying until close()

    def delays(self):
        delay, attempt = self.initial, 0
        while self.max_attempts is None or attempt < self.max_attempts:
            attempt += 1
            yield max(0.0, delay * (1 + random.uniform(-self.jitter, self.jitter)))
            delay = min(self.maximum, delay * self.factor)
