"""SessionManager on its own: create, join, restore and evict; disk I/O stays outside the manager lock."""

from __future__ import annotations

import threading

import pytest

from server.errors import ClientError

WAIT_S = 60


def test_two_tabs_join_one_session_and_a_new_manager_restores_it(make_manager):
    manager = make_manager()
    first, token = manager.attach("key-a", "s1")
    second, token2 = manager.attach("key-a", "s1")
    assert second is first and first.connections == 2 and token2 != token
    manager.persist(first, force=True)

    again = make_manager()
    restored, _ = again.attach("key-a", resume_token=token)
    assert restored.id == "s1" and restored is not first
    assert restored.snapshot.version == first.snapshot.version
    assert again.get("key-b", "s1") is None  # another key never sees it


def test_a_slow_restore_does_not_block_other_sessions(make_manager, monkeypatch):
    manager = make_manager()
    s1, _ = manager.attach("key-a", "s1")
    manager.persist(s1, force=True)
    manager.detach(s1)
    other, _ = manager.attach("key-a", "other")

    fresh = make_manager()  # s1 is on disk only here
    fresh.attach("key-a", "other")
    inside, release = threading.Event(), threading.Event()
    real_load = fresh.store.load

    def slow_load(*args, **kwargs):
        inside.set()
        assert release.wait(WAIT_S)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(fresh.store, "load", slow_load)
    restoring = threading.Thread(target=fresh.attach, args=("key-a", "s1"))
    restoring.start()
    try:
        assert inside.wait(WAIT_S)
        # The restore is stuck reading the disk; the manager still answers for everyone else.
        looked_up = threading.Event()
        threading.Thread(target=lambda: (fresh.get("key-a", "other"), fresh.sessions(), looked_up.set()),
                         daemon=True).start()
        assert looked_up.wait(WAIT_S)
    finally:
        release.set()
        restoring.join(WAIT_S)
    assert fresh.get("key-a", "s1") is not None


def test_concurrent_attaches_of_one_id_build_it_once(make_manager):
    manager = make_manager()
    results, barrier = [], threading.Barrier(4)

    def attach():
        barrier.wait(WAIT_S)
        results.append(manager.attach("key-a", "same")[0])

    threads = [threading.Thread(target=attach) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert len(results) == 4 and all(s is results[0] for s in results)
    assert results[0].connections == 4 and len(manager.sessions("key-a")) == 1


def test_idle_sessions_beyond_the_limit_are_persisted_and_evicted(make_manager):
    manager = make_manager(max_sessions=2)
    idle, _ = manager.attach("key-a", "idle")
    manager.detach(idle)
    busy, _ = manager.attach("key-a", "busy")  # still connected
    third, _ = manager.attach("key-a", "third")
    assert manager.get("key-a", "idle") is None  # the idle one went to disk
    assert manager.get("key-a", "busy") is busy
    # It never trained: its metadata (resume tokens) is stored, its adapter is not.
    assert manager.describe_stored("key-a", "idle") is not None
    assert not manager.store.exists("key-a", "session-idle")
    manager.detach(third)
    back, _ = manager.attach("key-a", "idle")  # and comes back from it (taking the room of the idle third)
    assert back.id == "idle" and back is not idle


def test_when_every_resident_session_is_connected_a_new_one_is_refused_until_one_leaves(make_manager):
    manager = make_manager(max_sessions=2)
    first, _ = manager.attach("key-a", "first")
    manager.attach("key-a", "second")
    with pytest.raises(ClientError) as refused:
        manager.attach("key-a", "third")
    assert refused.value.code == "too_many_sessions"
    assert len(manager.sessions()) == 2 and manager.describe_stored("key-a", "third") is None
    manager.detach(first)
    third, _ = manager.attach("key-a", "third")  # the idle one makes room
    assert third.id == "third" and manager.get("key-a", "first") is None and len(manager.sessions()) == 2
