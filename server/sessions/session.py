"""One IDE session: its live adapter, mirrored documents and training queue."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import re
import threading
import time

from server.errors import ClientError
from server.feedback import FeedbackBook
from server.sessions.replay import ReplayBuffer
from server.store import SESSION_PREFIX

log = logging.getLogger("dynarank.sessions")
MAX_SEEN_PATHS = 1024  # documents whose first opening became replay rows, per session


SESSION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")




@dataclasses.dataclass
class Document:
    text: str
    version: int
    language: str | None = None



def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()



def snapshot_summary(snap) -> dict:
    ranks = snap.ranks if snap is not None else {}
    mean = sum(ranks.values()) / len(ranks) if ranks else 0.0
    return {"version": snap.version if snap is not None else 0, "ranks": ranks, "mean_rank": round(mean, 3)}



def _check_size(path: str, text: str, max_chars: int | None, what: str) -> None:
    if max_chars is not None and len(text) > max_chars:
        raise ClientError("document_too_large", f"{path} {what} {len(text)} characters; a session mirrors "
                                                f"documents of at most {max_chars}")


class Session:
    def __init__(self, sid: str, owner: str | None, adapter, policy, snapshot, *, repository=None,
                 token_hashes: list[str], max_queue: int, origin: str | None = None, replay=None,
                 origin_version: int | None = None):
        self.id = sid
        self.owner = owner
        self.adapter = adapter
        self.policy = policy
        self.snapshot = snapshot  # published, immutable; replaced by reference
        self.repository = repository
        self.origin = origin  # repository adapter this session started from
        self.origin_version = origin_version  # and its version, the start again until the session trains
        self.token_hashes = list(token_hashes)[-16:]  # one per tab that joined; any resumes
        self.created = time.time()
        self.last_used = time.time()
        self.docs: dict[str, Document] = {}
        self.coalescers: dict[str, object] = {}
        self.pending_edits: list[tuple] = []  # settled (before, after, path, language), not yet examples
        self.pending_documents: list[tuple] = []  # newly opened (path, text, language), not yet examples
        self.seen_paths: set[str] = set()
        self.replay = replay or ReplayBuffer()  # recent examples and open documents, trained again
        self.queue: collections.deque = collections.deque()
        self.max_queue = max_queue
        self.dropped = 0
        self.steps = 0
        self.last_loss: float | None = None
        self.history: collections.deque = collections.deque(maxlen=400)
        self.listeners: set = set()
        self.connections = 0
        self.persisted_version = snapshot.version
        self.docs_rev = 0  # bumped by every change of the document mirror
        self.docs_saved_rev = 0  # the docs_rev last written with the session
        self.feedback = FeedbackBook()  # replaced by the manager with its configured size / stored state
        # No disk I/O under ``lock`` or ``train_lock`` (one step); files are written under the save locks,
        # which only this session's own writers take, so no other session or owner waits on a write.
        self.lock = threading.RLock()  # snapshot ref, docs, queue, listeners
        self.train_lock = threading.Lock()  # the adapter and policy
        self.persist_lock = threading.Lock()  # one writer of the adapter, policy state and documents
        self.meta_lock = threading.Lock()  # one writer of the metadata file

    @property
    def adapter_name(self) -> str:
        return SESSION_PREFIX + self.id

    def current(self):
        with self.lock:
            return self.snapshot

    def dirty(self) -> bool:
        """Whether the published version or the document mirror changed since they were last written."""
        with self.lock:
            return self.snapshot.version != self.persisted_version or self.docs_rev != self.docs_saved_rev

    def replace_adapter(self, adapter, policy, snap) -> dict:
        """Swap in another trainable adapter and its first snapshot (a rollback); the caller holds
        ``train_lock``. Completions starting now use ``snap``; returns its summary."""
        self.adapter, self.policy = adapter, policy
        with self.lock:
            self.snapshot = snap
        return snapshot_summary(snap)

    def publish(self, snap, loss: float) -> dict:
        """Swap in a newly trained snapshot (completions starting now use it); returns its summary."""
        summary = snapshot_summary(snap)
        with self.lock:
            self.snapshot = snap
            self.steps += 1
            self.last_loss = loss
            self.history.append({"t": time.time(), "version": snap.version, "loss": loss,
                                 "ranks": list(summary["ranks"].values()), "mean_rank": summary["mean_rank"]})
        return summary

    def enqueue(self, examples) -> int:
        """Queue training examples; the oldest go first when the queue is full, and the session's clients
        are told (a ``dropped`` push), so an overloaded server is never silent about lost examples."""
        dropped = 0
        with self.lock:
            for ex in examples:
                if len(self.queue) >= self.max_queue:
                    self.queue.popleft()
                    dropped += 1
                self.queue.append(ex)
            self.dropped += dropped
            depth, total = len(self.queue), self.dropped
        if dropped:
            log.info("session %s: queue full, %d example(s) dropped (%d in all)", self.id, dropped, total)
            self.notify({"type": "dropped", "count": dropped, "dropped": total, "queue_depth": depth,
                         "max_queue": self.max_queue})
        return depth

    # -- document mirror (shared by every tab of the session) ------------------

    def open_doc(self, path: str, text: str, version: int, language: str | None, quiet_s: float, *,
                 max_chars: int | None = None, max_documents: int | None = None) -> None:
        """Mirror a document (a re-open replaces it). A text over ``max_chars`` characters, or a new path
        while ``max_documents`` are open, raises ClientError and changes nothing."""
        from code_signals import EditCoalescer

        _check_size(path, text, max_chars, "has")
        with self.lock:
            if max_documents is not None and path not in self.docs and len(self.docs) >= max_documents:
                raise ClientError("too_many_documents", f"{len(self.docs)} documents are open in this session, "
                                                        f"the most it mirrors: close one before opening {path}")
            self.docs[path] = Document(text, version, language)
            self.docs_rev += 1
            # Only when they can be trained on: building a document's examples parses the whole file.
            if self.replay.wants_documents and path not in self.seen_paths and len(self.seen_paths) < MAX_SEEN_PATHS:
                self.seen_paths.add(path)
                self.pending_documents.append((path, text, language))
            c = EditCoalescer(quiet_s=quiet_s)
            c.feed(text, time.monotonic())
            self.coalescers[path] = c

    def edit_doc(self, path: str, version: int, new_text: str, *, max_chars: int | None = None) -> None:
        """Replace the mirror's text (already validated); feed the burst coalescer. A text over
        ``max_chars`` characters raises ClientError and changes nothing (the document keeps its version)."""
        _check_size(path, new_text, max_chars, "would have")
        with self.lock:
            doc = self.docs[path]
            doc.text, doc.version = new_text, version
            self.docs_rev += 1
            emitted = self.coalescers[path].feed(new_text, time.monotonic())
            if emitted:
                self.pending_edits.append((*emitted, path, doc.language))

    def close_doc(self, path: str) -> None:
        with self.lock:
            doc = self.docs.pop(path)
            self.docs_rev += 1
            c = self.coalescers.pop(path, None)
            emitted = c.flush(force=True) if c is not None else None
            if emitted:
                self.pending_edits.append((*emitted, path, doc.language))

    def settle(self, now: float) -> list[tuple]:
        """Settled edits (before, after, path, language) since the last call, less those the privacy
        rules keep out of training: a client may send a .env or a file with a key (docs/privacy.md)."""
        with self.lock:
            for path, c in self.coalescers.items():
                emitted = c.flush(now)
                if emitted:
                    self.pending_edits.append((*emitted, path, self.docs[path].language))
            out, self.pending_edits = self.pending_edits, []
        return [edit for edit in out if self._may_train(f"an edit of {edit[2]}", edit[2], *edit[:2])]  # a few ms

    def settle_documents(self) -> list[tuple]:
        """Documents (path, text, language) opened for the first time since the last call, less those the
        privacy rules keep out of training."""
        with self.lock:
            out, self.pending_documents = self.pending_documents, []
        return [doc for doc in out if self._may_train(f"document {doc[0]}", doc[0], doc[1])]

    def storable_documents(self) -> tuple[int, list[dict]]:
        """(docs_rev, the open documents that may be written to disk). The privacy rules that keep a
        document out of training keep it off the disk too: a .env or a file with a key is never stored."""
        from code_signals.privacy import PrivacyFilter

        with self.lock:
            rev = self.docs_rev
            docs = [{"path": p, "text": d.text, "version": d.version, "language": d.language}
                    for p, d in self.docs.items()]
        privacy = PrivacyFilter()
        return rev, [d for d in docs if privacy.reason(d["path"], d["text"]) is None]

    def _may_train(self, what: str, path: str, *texts: str) -> bool:
        """Whether the privacy rules let ``path`` with these texts reach training; logs why not."""
        from code_signals.privacy import PrivacyFilter

        privacy = PrivacyFilter()
        why = next((w for w in (privacy.reason(path, t) for t in texts) if w is not None), None)
        if why is not None:
            log.info("session %s: not training on %s (%s)", self.id, what, why)
        return why is None

    def notify(self, message: dict, exclude=None) -> None:
        """Send ``message`` to every listener (tab) of the session but ``exclude``."""
        with self.lock:
            listeners = [fn for fn in self.listeners if fn is not exclude]
        for fn in listeners:
            try:
                fn(message)
            except Exception:  # a dead connection must not stop training
                log.exception("session listener failed")

    def status(self) -> dict:
        with self.lock:
            return {"type": "status", "queue_depth": len(self.queue), "dropped": self.dropped,
                    "version": self.snapshot.version}

    def describe(self) -> dict:
        with self.lock:
            snap = self.snapshot
            return {
                "id": self.id, "object": "session", "adapter": self.adapter_name,
                "repository": self.repository, "origin": self.origin,
                "created": self.created, "last_used": self.last_used,
                "connections": self.connections, "documents": sorted(self.docs),
                "queue_depth": len(self.queue), "dropped": self.dropped, "steps": self.steps,
                "last_loss": self.last_loss, **snapshot_summary(snap),
            }
