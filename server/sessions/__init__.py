"""IDE sessions: one live adapter per (API key, session id), its documents and its training queue."""

from server.sessions.manager import SessionManager
from server.sessions.session import SESSION_ID_RE, Document, Session, snapshot_summary
from server.store import SESSION_PREFIX

__all__ = ["SESSION_ID_RE", "SESSION_PREFIX", "Document", "Session", "SessionManager",
           "snapshot_summary"]
