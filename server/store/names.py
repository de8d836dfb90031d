"""Names on disk: adapter names, owner hashes and the session adapter prefix."""

from __future__ import annotations

import hashlib
import re

SESSION_PREFIX = "session-"  # a session's adapter is named SESSION_PREFIX + session id


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")



class StoreError(ValueError):
    """A bad adapter name or a missing adapter."""



def owner_hash(api_key: str | None) -> str:
    # Keys never touch the disk; a missing key (auth off) is the local owner.
    return hashlib.sha256(("key:" + (api_key or "")).encode()).hexdigest()[:24]



def adapter_lineage(owner: str | None, name: str) -> str:
    """Which adapter a snapshot is a version of: ``metadata["lineage"]`` of every stored and session snapshot.

    Engines that keep adapter versions apart (vLLM) group versions by it.
    """
    return f"{owner_hash(owner)}/{name}"



def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise StoreError(f"invalid adapter name {name!r}: use letters, digits, '.', '_', '-' (max 80, no '..')")
    return name
