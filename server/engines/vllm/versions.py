"""The vLLM engine's adapter-version registry: which versions exist, which are loaded, who uses them.

Every distinct ``AdapterSnapshot`` the engine is asked for becomes one
``AdapterVersion`` (one vLLM ``lora_int_id``). Versions of one adapter form a
*lineage*, named by the snapshot's ``metadata["lineage"]`` (session snapshots
and adapters loaded from the store carry it; ``server.store.adapter_lineage``);
a snapshot without one is a lineage of its own.

A request runs on the newest *loaded* version of its lineage that is not newer
than the one it asked for (``acquire``/``release``, refcounted); it waits only
while its lineage has nothing loaded yet. A version that is no longer the
newest loaded one of its lineage is handed to ``on_doomed`` for removal as soon
as it is idle; lineage heads are bounded by ``max_cpu_loras`` (least recently
used idle heads go first), and the head of a lineage whose snapshot object was
garbage-collected goes too.

``prefetch`` registers a version as soon as it is published, so it loads before
a request asks for it; ``stats["stale"]`` counts the requests that ran on an
older version because theirs was not loaded yet.

The registry does no I/O on vLLM itself: the engine's loader writes and
registers what ``on_new`` queues (``claim`` -> ``loaded``/``failed``) and
unregisters what ``on_doomed`` hands it (-> ``removed``). All state is guarded
by one lock that is never held across an ``await``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import queue
import re
import shutil
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Hashable

_GONE = ("removed", "failed", "skipped", "removing")


@dataclasses.dataclass(eq=False)
class AdapterVersion:
    """One adapter version known to the engine (one ``lora_int_id``)."""

    int_id: int
    lineage: Hashable
    slug: str
    version: int
    seq: int  # registration order (lineage order)
    path: Path
    ref: Any  # weakref to the snapshot
    snap: Any = None  # strong ref until written to disk
    lora: Any = None  # LoRARequest
    state: str = "pending"  # pending -> loaded -> removing -> removed | failed | skipped
    error: BaseException | None = None
    inflight: int = 0
    waiters: int = 0
    dead: bool = False  # the snapshot object is gone: nobody can ask for it again
    last_used: float = 0.0
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


def lineage_of(snapshot) -> str | None:
    """The lineage a snapshot names in its metadata, or None."""
    meta = getattr(snapshot, "metadata", None) or {}
    for key in ("lineage", "adapter_id", "session_id"):
        if meta.get(key):
            return str(meta[key])
    return None


def lora_name(lineage_slug: str, version: int, int_id: int) -> str:
    """The name a version is registered under in vLLM: ``<slug>@v<version>#<int id>`` (new per version)."""
    return f"{lineage_slug}@v{version}#{int_id}"


def slug_of_lora_name(name: str) -> str | None:
    """The lineage slug of a name ``lora_name`` made, or None for any other name (e.g. an operator's adapter)."""
    head, at, tail = str(name).rpartition("@v")
    version, hash_, int_id = tail.partition("#")
    return head if at and hash_ and version.isdigit() and int_id.isdigit() else None


def slug(lineage: Hashable) -> str:
    """A directory name for a lineage: ``<owner[:8]>-<name>-<hash>`` for ``owner/name``."""
    if isinstance(lineage, tuple) and lineage and lineage[0] == "snapshot":
        return f"snapshot-{lineage[1]}"
    owner, _, name = str(lineage).rpartition("/")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64]
    digest = hashlib.sha256(str(lineage).encode()).hexdigest()[:8]
    return f"{owner[:8]}-{name}-{digest}" if owner else f"{name}-{digest}"


