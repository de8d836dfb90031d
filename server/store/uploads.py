"""Uploaded files (``/v1/files``): the bytes and an OpenAI file object per file, per owner.

Layout under ``settings.data_dir``::

    files/<owner-hash>/<file-id>.data   the uploaded bytes
    files/<owner-hash>/<file-id>.json   the file object (id, bytes, created_at, filename, purpose, status)

Both are written atomically, the bytes first: a file is listed once its object
exists, so a crash mid-upload leaves at most an unlisted ``.data`` behind.
An owner sees only its own directory, so another key's id is simply not found.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path

from server.store.files import write_file_atomic, write_json_atomic
from server.store.names import owner_hash

_FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")


class FileStore:
    def __init__(self, data_dir: Path):
        self.root = Path(data_dir) / "files"

    def _paths(self, owner: str | None, file_id: str) -> tuple[Path, Path]:
        if not isinstance(file_id, str) or not _FILE_ID.match(file_id):
            raise KeyError(file_id)  # not an id we hand out: no such file (and never a path)
        d = self.root / owner_hash(owner)
        return d / f"{file_id}.json", d / f"{file_id}.data"

    def add(self, owner: str | None, filename: str, purpose: str, data: bytes) -> dict:
        file_id = "file-" + secrets.token_hex(12)
        meta, content = self._paths(owner, file_id)
        write_file_atomic(content, lambda f: f.write(data), mode="wb")
        record = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                  "filename": filename, "purpose": purpose, "status": "processed", "status_details": None}
        write_json_atomic(meta, record)
        return record

    def get(self, owner: str | None, file_id: str) -> dict:
        meta, _ = self._paths(owner, file_id)
        try:
            return json.loads(meta.read_text())
        except FileNotFoundError:
            raise KeyError(file_id) from None

    def read(self, owner: str | None, file_id: str) -> bytes:
        self.get(owner, file_id)  # listed files only
        try:
            return self._paths(owner, file_id)[1].read_bytes()
        except FileNotFoundError:  # deleted meanwhile
            raise KeyError(file_id) from None

    def list(self, owner: str | None, purpose: str | None = None) -> list[dict]:
        d = self.root / owner_hash(owner)
        records = []
        for path in d.glob("file-*.json") if d.is_dir() else ():
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # deleted meanwhile
        return sorted((r for r in records if purpose in (None, r.get("purpose"))),
                      key=lambda r: (r["created_at"], r["id"]), reverse=True)

    def delete(self, owner: str | None, file_id: str) -> dict:
        meta, content = self._paths(owner, file_id)
        try:
            meta.unlink()  # the object first: the file is gone for readers at once
        except FileNotFoundError:
            raise KeyError(file_id) from None
        content.unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}
