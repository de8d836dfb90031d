"""Sessions: one live adapter per (API key, session id), its documents and its queue.

A session's published snapshot is immutable and swapped by reference under
``session.lock``; a completion reads the reference once when it starts, so it
finishes on that version however many versions the worker publishes meanwhile.
Only the adaptation worker touches ``session.adapter`` (under ``train_lock``; a rollback swaps it there).

Locks: ``_lock`` guards only the resident table (dict operations); each session id has a build lock
while it is read from disk; a session's files are written under its own ``persist_lock``. No disk I/O
or model work ever happens under ``_lock``, so one session's slow restore or save never delays another.
On disk, a session that never trained has only its metadata (its resume tokens) and its open documents;
its adapter is written once it has trained (docs/protocol.md, "Persistence").
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import secrets
import threading
import time
from pathlib import Path

import torch

from adapter_core.faults import fault_point
from server.errors import ClientError
from server.feedback import FeedbackBook
from server.sessions import retention
from server.sessions.persister import SessionPersister
from server.sessions.replay import ReplayBuffer, ReplayConfig
from server.sessions.session import SESSION_ID_RE, Session, _token_hash
from server.store import (
    SESSION_PREFIX,
    AdapterStore,
    adapter_lineage,
    check_name,
    owner_hash,
    write_file_atomic,
    write_json_atomic,
)

log = logging.getLogger("dynarank.sessions")



class SessionManager:
    """Creates, resumes, evicts and persists sessions; resolves `model` names to snapshots."""

    def __init__(self, settings, model, tokenizer, store: AdapterStore, metrics=None):
        self.settings = settings
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.metrics = metrics
        self.base_name = settings.served_name
        self.meta_root = Path(settings.data_dir) / "sessions"
        self._sessions: dict[tuple[str, str], Session] = {}
        self._lock = threading.RLock()
        self._repo_cache: dict[tuple, object] = {}  # (owner hash, name, version) -> snapshot
        self._build_locks: dict[tuple[str, str], tuple[threading.Lock, int]] = {}  # per session id: lock, users
        self._rr = 0
        # Writes what changed within persist_interval_s and applies the retention policy; the app's
        # lifespan starts and stops it (start_background / stop_background).
        self.persister = SessionPersister(self, settings.persist_interval_s)
        # Told each version a session starts serving (a training step's or a rollback's); an engine that loads
        # adapters ahead of requests (vLLM's prefetch) sets it in Engine.attach.
        self.on_publish = None

    def published(self, snap) -> None:
        """A session serves ``snap`` from now on: tell ``on_publish``. Never fails the step that published it."""
        if self.on_publish is None:
            return
        try:
            self.on_publish(snap)
        except Exception:
            log.exception("announcing adapter version %s failed", getattr(snap, "version", "?"))

    def start_background(self) -> None:
        self.persister.start()

    def stop_background(self, timeout: float = 60.0) -> None:
        self.persister.stop(timeout)

    # -- adapters ---------------------------------------------------------------

    def _new_adapter(self, snapshot=None, policy_state=None):
        """A trainable adapter and its policy for a session: fresh, or resumed from ``snapshot``."""
        from adapter_core import new_session_adapter
        from server.sessions.adapter_config import session_adapter_config

        return new_session_adapter(self.model, session_adapter_config(self.settings),
                                   snapshot=snapshot, policy_state=policy_state)

    @staticmethod
    def lineage(owner: str | None, sid: str) -> str:
        """What every published snapshot of a session carries as ``metadata["lineage"]``.

        The session adapter's ``adapter_lineage``, so the snapshot stored under that name has the same one.
        Engines that keep adapter versions apart (vLLM) group versions by it.
        """
        return adapter_lineage(owner, SESSION_PREFIX + sid)

    # -- session lifecycle -------------------------------------------------------

    def _meta_path(self, owner: str | None, sid: str) -> Path:
        return self.meta_root / owner_hash(owner) / f"{sid}.json"

    def _policy_path(self, owner: str | None, sid: str) -> Path:
        return self.meta_root / owner_hash(owner) / f"{sid}.policy.pt"

    def _documents_path(self, owner: str | None, sid: str) -> Path:
        return self.meta_root / owner_hash(owner) / f"{sid}.documents.json"

    def _find_by_token(self, owner: str | None, token: str) -> str | None:
        th = _token_hash(token)
        with self._lock:
            for (oh, sid), s in self._sessions.items():
                if oh == owner_hash(owner) and th in s.token_hashes:
                    return sid
        d = self.meta_root / owner_hash(owner)
        if d.is_dir():
            for p in d.glob("*.json"):
                if not SESSION_ID_RE.match(p.stem):  # <id>.documents.json
                    continue
                try:
                    if th in json.loads(p.read_text()).get("token_hashes", []):
                        return p.stem
                except (OSError, ValueError):
                    continue
        return None

    def attach(self, owner: str | None, session_id: str | None = None, resume_token: str | None = None,
               repository: dict | None = None) -> tuple[Session, str]:
        """Join, resume or create a session. Returns (session, resume token for this connection)."""
        if session_id is not None and not SESSION_ID_RE.match(session_id):
            raise ClientError("invalid_session_id", "session_id must match [A-Za-z0-9][A-Za-z0-9_-]{0,63}")
        if resume_token is not None:
            found = self._find_by_token(owner, resume_token)
            if found is None or (session_id is not None and found != session_id):
                raise ClientError("invalid_resume_token", "resume_token does not name a session of this key")
            session_id = found
        token = None
        with self._building(owner, session_id):
            session = self._join(owner, session_id) if session_id else None
            if session is None:
                self._make_room()
                # Reading and building the adapter happen outside the manager lock, so other
                # sessions' lookups go on meanwhile; the build lock keeps this id built once.
                session = self._restore(owner, session_id) if session_id else None
                if session is None:
                    session_id = session_id or secrets.token_hex(8)
                    token = secrets.token_urlsafe(24)
                    session = self._create(owner, session_id, token, repository)
                session = self._join(owner, session.id, new=session)
        self._evict_over_limit(keep=session)
        if token is None:
            # Joined or resumed: this tab gets its own token; the others' stay valid.
            token = resume_token or secrets.token_urlsafe(24)
            with session.lock:
                if _token_hash(token) not in session.token_hashes:
                    session.token_hashes = (session.token_hashes + [_token_hash(token)])[-16:]
            self._write_meta(session)
        return session, token

    def _join(self, owner: str | None, sid: str, new: Session | None = None, connect: bool = True) -> Session | None:
        """The resident session (``new`` is made resident first), counted as one more connection.

        Resident and connected in one step under the lock, so no eviction can take a new one in between.
        None if the session is not resident and no ``new`` one is given.
        """
        with self._lock:
            if new is not None:
                self._check_room()  # under the same lock as the insert: no two attaches overshoot together
                self._sessions[(owner_hash(owner), sid)] = new
                self._metrics_track(new)
            session = self._sessions.get((owner_hash(owner), sid))
            if session is not None:
                if connect:
                    session.connections += 1
                session.last_used = time.time()
            return session

    def _resident(self, owner: str | None, sid: str) -> Session | None:
        """The session, read back from disk if it is stored but not in memory (no connection is counted);
        None if it is neither."""
        with self._building(owner, sid):
            session = self._join(owner, sid, connect=False)
            if session is None:
                self._make_room()
                restored = self._restore(owner, sid)
                if restored is None:
                    return None
                session = self._join(owner, sid, new=restored, connect=False)
        self._evict_over_limit(keep=session)
        return session

    @contextlib.contextmanager
    def _building(self, owner: str | None, sid: str | None):
        """Serialize attaches of one session id (a new random id needs no guard)."""
        if sid is None:
            yield
            return
        with self._building_key((owner_hash(owner), sid)):
            yield

    @contextlib.contextmanager
    def _building_key(self, key: tuple[str, str]):
        """The build lock of (owner hash, session id): held while that session is read, built or deleted."""
        with self._lock:
            lock, users = self._build_locks.get(key, (threading.Lock(), 0))
            self._build_locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, users = self._build_locks[key]
                if users == 1:
                    del self._build_locks[key]
                else:
                    self._build_locks[key] = (lock, users - 1)

    def detach(self, session: Session) -> None:
        with self._lock:
            session.connections = max(0, session.connections - 1)
            session.last_used = time.time()

    def _create(self, owner, sid, token, repository) -> Session:
        origin = self.store.find_for_repository(owner, repository)
        adapter = policy = None
        if origin is not None:
            try:
                snap = self.store.load(owner, origin)
                adapter, policy = self._new_adapter(snap)
            except (KeyError, OSError, ValueError):
                log.warning("repository adapter %s unreadable; starting fresh", origin)
                origin = None
        if adapter is None:
            adapter, policy = self._new_adapter()
        adapter.metadata["lineage"] = self.lineage(owner, sid)
        snap = adapter.snapshot(bump=False)
        session = Session(sid, owner, adapter, policy, snap, repository=repository,
                          token_hashes=[_token_hash(token)], max_queue=self.settings.max_queue_per_session,
                          origin=origin, replay=ReplayBuffer(ReplayConfig.from_settings(self.settings)),
                          origin_version=snap.version if origin is not None else None)
        session.feedback = FeedbackBook(self.settings.feedback_max_records)
        self._write_meta(session)
        log.info("session %s created (origin=%s, version=%d)", sid, origin, session.snapshot.version)
        return session

    def _restore(self, owner, sid) -> Session | None:
        try:
            meta = json.loads(self._meta_path(owner, sid).read_text())
        except (OSError, ValueError):
            meta = None
        name = SESSION_PREFIX + sid
        if meta is None and not self.store.exists(owner, name):
            return None
        meta = meta if isinstance(meta, dict) else {}
        snap = self._stored_adapter(owner, name)
        if snap is not None:
            policy_state = None
            if self._policy_path(owner, sid).is_file():
                try:
                    policy_state = torch.load(self._policy_path(owner, sid), map_location="cpu", weights_only=False)
                except Exception:
                    policy_state = None
            adapter, policy = self._new_adapter(snap, policy_state)
        else:  # never trained, so never written: start again where it started
            start = self._stored_adapter(owner, meta["origin"], meta.get("origin_version")) \
                if meta.get("origin") else None
            adapter, policy = self._new_adapter(start)
        adapter.metadata["lineage"] = self.lineage(owner, sid)
        if snap is None:
            snap = adapter.snapshot(bump=False)
        session = Session(sid, owner, adapter, policy, snap, repository=meta.get("repository"),
                          token_hashes=meta.get("token_hashes", []), max_queue=self.settings.max_queue_per_session,
                          origin=meta.get("origin"), replay=ReplayBuffer(ReplayConfig.from_settings(self.settings)),
                          origin_version=meta.get("origin_version"))
        session.created = meta.get("created", session.created)
        session.steps = meta.get("steps", 0)
        session.dropped = meta.get("dropped", 0)
        session.last_loss = meta.get("last_loss")
        session.history.extend(meta.get("history", []))
        session.feedback = FeedbackBook.from_json(meta.get("feedback"), self.settings.feedback_max_records)
        self._restore_documents(session)
        log.info("session %s restored at version %d with %d document(s)", sid, snap.version, len(session.docs))
        return session

    def _stored_adapter(self, owner, name: str, version: int | None = None):
        """The stored snapshot of ``version`` (else the latest), or None when there is none to read."""
        for v in ((version, None) if version is not None else (None,)):
            try:
                return self.store.load(owner, name, v)
            except KeyError:
                continue
            except (OSError, ValueError):
                log.warning("adapter %s unreadable; starting fresh", name)
                return None
        return None

    def _restore_documents(self, session: Session) -> None:
        """Mirror the documents stored with the session again, under today's limits (one that no longer
        fits is left out and logged), so a client resuming after a restart need not send them."""
        try:
            docs = json.loads(self._documents_path(session.owner, session.id).read_text())["documents"]
        except (OSError, ValueError, KeyError, TypeError):
            docs = []
        for doc in docs if isinstance(docs, list) else []:
            try:
                path, text, version = doc["path"], doc["text"], doc["version"]
                if not (isinstance(path, str) and isinstance(text, str) and type(version) is int):
                    raise TypeError("malformed stored document")
                session.open_doc(path, text, version, doc.get("language"), self.settings.edit_quiet_s,
                                 max_chars=self.settings.max_document_chars,
                                 max_documents=self.settings.max_open_documents)
            except (ClientError, KeyError, TypeError) as exc:
                log.warning("session %s: stored document not restored (%s)", session.id, exc)
        with session.lock:
            session.docs_saved_rev = session.docs_rev

    def _write_meta(self, session: Session) -> None:
        with session.meta_lock:  # one writer: the file always ends with the latest state
            with session.lock:
                data = {
                    "id": session.id, "token_hashes": session.token_hashes, "repository": session.repository,
                    "origin": session.origin, "origin_version": session.origin_version, "created": session.created,
                    "last_used": session.last_used, "steps": session.steps, "dropped": session.dropped,
                    "last_loss": session.last_loss, "version": session.persisted_version,
                    "history": list(session.history)[-100:],
                }
            data["feedback"] = session.feedback.to_json()
            write_json_atomic(self._meta_path(session.owner, session.id), data)

    def write_meta(self, session: Session) -> None:
        """Persist the session's metadata (feedback included) without touching its adapter."""
        self._write_meta(session)

    def persist(self, session: Session, *, force: bool = False, wait: bool = True) -> bool:
        """Write what changed: the published version once the session has trained (``force``: even if it
        never trained, for an export) with its policy state, the open documents, and the metadata.

        Only this session's ``persist_lock`` is held while writing; its ``train_lock`` only for the moment
        the version and policy state are taken. ``wait=False``: give up (False, nothing written) rather
        than wait for a training step or another write of this session in progress.
        """
        if not session.persist_lock.acquire(blocking=wait):
            return False
        try:
            snap = session.current()
            if snap.version != session.persisted_version or (
                    force and snap.version not in self.store.versions(session.owner, session.adapter_name)):
                taken = self._take_state(session, wait)
                if taken is None:
                    return False
                snap, policy_state = taken
                fault_point("session.before_save")
                self.store.save(session.owner, session.adapter_name, snap,
                                info={"kind": "session", "repository": session.repository, "session_id": session.id})
                session.persisted_version = snap.version
                try:
                    path = self._policy_path(session.owner, session.id)
                    write_file_atomic(path, lambda f: torch.save(policy_state, f), "wb")
                except Exception:
                    log.warning("could not persist policy state of session %s", session.id)
            self._write_documents(session)
            fault_point("session.before_meta")
            self._write_meta(session)
        finally:
            session.persist_lock.release()
        return True

    @staticmethod
    def _take_state(session: Session, wait: bool):
        """(published snapshot, copy of the policy state) taken together between two training steps."""
        if not session.train_lock.acquire(blocking=wait):
            return None
        try:
            policy = session.policy.state_dict() if session.policy is not None else {}
            return session.current(), copy.deepcopy(policy)
        finally:
            session.train_lock.release()

    def _write_documents(self, session: Session) -> None:
        """The open documents the privacy rules allow, if the mirror changed since the last write."""
        with session.lock:
            if session.docs_rev == session.docs_saved_rev:
                return
        rev, docs = session.storable_documents()
        path = self._documents_path(session.owner, session.id)
        if docs:
            write_json_atomic(path, {"documents": docs})
        else:
            path.unlink(missing_ok=True)
        with session.lock:
            session.docs_saved_rev = rev

    def persist_all(self) -> None:
        for session in self.sessions():
            try:
                self.persist(session)
            except Exception:
                log.exception("persisting session %s failed", session.id)

    def persist_changed(self) -> int:
        """Persist every resident session whose version or documents changed (the persister's timer)."""
        written = 0
        for session in self.sessions():
            if not session.dirty():
                continue
            try:
                self.persist(session)
                written += 1
            except Exception:
                log.exception("persisting session %s failed", session.id)
        return written

    def _make_room(self) -> None:
        """Before another session becomes resident: evict an idle one if the table is full, and refuse
        (``too_many_sessions``) when every resident session is connected, so memory stays bounded."""
        self._evict_over_limit(keep=None, room_for=1)
        with self._lock:
            self._check_room()

    def _check_room(self) -> None:
        if len(self._sessions) >= self.settings.max_sessions:
            raise ClientError("too_many_sessions", f"the server already holds {self.settings.max_sessions} "
                                                   "sessions, all connected (--max-sessions); try again later")

    def _evict_over_limit(self, keep: Session | None, room_for: int = 0) -> None:
        """Persist and drop the least recently used idle sessions beyond ``max_sessions`` (less
        ``room_for``, the sessions about to come in).

        Victims are chosen under the manager lock; writing them happens outside every lock but their own.
        """
        with self._lock:
            excess = len(self._sessions) + room_for - self.settings.max_sessions
            idle = sorted((s for s in self._sessions.values() if s.connections == 0 and s is not keep),
                          key=lambda s: s.last_used)
        for victim in idle:
            if excess <= 0:
                return
            try:  # never wait for a step: a training session is not idle
                if not self.persist(victim, wait=False):
                    continue
            except Exception:
                log.exception("persisting session %s failed; it stays in memory", victim.id)
                continue
            with self._lock:
                # A tab joined, a step runs, or something changed while it was written: it stays.
                if victim.connections or not victim.train_lock.acquire(blocking=False):
                    continue
                try:
                    if victim.dirty():
                        continue
                    self._sessions.pop((owner_hash(victim.owner), victim.id), None)
                    self._metrics_forget(victim)
                finally:
                    victim.train_lock.release()
            excess -= 1
            log.info("session %s evicted (persisted at version %d)", victim.id, victim.persisted_version)

    # -- stored sessions: retention ---------------------------------------------------

    def apply_retention(self, now: float | None = None) -> list[tuple[str, str]]:
        """Delete stored sessions unused for ``session_retention_days``, then the least recently used ones
        while stored sessions take more than ``max_stored_sessions_mb``; never a resident one.
        Returns the (owner hash, session id) deleted."""
        now = time.time() if now is None else now
        stored = retention.scan(self.meta_root, self.store)
        with self._lock:
            resident = set(self._sessions)
        victims = retention.choose(stored, resident, now, max_age_s=self.settings.session_retention_days * 86400,
                                   max_bytes=int(self.settings.max_stored_sessions_mb * retention.MB))
        deleted = []
        for victim in victims:
            key = (victim.owner_hash, victim.sid)
            with self._building_key(key):  # no attach reads it meanwhile
                with self._lock:
                    if key in self._sessions:  # attached since the scan
                        continue
                self._delete_stored(*key)
            deleted.append(key)
            log.info("stored session %s deleted (%s; %d bytes)", victim.sid, victim.why, victim.size)
        return deleted

    def _delete_stored(self, oh: str, sid: str) -> bool:
        """Remove a session's files (metadata, policy state, documents, adapter); True if any existed."""
        found = False
        for suffix in (".json", ".policy.pt", ".documents.json"):
            p = self.meta_root / oh / f"{sid}{suffix}"
            if p.exists():
                p.unlink(missing_ok=True)
                found = True
        return self.store.delete_hashed(oh, SESSION_PREFIX + sid) or found

    # -- rollback ------------------------------------------------------------------------

    def rollback(self, owner: str | None, sid: str, version: int, exclude=None) -> tuple[Session, dict]:
        """Serve stored version ``version`` of the session's adapter again, from now on, as its next
        version (a version number always names one set of weights; training goes on from there).

        The session is read from disk if it is not resident. Every tab but ``exclude`` (a listener) is
        told with a ``rolled_back`` push. Returns (session, that message). ClientError
        ``session_not_found`` / ``version_not_found``.
        """
        if not SESSION_ID_RE.match(sid) or (session := self._resident(owner, sid)) is None:
            raise ClientError("session_not_found", f"no session {sid}", param="session_id")
        name = session.adapter_name
        stored = self.store.versions(owner, name)
        if version not in stored:
            have = ", ".join(map(str, stored)) or "none"
            raise ClientError("version_not_found", f"session {sid} has no stored version {version} (stored: {have})",
                              param="version")
        snap = self.store.load(owner, name, version)  # read and built outside every lock
        adapter, policy = self._new_adapter(snap)  # the policy starts fresh: only the latest state is kept
        adapter.metadata["lineage"] = self.lineage(owner, sid)
        with session.train_lock:
            adapter.version = max(session.current().version, stored[-1])
            new = adapter.snapshot(rolled_back_to=version)
            summary = session.replace_adapter(adapter, policy, new)
        self.published(new)
        log.info("session %s rolled back to version %d, served as version %d", sid, version, new.version)
        message = {"type": "rolled_back", "version": new.version, "restored_version": version,
                   "ranks": summary["ranks"], "mean_rank": summary["mean_rank"]}
        self.persist(session)  # on disk before the answer: it is what the user asked to keep
        session.notify(message, exclude=exclude)
        session.notify(session.status(), exclude=exclude)
        return session, message

    # Per-session metric figures follow residency. Both are called under the manager lock, next to the
    # change of ``_sessions``, so a session that leaves and one of the same id that arrives stay in order.

    def _metrics_track(self, session: Session) -> None:
        if self.metrics is not None:
            self.metrics.track_session(session)

    def _metrics_forget(self, session: Session) -> None:
        if self.metrics is not None:
            self.metrics.forget_session(session)

    # -- lookups -----------------------------------------------------------------

    def sessions(self, owner: str | None = ..., ) -> list[Session]:
        with self._lock:
            items = list(self._sessions.items())
        if owner is ...:
            return [s for _, s in items]
        return [s for (oh, _), s in items if oh == owner_hash(owner)]

    def get(self, owner: str | None, sid: str) -> Session | None:
        with self._lock:
            return self._sessions.get((owner_hash(owner), sid))

    def describe_stored(self, owner: str | None, sid: str) -> dict | None:
        try:
            meta = json.loads(self._meta_path(owner, sid).read_text())
        except (OSError, ValueError):
            return None
        meta.pop("token_hashes", None)
        meta.pop("feedback", None)  # served by /v1/sessions/{id}/stats
        return {"object": "session", "adapter": SESSION_PREFIX + sid, "connections": 0, "resident": False, **meta}

    def delete_session(self, owner: str | None, sid: str) -> bool:
        with self._lock:
            session = self._sessions.pop((owner_hash(owner), sid), None)
            if session is not None:
                self._metrics_forget(session)
        return self._delete_stored(owner_hash(owner), sid) or session is not None

    # -- AdapterResolver ---------------------------------------------------------

    def resolve(self, model_name: str, api_key: str | None):
        if model_name == self.base_name:
            return None, None
        base, sep, name = model_name.partition(":")
        if not sep or base != self.base_name or not name:
            raise KeyError(model_name)
        if name.startswith(SESSION_PREFIX):
            session = self.get(api_key, name[len(SESSION_PREFIX):])
            if session is not None:
                return session.current(), name
        try:
            check_name(name)
            versions = self.store.versions(api_key, name)
        except ValueError:
            raise KeyError(model_name) from None
        if not versions:
            raise KeyError(model_name)
        key = (owner_hash(api_key), name, versions[-1])
        snap = self._repo_cache.get(key)
        if snap is None:
            snap = self.store.load(api_key, name, versions[-1])
            if len(self._repo_cache) > 32:
                self._repo_cache.clear()
            self._repo_cache[key] = snap
        return snap, name

    def list_for(self, api_key: str | None) -> list[dict]:
        names = {row["name"] for row in self.store.list(api_key)}
        names |= {s.adapter_name for s in self.sessions(api_key)}
        return [{"id": f"{self.base_name}:{n}", "object": "model", "owned_by": "user", "parent": self.base_name}
                for n in sorted(names)]

    # -- work for the adaptation worker -----------------------------------------

    def take(self):
        """Round robin: the next (session, example) to train on, or None."""
        with self._lock:
            sessions = list(self._sessions.values())
        if not sessions:
            return None
        n = len(sessions)
        for i in range(n):
            session = sessions[(self._rr + i) % n]
            with session.lock:
                if session.queue:
                    self._rr = (self._rr + i + 1) % n
                    return session, session.queue.popleft()
        return None
