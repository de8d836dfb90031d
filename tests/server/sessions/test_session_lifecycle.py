"""A session's life on disk (issue 17): written only once it trained, written within persist_interval_s,
its open documents restored on resume (never a secret one), rollback to a stored version, the retention
policy for stored sessions, and dropped examples reported to the session's tabs.

Real SessionManager and AdapterStore on a tiny random Llama; a "step" moves every factor and publishes
the next version, as a training step would. Background waits poll a condition with a long deadline.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from server.errors import ClientError
from server.sessions import Session, retention
from server.store import owner_hash

WAIT_S = 60.0
AWS_KEY = "AKIA" + "IOSFODNN7EXAMPLE"  # split, so this file itself does not look like a secret
SECRET = f"aws = '{AWS_KEY}'\n"


def step(session: Session, delta: float = 0.01):
    """Stand-in for a training step: change every factor, publish the next version."""
    with session.train_lock:
        with torch.no_grad():
            for p in session.adapter.parameters():
                p.add_(delta)
        snap = session.adapter.snapshot()
        session.publish(snap, 1.0)
    return snap


def factors(snap) -> dict:
    return {n: (snap.A[n].clone(), snap.B[n].clone()) for n in snap.modules}


def same_factors(snap, saved) -> bool:
    return all(torch.equal(snap.A[n], a) and torch.equal(snap.B[n], b) for n, (a, b) in saved.items())


def eventually(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.05)


def session_files(manager, owner, sid) -> list[str]:
    """Names of everything stored for the session (its metadata directory and its adapter directory)."""
    meta = manager.meta_root / owner_hash(owner)
    names = [p.name for p in meta.glob(f"{sid}.*")] if meta.is_dir() else []
    adapter = manager.store.root / owner_hash(owner) / f"session-{sid}"
    return sorted(names + [str(p.relative_to(adapter)) for p in adapter.rglob("*")] if adapter.is_dir() else names)


# -- 1. written only once trained -----------------------------------------------------------


def test_a_session_that_never_trained_leaves_no_adapter_on_disk(make_manager):
    manager = make_manager(max_sessions=1)
    hello, token = manager.attach("k", "hello-only")
    manager.detach(hello)
    following, _ = manager.attach("k", "next")  # over max_sessions: the idle one is evicted ...
    manager.persist_all()  # ... and the other written as at shutdown
    for sid in ("hello-only", "next"):
        # Only the small metadata that keeps its resume token valid across a restart.
        assert session_files(manager, "k", sid) == [f"{sid}.json"], session_files(manager, "k", sid)
    assert manager.store.list("k") == []
    back, _ = make_manager().attach("k", resume_token=token)
    assert back.id == "hello-only" and back.current().version == 0

    manager.detach(following)  # max_sessions is 1: make room
    trained, _ = manager.attach("k", "trained")
    step(trained)
    manager.persist(trained)
    assert manager.store.versions("k", "session-trained") == [1]
    assert "trained.policy.pt" in session_files(manager, "k", "trained")


def test_an_untrained_session_resumes_at_the_repository_adapter_it_started_from(make_manager):
    manager = make_manager()
    repo = {"id": "github.com/me/shapes", "root_name": "shapes"}
    seed, _ = manager.attach("k", "seed")
    snap = step(seed, 0.02)
    manager.store.save("k", "shapes-v1", snap, info={"kind": "repository", "repository": repo})
    session, token = manager.attach("k", "from-repo", repository=repo)
    assert session.origin == "shapes-v1"
    manager.persist_all()
    assert not manager.store.exists("k", "session-from-repo")

    again, _ = make_manager().attach("k", resume_token=token)
    assert again.origin == "shapes-v1" and again.current().version == snap.version
    assert same_factors(again.current(), factors(snap))


# -- 2. timed persistence ------------------------------------------------------------------------


def test_a_version_left_idle_is_written_within_the_interval(make_manager):
    manager = make_manager(persist_every=1000, persist_interval_s=0.2)
    session, _ = manager.attach("k", "idle-after-one")
    step(session)
    session.open_doc("a.py", "x = 1\n", 3, "python", 0.5)
    manager.start_background()
    eventually(lambda: manager.store.versions("k", "session-idle-after-one") == [1], "version 1 on disk")
    eventually(lambda: manager._documents_path("k", "idle-after-one").is_file(), "the open document on disk")
    assert manager.describe_stored("k", "idle-after-one")["version"] == 1
    assert not session.dirty()


# -- 3. open documents restored -----------------------------------------------------------------


def test_open_documents_are_restored_on_resume_but_secrets_never_stored(make_manager):
    manager = make_manager()
    session, token = manager.attach("k", "docs")
    session.open_doc("a.py", "def f():\n    return 1\n", 4, "python", 0.5)
    session.open_doc("b.py", "old\n", 1, "python", 0.5)
    session.edit_doc("b.py", 2, "new\n")
    session.open_doc(".env", "PASSWORD=hunter2\n", 1, None, 0.5)
    session.open_doc("conf.py", SECRET, 1, "python", 0.5)
    session.open_doc("gone.py", "x\n", 1, "python", 0.5)
    session.close_doc("gone.py")
    manager.persist_all()

    stored = b"".join(p.read_bytes() for p in manager.meta_root.rglob("*") if p.is_file())
    assert AWS_KEY.encode() not in stored and b"hunter2" not in stored

    fresh = make_manager()  # a restart
    again, _ = fresh.attach("k", resume_token=token)
    assert {p: (d.text, d.version) for p, d in again.docs.items()} == {
        "a.py": ("def f():\n    return 1\n", 4), "b.py": ("new\n", 2)}
    assert not again.dirty()  # restored as stored: nothing to write again
    again.edit_doc("b.py", 3, "newer\n")  # the mirror goes on from the restored text
    again.close_doc("b.py")
    assert again.settle(time.monotonic()) and again.dirty()


def test_documents_over_todays_limits_are_left_out(make_manager):
    manager = make_manager()
    session, token = manager.attach("k", "limits")
    session.open_doc("small.py", "x\n", 1, "python", 0.5)
    session.open_doc("large.py", "y = 2\n" * 100, 1, "python", 0.5)
    manager.persist_all()
    again, _ = make_manager(max_document_chars=100).attach("k", resume_token=token)
    assert sorted(again.docs) == ["small.py"]


# -- 4. rollback --------------------------------------------------------------------------------


def test_rollback_serves_a_stored_version_again_as_the_next_version(make_manager):
    manager = make_manager()
    session, _ = manager.attach("k", "rb")
    heard = []
    with session.lock:
        session.listeners.add(heard.append)
    v1 = step(session)
    manager.persist(session)
    saved_v1 = factors(v1)
    step(session)
    manager.persist(session)
    assert manager.store.versions("k", "session-rb") == [1, 2]

    announced = []
    manager.on_publish = announced.append
    same, message = manager.rollback("k", "rb", 1)
    assert same is session
    now = session.current()
    assert announced == [now]  # the engine hears of the version served now (vLLM loads it ahead)
    assert now.version == 3 and same_factors(now, saved_v1)
    assert message == {"type": "rolled_back", "version": 3, "restored_version": 1, "ranks": now.ranks,
                       "mean_rank": pytest.approx(sum(now.ranks.values()) / len(now.ranks), abs=1e-3)}
    assert [m["type"] for m in heard[-2:]] == ["rolled_back", "status"] and heard[-1]["version"] == 3
    assert manager.store.versions("k", "session-rb") == [1, 2, 3]  # written before the answer
    assert same_factors(manager.store.load("k", "session-rb", 3), saved_v1)
    after = step(session)  # training goes on from the restored weights
    assert after.version == 4
    manager.persist(session)

    for version in (0, 1, 99):  # 1 fell out of keep_versions (3) when 4 was written
        with pytest.raises(ClientError) as err:
            manager.rollback("k", "rb", version)
        assert err.value.code == "version_not_found"
    with pytest.raises(ClientError) as err:
        manager.rollback("other-key", "rb", 1)
    assert err.value.code == "session_not_found"


def test_rollback_of_a_stored_session_reads_it_back(make_manager):
    manager = make_manager()
    session, _ = manager.attach("k", "cold")
    saved = factors(step(session))
    manager.persist(session)
    step(session)
    manager.persist_all()

    fresh = make_manager()  # not resident here
    restored, _ = fresh.rollback("k", "cold", 1)
    assert fresh.get("k", "cold") is restored and restored.connections == 0
    assert restored.current().version == 3 and same_factors(restored.current(), saved)


# -- retention -----------------------------------------------------------------------------------


def age(manager, owner, sid, days: float) -> None:
    """Make every stored file of the session look last used ``days`` ago."""
    t = time.time() - days * 86400
    paths = list((manager.meta_root / owner_hash(owner)).glob(f"{sid}.*"))
    paths += list((manager.store.root / owner_hash(owner) / f"session-{sid}").rglob("*"))
    for p in paths:
        os.utime(p, (t, t))


def stored_trained(make_manager, owner, sids) -> None:
    """Sessions that trained once and were written, as a server that stopped leaves them."""
    manager = make_manager()
    for sid in sids:
        session, _ = manager.attach(owner, sid)
        step(session)
    manager.persist_all()


def stored_ids(manager) -> set[str]:
    return {s.sid for s in retention.scan(manager.meta_root, manager.store)}


def test_retention_deletes_sessions_unused_too_long_but_never_a_resident_one(make_manager):
    stored_trained(make_manager, "k", ("old", "recent", "live"))
    manager = make_manager(session_retention_days=7, max_stored_sessions_mb=0)  # restarted
    manager.attach("k", "live")
    age(manager, "k", "old", 8)
    age(manager, "k", "live", 30)  # resident: its age does not matter
    age(manager, "k", "recent", 6)

    assert manager.apply_retention() == [(owner_hash("k"), "old")]
    assert stored_ids(manager) == {"recent", "live"}
    assert manager.describe_stored("k", "old") is None and not manager.store.exists("k", "session-old")


def test_retention_keeps_stored_sessions_under_the_size_cap_least_recently_used_first(make_manager):
    stored_trained(make_manager, "k", ("a", "b", "c", "d"))
    manager = make_manager()  # restarted
    manager.attach("k", "d")
    for i, sid in enumerate(("a", "b", "c")):
        age(manager, "k", sid, 4 - i)  # a is the least recently used
    sizes = {s.sid: s.size for s in retention.scan(manager.meta_root, manager.store)}
    assert all(sizes.values())
    manager.settings.max_stored_sessions_mb = (sizes["c"] + sizes["d"] + 1) / retention.MB
    age(manager, "k", "d", 10)  # resident, oldest of all: never taken, but counted

    assert [sid for _, sid in manager.apply_retention()] == ["a", "b"]
    assert stored_ids(manager) == {"c", "d"}


def test_retention_runs_when_the_background_writer_starts(make_manager):
    stored_trained(make_manager, "k", ("ancient",))
    restarted = make_manager(session_retention_days=30)
    age(restarted, "k", "ancient", 400)
    restarted.start_background()
    eventually(lambda: not stored_ids(restarted), "the stored session past retention deleted")


def test_choose_is_oldest_first_and_ignores_residents():
    S = retention.StoredSession
    stored = [S("o", "x", last_used=100, size=10), S("o", "y", last_used=50, size=10),
              S("o", "z", last_used=10, size=10), S("o", "r", last_used=1, size=10)]
    picked = retention.choose(stored, {("o", "r")}, now=200, max_age_s=0, max_bytes=25)
    assert [s.sid for s in picked] == ["z", "y"]
    picked = retention.choose(stored, {("o", "r")}, now=200, max_age_s=120, max_bytes=0)
    assert [s.sid for s in picked] == ["z", "y"] and "days" in picked[0].why
    assert retention.choose(stored, set(), now=200, max_age_s=0, max_bytes=0) == []


# -- 5. dropped examples ---------------------------------------------------------------------------


def test_a_full_queue_tells_the_tabs_how_many_examples_were_dropped():
    session = Session("q", None, None, None, type("Snap", (), {"version": 0})(), token_hashes=[], max_queue=2)
    heard = []
    session.listeners.add(heard.append)
    assert session.enqueue(["e1", "e2"]) == 2 and heard == []
    session.enqueue(["e3"])
    session.enqueue(["e4", "e5", "e6"])
    assert heard == [
        {"type": "dropped", "count": 1, "dropped": 1, "queue_depth": 2, "max_queue": 2},
        {"type": "dropped", "count": 3, "dropped": 4, "queue_depth": 2, "max_queue": 2},
    ]
    assert list(session.queue) == ["e5", "e6"] and session.status()["dropped"] == 4


# -- 6. no disk I/O under a lock another session waits on ------------------------------------------


def test_a_slow_save_of_one_session_holds_up_no_other(make_manager, monkeypatch):
    """The store's lock is per adapter and the manager writes outside its own lock: while one session's
    adapter is being written, another owner's session is attached, looked up, trained and written."""
    import adapter_core

    manager = make_manager()
    slow, _ = manager.attach("owner-a", "slow")
    other, _ = manager.attach("owner-b", "quick")
    step(slow)
    step(other)
    inside, release = threading.Event(), threading.Event()
    real_save = adapter_core.save_peft

    def save_peft(snapshot, directory, *args, **kwargs):
        if "session-slow" in str(directory):
            inside.set()
            assert release.wait(WAIT_S)
        return real_save(snapshot, directory, *args, **kwargs)

    monkeypatch.setattr(adapter_core, "save_peft", save_peft)
    writing = threading.Thread(target=manager.persist, args=(slow,))
    writing.start()
    try:
        assert inside.wait(WAIT_S)
        done = threading.Event()

        def meanwhile():
            manager.attach("owner-b", "third")
            assert manager.get("owner-b", "quick") is other and manager.sessions()
            manager.persist(other)
            done.set()

        threading.Thread(target=meanwhile, daemon=True).start()
        assert done.wait(WAIT_S), "another owner's session waited for the slow write"
        assert manager.store.versions("owner-b", "session-quick") == [1]
    finally:
        release.set()
        writing.join(WAIT_S)
    assert manager.store.versions("owner-a", "session-slow") == [1]
