"""Test-only fault points: named places where a crash test kills the process (kill -9) mid-write.

``fault_point(name)`` does nothing unless ``DYNARANK_FAULT_POINT`` names that point (one environment
lookup, so production pays nothing). When it does, and the file named by ``DYNARANK_FAULT_GATE`` exists
(if that variable is set: a test arms the point once the state it wants to crash is reached), the
thread creates ``DYNARANK_FAULT_MARKER`` (so the test waits on an event, not a timer) and sleeps until
the test kills the process. Points are named ``<area>.<step>``; tests/server/test_crash_safety.py
lists them.
"""

from __future__ import annotations

import os
import time

POINT_ENV = "DYNARANK_FAULT_POINT"
GATE_ENV = "DYNARANK_FAULT_GATE"
MARKER_ENV = "DYNARANK_FAULT_MARKER"


def fault_point(name: str) -> None:
    if os.environ.get(POINT_ENV) != name:
        return
    gate = os.environ.get(GATE_ENV)
    if gate and not os.path.exists(gate):
        return
    marker = os.environ.get(MARKER_ENV)
    if marker:
        with open(marker, "w") as f:
            f.write(name)
    while True:  # the test kills the process here
        time.sleep(60)
