"""How the vLLM engine tells adapters apart, without vLLM: every snapshot names its lineage in its metadata.

Session snapshots carry ``SessionManager.lineage``; snapshots loaded from the
store get ``adapter_lineage(owner, name)`` stamped by ``AdapterStore.load``. The
engine's version registry (``server/engines/vllm/versions.py``) groups versions
by it and needs no hook into the resolver.
"""

from __future__ import annotations

import gc
import threading

import torch

from adapter_core import AdapterSnapshot
from server.engines.vllm.versions import AdapterVersions, lineage_of, slug
from server.sessions.manager import SessionManager
from server.store import SESSION_PREFIX, AdapterStore, owner_hash
from server.store.names import adapter_lineage

MODULES = {"model.layers.0.self_attn.q_proj": (4, 16, 24), "model.layers.0.mlp.down_proj": (2, 32, 16)}


def snapshot(version: int, **metadata) -> AdapterSnapshot:
    gen = torch.Generator().manual_seed(version)
    A = {n: torch.randn(r, fan_in, generator=gen) for n, (r, fan_in, _) in MODULES.items()}
    B = {n: torch.randn(fan_out, r, generator=gen) for n, (r, _, fan_out) in MODULES.items()}
    return AdapterSnapshot.from_tensors(version, A, B, 1.0, metadata)


def test_session_lineage_is_the_adapter_lineage_of_its_adapter_name():
    assert SessionManager.lineage("key-a", "abc") == adapter_lineage("key-a", SESSION_PREFIX + "abc")
    assert adapter_lineage("key-a", "repo") == f"{owner_hash('key-a')}/repo"
    assert adapter_lineage("key-a", "repo") != adapter_lineage("key-b", "repo")


def test_store_load_stamps_where_the_snapshot_was_loaded_from(tmp_path):
    store = AdapterStore(tmp_path, "tiny-base", keep_versions=3)
    # Saved from a session, published under another name: loaded, it is that adapter's own lineage.
    snap = snapshot(3, note="kept", lineage=SessionManager.lineage("key-a", "s1"))
    store.save("key-a", "published", snap)
    store.save("key-a", SESSION_PREFIX + "s1", snap)
    loaded = store.load("key-a", "published")
    assert loaded.metadata["lineage"] == adapter_lineage("key-a", "published")
    assert loaded.metadata["note"] == "kept" and loaded.version == 3
    assert torch.equal(loaded.A[next(iter(MODULES))], snap.A[next(iter(MODULES))])
    # The session's stored snapshot keeps the session's lineage (the one its live snapshots carry).
    assert store.load("key-a", SESSION_PREFIX + "s1").metadata["lineage"] == SessionManager.lineage("key-a", "s1")
    assert store.load("key-a", "published", 3).metadata["lineage"] == loaded.metadata["lineage"]


def test_registry_groups_versions_by_metadata_lineage(tmp_path):
    queued, doomed = [], []
    registry = AdapterVersions(tmp_path, lambda name, int_id, path: (name, int_id, path), max_cpu_loras=8,
                               load_timeout_s=5, on_new=queued.append, on_doomed=doomed.extend)
    v1, v2 = snapshot(1, lineage="o/a"), snapshot(2, lineage="o/a")
    other, anonymous = snapshot(1, lineage="o/b"), snapshot(1)
    for snap in (v1, other, anonymous):
        assert registry.wait_loaded(snap, timeout=0) is False  # registers and queues, loads nothing
    r1, rb, ra = (registry.version_of(s) for s in (v1, other, anonymous))
    assert r1.lineage == lineage_of(v1) == "o/a" and rb.lineage == "o/b"
    assert ra.lineage == ("snapshot", ra.int_id) and lineage_of(anonymous) is None
    assert r1.slug == slug("o/a") != rb.slug
    # The loader's side: v1 loads; a request for v2 runs on v1 at once; once v2 loads, v1 is idle and goes.
    assert registry.claim(r1) == (True, v1)
    assert registry.loaded(r1) == []
    use = registry.acquire(v2, threading.Event())
    r2 = registry.version_of(v2)
    assert use is r1 and r1.inflight == 1 and r2.lineage == r1.lineage and r2.path != r1.path
    assert [v.version for v in queued] == [1, 1, 1, 2]
    assert registry.claim(r2)[0]
    assert registry.loaded(r2) == []  # v1 is in use
    registry.release(use)
    assert doomed == [r1] and r1.state == "removing"
    registry.removed(r1)
    assert r1.int_id not in {row["int_id"] for row in registry.rows()}
    # A head whose snapshot object is gone is handed over too.
    assert registry.claim(rb)[0] and registry.loaded(rb) == []
    del other
    gc.collect()
    registry.reap_dead()
    assert doomed[-1] is rb
