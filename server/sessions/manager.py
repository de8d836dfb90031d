"""Sessions: one live adapter per (API key, session id), its documents and its queue.

A session's published snapshot is immutable and swapped by reference under
``session.lock``; a completion reads the reference once when it starts, so it
finishes on that version however many versions the worker publishes meanwhile.
Only the adaptation worker touches ``session.adapter`` (under ``train_lock``).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from pathlib import Path

import torch

from server.errors import ClientError
from server.feedback import FeedbackBook
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

    def _find_by_token(self, owner: str | None, token: str) -> str | None:
        th = _token_hash(token)
        with self._lock:
            for (oh, sid), s in self._sessions.items():
                if oh == owner_hash(owner) and th in s.token_hashes:
                    return sid
        d = self.meta_root / owner_hash(owner)
        if d.is_dir():
            import json

            for p in d.glob("*.json"):
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

    def _join(self, owner: str | None, sid: str, new: Session | None = None) -> Session | None:
        """The resident session (``new`` is made resident first), counted as one more connection.

        Resident and connected in one step under the lock, so no eviction can take a new one in between.
        None if the session is not resident and no ``new`` one is given.
        """
        with self._lock:
            if new is not None:
                self._sessions[(owner_hash(owner), sid)] = new
                self._metrics_track(new)
            session = self._sessions.get((owner_hash(owner), sid))
            if session is not None:
                session.connections += 1
                session.last_used = time.time()
            return session

    @contextlib.contextmanager
    def _building(self, owner: str | None, sid: str | None):
        """Serialize attaches of one session id (a new random id needs no guard)."""
        if sid is None:
            yield
            return
        key = (owner_hash(owner), sid)
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
        session = Session(sid, owner, adapter, policy, adapter.snapshot(bump=False), repository=repository,
                          token_hashes=[_token_hash(token)], max_queue=self.settings.max_queue_per_session,
                          origin=origin, replay=ReplayBuffer(ReplayConfig.from_settings(self.settings)))
        session.feedback = FeedbackBook(self.settings.feedback_max_records)
        self._write_meta(session)
        log.info("session %s created (origin=%s, version=%d)", sid, origin, session.snapshot.version)
        return session

    def _restore(self, owner, sid) -> Session | None:
        import json

        try:
            meta = json.loads(self._meta_path(owner, sid).read_text())
        except (OSError, ValueError):
            meta = None
        name = SESSION_PREFIX + sid
        if meta is None and not self.store.exists(owner, name):
            return None
        policy_state = None
        if self._policy_path(owner, sid).is_file():
            try:
                policy_state = torch.load(self._policy_path(owner, sid), weights_only=False)
            except Exception:
                policy_state = None
        try:
            snap = self.store.load(owner, name)
            adapter, policy = self._new_adapter(snap, policy_state)
        except KeyError:
            adapter, policy = self._new_adapter()
            snap = None
        adapter.metadata["lineage"] = self.lineage(owner, sid)
        if snap is None:  # nothing stored yet: serve the fresh adapter
            snap = adapter.snapshot(bump=False)
        meta = meta or {}
        session = Session(sid, owner, adapter, policy, snap, repository=meta.get("repository"),
                          token_hashes=meta.get("token_hashes", []), max_queue=self.settings.max_queue_per_session,
                          origin=meta.get("origin"), replay=ReplayBuffer(ReplayConfig.from_settings(self.settings)))
        session.created = meta.get("created", session.created)
        session.steps = meta.get("steps", 0)
        session.dropped = meta.get("dropped", 0)
        session.last_loss = meta.get("last_loss")
        session.history.extend(meta.get("history", []))
        session.feedback = FeedbackBook.from_json(meta.get("feedback"), self.settings.feedback_max_records)
        log.info("session %s restored at version %d", sid, snap.version)
        return session

    def _write_meta(self, session: Session) -> None:
        with session.lock:
            data = {
                "id": session.id, "token_hashes": session.token_hashes, "repository": session.repository,
                "origin": session.origin, "created": session.created, "steps": session.steps,
                "dropped": session.dropped, "last_loss": session.last_loss,
                "version": session.snapshot.version, "history": list(session.history)[-100:],
            }
        data["feedback"] = session.feedback.to_json()
        write_json_atomic(self._meta_path(session.owner, session.id), data)

    def write_meta(self, session: Session) -> None:
        """Persist the session's metadata (feedback included) without touching its adapter."""
        self._write_meta(session)

    def persist(self, session: Session, *, force: bool = False) -> None:
        """Write the session's published snapshot (if newer than the stored one) and its metadata."""
        snap = session.current()
        stale = snap.version != session.persisted_version
        if force or stale or not self.store.exists(session.owner, session.adapter_name):
            self.store.save(session.owner, session.adapter_name, snap,
                            info={"kind": "session", "repository": session.repository, "session_id": session.id})
            session.persisted_version = snap.version
            try:
                state = session.policy.state_dict() if session.policy is not None else {}
                path = self._policy_path(session.owner, session.id)
                write_file_atomic(path, lambda f: torch.save(state, f), "wb")
            except Exception:
                log.warning("could not persist policy state of session %s", session.id)
        self._write_meta(session)

    def persist_all(self) -> None:
        for session in self.sessions():
            with session.train_lock:
                try:
                    self.persist(session)
                except Exception:
                    log.exception("persisting session %s failed", session.id)

    def _evict_over_limit(self, keep: Session) -> None:
        """Persist and drop the least recently used idle sessions beyond ``max_sessions``.

        Victims are chosen under the manager lock; writing them happens outside it.
        """
        with self._lock:
            excess = len(self._sessions) - self.settings.max_sessions
            idle = sorted((s for s in self._sessions.values() if s.connections == 0 and s is not keep),
                          key=lambda s: s.last_used)
        for victim in idle:
            if excess <= 0:
                return
            # Never evict mid-step, and never wait for a step: a training session is not idle.
            if not victim.train_lock.acquire(blocking=False):
                continue
            try:
                self.persist(victim)
                with self._lock:
                    if victim.connections:  # a tab joined while it was written: it stays
                        continue
                    self._sessions.pop((owner_hash(victim.owner), victim.id), None)
                    self._metrics_forget(victim)
                excess -= 1
            finally:
                victim.train_lock.release()
            log.info("session %s evicted (persisted at version %d)", victim.id, victim.snapshot.version)

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
        import json

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
        found = session is not None
        for p in (self._meta_path(owner, sid), self._policy_path(owner, sid)):
            if p.exists():
                p.unlink()
                found = True
        return self.store.delete(owner, SESSION_PREFIX + sid) or found

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
