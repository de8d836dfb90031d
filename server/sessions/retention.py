"""Which stored sessions to delete: too old, or the least recently used beyond a size cap.

A stored session is its files under ``data_dir/sessions/<owner-hash>/<id>.*`` (metadata, policy state,
open documents) and its adapter ``data_dir/adapters/<owner-hash>/session-<id>/``. Its last use is the
newest modification time among them: every attach, training write and document save touches one, and a
session in memory (resident) is never a candidate, however old its files.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from server.sessions.session import SESSION_ID_RE
from server.store import SESSION_PREFIX

MB = 1_000_000  # max_stored_sessions_mb counts decimal megabytes


@dataclasses.dataclass
class StoredSession:
    owner_hash: str
    sid: str
    last_used: float = 0.0
    size: int = 0  # bytes
    why: str = ""  # set when chosen for deletion

    def add(self, path: Path) -> None:
        try:
            st = path.stat()
        except OSError:  # removed meanwhile
            return
        self.size += st.st_size
        self.last_used = max(self.last_used, st.st_mtime)


def scan(meta_root: Path, store) -> list[StoredSession]:
    """Every stored session with its size and last use (a walk of the two directories; no file is read)."""
    found: dict[tuple[str, str], StoredSession] = {}

    def entry(oh: str, sid: str) -> StoredSession:
        return found.setdefault((oh, sid), StoredSession(oh, sid))

    if meta_root.is_dir():
        for owner_dir in meta_root.iterdir():
            if owner_dir.name.startswith(".") or not owner_dir.is_dir():
                continue
            for path in owner_dir.iterdir():
                sid = path.name.split(".", 1)[0]
                if not path.name.startswith(".") and SESSION_ID_RE.match(sid) and path.is_file():
                    entry(owner_dir.name, sid).add(path)
    for oh, name, directory in store.stored(SESSION_PREFIX):
        sid = name[len(SESSION_PREFIX):]
        if not SESSION_ID_RE.match(sid):
            continue
        stored = entry(oh, sid)
        for root, _, files in os.walk(directory):
            for f in files:
                stored.add(Path(root) / f)
    return list(found.values())


def choose(stored: list[StoredSession], resident: set, now: float, *, max_age_s: float,
           max_bytes: int) -> list[StoredSession]:
    """The sessions to delete: not resident, and unused for over ``max_age_s`` (0: no age limit), then
    the least recently used until all stored sessions (resident ones included) fit ``max_bytes``
    (0: no cap). Oldest first."""
    candidates = sorted((s for s in stored if (s.owner_hash, s.sid) not in resident), key=lambda s: s.last_used)
    victims = []
    for s in candidates:
        if max_age_s and now - s.last_used > max_age_s:
            s.why = f"unused for {(now - s.last_used) / 86400:.1f} days"
            victims.append(s)
    if max_bytes:
        total = sum(s.size for s in stored) - sum(s.size for s in victims)
        for s in candidates:
            if total <= max_bytes:
                break
            if s.why:
                continue
            s.why = f"stored sessions over {max_bytes // MB} MB"
            victims.append(s)
            total -= s.size
    return victims
