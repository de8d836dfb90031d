"""The server's feedback books: per session (on the session) and per model of a key."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from server.errors import ClientError
from server.feedback.book import FeedbackBook
from server.store import SESSION_PREFIX, owner_hash, write_json_atomic


class FeedbackRegistry:
    """Session books live on the sessions; this adds per-model books (per key) and lookups."""

    def __init__(self, settings, sessions):
        self.settings = settings
        self.sessions = sessions
        self.root = Path(settings.data_dir) / "feedback"
        self._models: dict[str, dict[str, FeedbackBook]] = {}  # owner hash -> model -> book
        self._lock = threading.Lock()

    def new_book(self, data=None) -> FeedbackBook:
        return FeedbackBook.from_json(data, self.settings.feedback_max_records)

    def _model_books(self, owner) -> dict[str, FeedbackBook]:
        oh = owner_hash(owner)
        with self._lock:
            books = self._models.get(oh)
            if books is None:
                try:
                    raw = json.loads((self.root / f"{oh}.json").read_text())
                except (OSError, ValueError):
                    raw = {}
                books = self._models[oh] = {m: self.new_book(d) for m, d in raw.items()}
            return books

    def save_models(self, owner) -> None:
        books = self._model_books(owner)
        write_json_atomic(self.root / f"{owner_hash(owner)}.json", {m: b.to_json() for m, b in list(books.items())})

    def book_for(self, owner, model: str, adapter_id: str | None):
        """(book, session or None) that a completion on ``model`` belongs to."""
        if adapter_id and adapter_id.startswith(SESSION_PREFIX):
            session = self.sessions.get(owner, adapter_id[len(SESSION_PREFIX):])
            if session is not None:
                return session.feedback, session
        books = self._model_books(owner)
        with self._lock:
            return books.setdefault(model, self.new_book()), None

    def find(self, owner, cid: str):
        for session in self.sessions.sessions(owner):
            if session.feedback.get(cid) is not None:
                return session.feedback, session
        for book in list(self._model_books(owner).values()):
            if book.get(cid) is not None:
                return book, None
        raise ClientError("unknown_completion", f"no recorded completion {cid!r} for this key")

    def apply(self, owner, cid: str, event, accepted_text=None, session=None) -> dict:
        """Apply one event (to ``session``'s book only, when given) and persist it."""
        book, owner_session = (session.feedback, session) if session is not None else self.find(owner, cid)
        rec = book.apply(cid, event, accepted_text, check_after_s=self.settings.feedback_check_s)
        if owner_session is not None:
            self.sessions.write_meta(owner_session)
        else:
            self.save_models(owner)
        return {"object": "completion.feedback", "completion_id": cid, "event": event,
                "adapter_version": rec.version, "model": rec.model,
                "session_id": owner_session.id if owner_session is not None else None}

    def model_stats(self, owner) -> dict:
        return {m: {k: v for k, v in b.stats().items()} for m, b in sorted(self._model_books(owner).items())}

    def flush(self) -> None:
        with self._lock:
            owners = list(self._models)
        for oh in owners:
            write_json_atomic(self.root / f"{oh}.json", {m: b.to_json() for m, b in list(self._models[oh].items())})

    def metric_rows(self):
        """(scope, name, stats) for every resident session and loaded model book."""
        for session in self.sessions.sessions():
            yield "session", session.id, session.feedback.stats()
        with self._lock:
            books = [(m, b) for owners in self._models.values() for m, b in owners.items()]
        for model, book in books:
            yield "model", model, book.stats()
