"""The Python client on the session pushes added by issue 17 (docs/protocol.md): ``dropped`` and
``rolled_back`` are parsed and printed, and the ``rollback`` message is built."""

from __future__ import annotations

from ide_client import display
from ide_client import messages as m


def test_dropped_and_rolled_back_are_parsed_and_printed():
    dropped = m.parse({"type": "dropped", "count": 3, "dropped": 41, "queue_depth": 32, "max_queue": 32})
    assert isinstance(dropped, m.Dropped) and (dropped.count, dropped.dropped) == (3, 41)
    assert "3 example(s)" in display.format_event(dropped) and "32/32" in display.format_event(dropped)
    rolled = m.parse({"type": "rolled_back", "version": 9, "restored_version": 6, "ranks": {"a": 8},
                      "mean_rank": 8.0, "id": "r1", "later_field": True})
    assert isinstance(rolled, m.RolledBack) and (rolled.version, rolled.restored_version, rolled.id) == (9, 6, "r1")
    assert "v9 serves v6" in display.format_event(rolled)


def test_rollback_message():
    assert m.rollback(6) == {"type": "rollback", "version": 6}
    assert m.rollback(6, rid="r1") == {"type": "rollback", "version": 6, "id": "r1"}
