"""Adapter store: versioned PEFT-format directories on disk, per owner.

Layout under ``settings.data_dir``::

    adapters/<owner-hash>/<adapter_name>/v<N>/   adapter_model.safetensors,
                                                adapter_config.json, dynarank.json
    adapters/<owner-hash>/<adapter_name>/info.json   (repository, kind, extras)

Each version is written by ``adapter_core.save_peft`` into its own directory
(built in a hidden temp dir and renamed), so a crash mid-write leaves the
previous versions untouched; readers ignore hidden entries. Owners are API keys,
stored only as a hash so the data dir never holds a key. Writes and removals
of one adapter are serialised by a lock of that (owner, name) only, so a slow
save never holds up another adapter's.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import threading
import time
from pathlib import Path

from adapter_core.faults import fault_point
from server.store.files import write_json_atomic
from server.store.names import (
    NAME_RE,
    StoreError,
    adapter_lineage,
    check_name,
    owner_hash,
)

_VERSION_DIR = re.compile(r"^v(\d+)$")


class AdapterStore:
    """``device``: where ``load`` puts the factors (the model's, so a stored adapter is moved once, not
    at every forward); None leaves them on the CPU. ``save`` always writes from a CPU copy."""

    def __init__(self, data_dir: Path, base_model_name: str, keep_versions: int = 3, device=None):
        self.root = Path(data_dir) / "adapters"
        self.base_model_name = base_model_name
        self.keep_versions = max(1, keep_versions)
        self.device = device
        self._guard = threading.Lock()  # the lock table only; never held while writing
        self._locks: dict[tuple[str, str], threading.Lock] = {}  # (owner hash, name) -> writes/retention

    def _dir(self, owner: str | None, name: str) -> Path:
        return self.root / owner_hash(owner) / check_name(name)

    def _lock(self, oh: str, name: str) -> threading.Lock:
        """The lock of one adapter: another adapter's save or removal never waits on it."""
        with self._guard:
            return self._locks.setdefault((oh, name), threading.Lock())

    def versions(self, owner: str | None, name: str) -> list[int]:
        d = self._dir(owner, name)
        if not d.is_dir():
            return []
        found = []
        for entry in d.iterdir():
            m = _VERSION_DIR.match(entry.name)
            if m and (entry / "adapter_config.json").is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def save(self, owner: str | None, name: str, snapshot, info: dict | None = None) -> Path:
        """Write ``snapshot`` as version ``snapshot.version``; keep the last N versions."""
        from adapter_core import save_peft

        d = self._dir(owner, name)
        target = d / f"v{snapshot.version}"
        with self._lock(owner_hash(owner), name):
            if not (target / "adapter_config.json").is_file():
                save_peft(snapshot, target, self.base_model_name)
            fault_point("store.before_info")
            if info is not None:
                write_json_atomic(d / "info.json", {**info, "name": name, "updated": time.time()})
            for old in self.versions(owner, name)[: -self.keep_versions]:
                shutil.rmtree(d / f"v{old}", ignore_errors=True)
        return target

    def info(self, owner: str | None, name: str) -> dict:
        try:
            return json.loads((self._dir(owner, name) / "info.json").read_text())
        except (OSError, ValueError):
            return {}

    def load(self, owner: str | None, name: str, version: int | None = None):
        """The snapshot of ``version`` (default latest); KeyError if absent.

        Its ``metadata["lineage"]`` is ``adapter_lineage(owner, name)``: where it was loaded from, whatever
        lineage it was saved with (an adapter published from a session is a lineage of its own).
        """
        import dataclasses

        from adapter_core import load_peft

        versions = self.versions(owner, name)
        if not versions or (version is not None and version not in versions):
            raise KeyError(name)
        v = versions[-1] if version is None else version
        snap = load_peft(self._dir(owner, name) / f"v{v}")
        snap = dataclasses.replace(snap, metadata={**snap.metadata, "lineage": adapter_lineage(owner, name)})
        return snap if self.device is None else snap.to(self.device)

    def exists(self, owner: str | None, name: str) -> bool:
        try:
            return bool(self.versions(owner, name))
        except StoreError:
            return False

    def list(self, owner: str | None) -> list[dict]:
        d = self.root / owner_hash(owner)
        if not d.is_dir():
            return []
        rows = []
        for entry in sorted(d.iterdir()):
            if entry.name.startswith(".") or not NAME_RE.match(entry.name):
                continue
            versions = self.versions(owner, entry.name)
            if not versions:
                continue
            info = self.info(owner, entry.name)
            rows.append({
                "name": entry.name,
                "kind": info.get("kind", "repository"),
                "versions": versions,
                "latest_version": versions[-1],
                "repository": info.get("repository"),
                "updated": info.get("updated"),
            })
        return rows

    def find_for_repository(self, owner: str | None, repository: dict | None) -> str | None:
        """Name of the owner's repository adapter trained for ``repository`` (by id, then root name)."""
        if not repository:
            return None
        rows = [r for r in self.list(owner) if r["kind"] == "repository"]
        for key in ("id", "root_name"):
            want = repository.get(key)
            if not want:
                continue
            for row in sorted(rows, key=lambda r: -(r["updated"] or 0)):
                if (row.get("repository") or {}).get(key) == want:
                    return row["name"]
        return None

    def delete(self, owner: str | None, name: str) -> bool:
        return self.delete_hashed(owner_hash(owner), name)

    def delete_hashed(self, oh: str, name: str) -> bool:
        """``delete`` by owner hash (retention knows stored adapters by hash, never by key)."""
        return self._remove(self.root / oh / check_name(name), (oh, name))

    def delete_version(self, owner: str | None, name: str, version: int) -> bool:
        return self._remove(self._dir(owner, name) / f"v{int(version)}", (owner_hash(owner), name))

    def stored(self, prefix: str = ""):
        """(owner hash, name, directory) of every stored adapter whose name starts with ``prefix``."""
        if not self.root.is_dir():
            return
        for owner_dir in self.root.iterdir():
            if owner_dir.name.startswith(".") or not owner_dir.is_dir():
                continue
            for entry in owner_dir.iterdir():
                if entry.name.startswith(prefix) and NAME_RE.match(entry.name) and entry.is_dir():
                    yield owner_dir.name, entry.name, entry

    def _remove(self, path: Path, key: tuple[str, str]) -> bool:
        with self._lock(*key):
            if not path.is_dir():
                return False
            # Rename to a hidden name first so a concurrent reader never sees a half-deleted directory.
            trash = path.parent / f".deleted-{path.name}-{time.time_ns()}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        return True

    def export_tar(self, owner: str | None, name: str, version: int | None = None) -> bytes:
        """A tar.gz of one version's PEFT directory (``<name>/`` inside)."""
        versions = self.versions(owner, name)
        if not versions or (version is not None and version not in versions):
            raise KeyError(name)
        v = versions[-1] if version is None else version
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(self._dir(owner, name) / f"v{v}", arcname=name)
        return buf.getvalue()