class AdapterVersions:
    """Thread-safe registry of the adapter versions one engine serves (see the module docstring)."""

    def __init__(self, root: Path, make_lora: Callable[[str, int, str], Any], *, max_cpu_loras: int,
                 load_timeout_s: float, on_new: Callable[[AdapterVersion], None],
                 on_doomed: Callable[[list[AdapterVersion]], None]):
        self.root = Path(root)
        self.make_lora = make_lora  # (lora_name, lora_int_id, lora_path) -> LoRARequest
        self.max_cpu_loras = max_cpu_loras
        self.load_timeout_s = load_timeout_s
        self.on_new = on_new  # called under the lock: must not block
        self.on_doomed = on_doomed
        self.lock = threading.Lock()
        self._by_snap: "weakref.WeakKeyDictionary[Any, AdapterVersion]" = weakref.WeakKeyDictionary()
        self._lineages: dict[Hashable, list[AdapterVersion]] = {}
        self._versions: dict[int, AdapterVersion] = {}  # int_id -> version, until removed
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._dead: queue.SimpleQueue = queue.SimpleQueue()  # int ids whose snapshot died (weakref callbacks)
        # stale: requests that ran on an older version of their lineage because theirs was not loaded yet
        self.stats = {"loaded": 0, "removed": 0, "skipped": 0, "failed": 0, "stale": 0}

    # -- requests -------------------------------------------------------------------

    def acquire(self, snapshot, cancel: threading.Event | None = None) -> AdapterVersion | None:
        """The loaded version a request for ``snapshot`` runs on (refcounted; pair with ``release``).

        Never waits when an equal-or-older version of the same lineage is loaded;
        otherwise waits for this snapshot's own load. None if cancelled meanwhile.
        """
        self.reap_dead()
        with self.lock:
            v = self._register(snapshot)
            use = self._best_loaded(v)
            if use is None:
                v.waiters += 1
            else:
                use.inflight += 1
                use.last_used = time.monotonic()
                if use is not v:
                    self.stats["stale"] += 1
                return use
        deadline = time.monotonic() + self.load_timeout_s
        try:
            while not v.done.wait(0.05):
                if cancel is not None and cancel.is_set():
                    return None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"adapter version {v.version} did not load in {self.load_timeout_s:.0f}s")
        finally:
            with self.lock:
                v.waiters -= 1
        with self.lock:
            if v.state != "loaded":
                raise RuntimeError(f"adapter version {v.version} could not be loaded into vLLM: {v.error}")
            v.inflight += 1
            v.last_used = time.monotonic()
            return v

    def prefetch(self, snapshot) -> AdapterVersion:
        """Register ``snapshot`` now (if new) so it is written and loaded before a request asks for it."""
        with self.lock:
            return self._register(snapshot)

    def release(self, v: AdapterVersion) -> None:
        with self.lock:
            v.inflight -= 1
            doomed = self._collect(v.lineage)
        self.on_doomed(doomed)

    def reap_dead(self) -> None:
        """Hand over the versions whose snapshot object was garbage-collected and that nobody uses."""
        lineages = set()
        with self.lock:
            while True:
                try:
                    int_id = self._dead.get_nowait()
                except queue.Empty:
                    break
                v = self._versions.get(int_id)
                if v is not None:
                    v.dead = True
                    lineages.add(v.lineage)
            doomed = [o for lineage in lineages for o in self._collect(lineage)]
        self.on_doomed(doomed)

    # -- the engine's loader ------------------------------------------------------------

    def claim(self, v: AdapterVersion) -> tuple[bool, Any]:
        """(loader) ``(False, None)`` if ``v`` is skipped, else ``(True, snapshot)`` to write and register.

        Skipped: a newer version of the lineage is already queued and nobody waits for this one (a burst).
        The snapshot may be None if it was released before it was written.
        """
        with self.lock:
            newer = any(o.seq > v.seq and o.state == "pending" for o in self._lineages.get(v.lineage, ()))
            if newer and v.waiters == 0:
                v.state, v.snap = "skipped", None
                self._forget(v)
                self.stats["skipped"] += 1
                v.done.set()
                return False, None
            snap, v.snap = v.snap, None
            return True, snap

    def loaded(self, v: AdapterVersion) -> list[AdapterVersion]:
        """(loader) ``v`` is registered with vLLM; returns the versions it supersedes, to remove now."""
        with self.lock:
            v.state = "loaded"
            v.last_used = time.monotonic()
            self.stats["loaded"] += 1
            doomed = self._collect(v.lineage)
        v.done.set()
        return doomed

    def failed(self, v: AdapterVersion, exc: BaseException) -> None:
        """(loader) ``v`` could not be written or registered: requests waiting for it get the error."""
        with self.lock:
            v.state, v.error = "failed", exc
            self._forget(v)
            self.stats["failed"] += 1
        shutil.rmtree(v.path, ignore_errors=True)
        v.done.set()

    def removed(self, v: AdapterVersion) -> None:
        """``v`` is unregistered from vLLM: delete its directory and forget it."""
        shutil.rmtree(v.path, ignore_errors=True)
        with self.lock:
            v.state = "removed"
            self._forget(v)
            self.stats["removed"] += 1

    # -- introspection (tests, metrics, dashboard) ----------------------------------

    def version_of(self, snapshot) -> AdapterVersion | None:
        """The version record of ``snapshot``, if the engine has seen it."""
        with self.lock:
            return self._by_snap.get(snapshot)

    def rows(self) -> list[dict]:
        with self.lock:
            return [{"int_id": v.int_id, "lineage": v.slug, "version": v.version, "state": v.state,
                     "inflight": v.inflight, "path": str(v.path)} for v in self._versions.values()]

    def wait_loaded(self, snapshot, timeout: float = 120.0) -> bool:
        """Register ``snapshot`` (if new) and wait until that exact version is loaded (tests, warm-up)."""
        with self.lock:
            v = self._register(snapshot)
            v.waiters += 1
        try:
            ok = v.done.wait(timeout)
        finally:
            with self.lock:
                v.waiters -= 1
        return ok and v.state == "loaded"

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no version is pending or being removed (tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.reap_dead()
            with self.lock:
                busy = any(v.state in ("pending", "removing") for v in self._versions.values())
            if not busy:
                return True
            time.sleep(0.05)
        return False

    # -- bookkeeping (under the lock) -------------------------------------------------

    def _register(self, snapshot) -> AdapterVersion:
        """The version record of ``snapshot``, creating and queueing it on first sight."""
        v = self._by_snap.get(snapshot)
        if v is not None and v.state not in _GONE:
            return v
        lineage = v.lineage if v is not None else lineage_of(snapshot)
        int_id = next(self._ids)
        if lineage is None:
            lineage = ("snapshot", int_id)
        name = slug(lineage)
        version = int(getattr(snapshot, "version", 0))
        path = self.root / name / f"v{version}"
        if path.exists() or any(o.path == path for o in self._versions.values()):
            path = self.root / name / f"v{version}.{int_id}"
        nv = AdapterVersion(int_id=int_id, lineage=lineage, slug=name, version=version,
                            seq=v.seq if v is not None else next(self._seq), path=path,
                            ref=weakref.ref(snapshot, lambda _r, i=int_id: self._dead.put(i)), snap=snapshot)
        nv.lora = self.make_lora(lora_name(name, version, int_id), int_id, str(path))
        self._by_snap[snapshot] = nv
        self._versions[int_id] = nv
        lineage_list = self._lineages.setdefault(lineage, [])
        lineage_list.append(nv)
        lineage_list.sort(key=lambda x: x.seq)
        self.on_new(nv)
        return nv

    def _best_loaded(self, v: AdapterVersion) -> AdapterVersion | None:
        """Newest loaded version of v's lineage not newer than v."""
        best = None
        for o in self._lineages.get(v.lineage, ()):
            if o.seq <= v.seq and o.state == "loaded":
                best = o
        return best

    def _collect(self, lineage) -> list[AdapterVersion]:
        """Versions to remove now: superseded (or dead) and idle; marks them ``removing``."""
        versions = self._lineages.get(lineage, [])
        loaded = [o for o in versions if o.state == "loaded"]
        head = loaded[-1] if loaded else None
        doomed = [o for o in loaded if o.inflight == 0 and (o is not head or o.dead)]
        # Over capacity: drop idle heads of other lineages, least recently used first.
        loaded = ([o for o in lineage if o.state == "loaded"] for lineage in self._lineages.values())
        heads = [vs[-1] for vs in loaded if vs]
        excess = len(heads) - (self.max_cpu_loras - 1)
        if excess > 0:
            for o in sorted((h for h in heads if h.inflight == 0 and h not in doomed), key=lambda h: h.last_used):
                if excess <= 0:
                    break
                doomed.append(o)
                excess -= 1
        for o in doomed:
            o.state = "removing"
        return doomed

    def _forget(self, v: AdapterVersion) -> None:
        """Drop a version from the registry."""
        self._versions.pop(v.int_id, None)
        versions = self._lineages.get(v.lineage)
        if versions is not None and v in versions:
            versions.remove(v)
            if not versions:
                del self._lineages[v.lineage]
