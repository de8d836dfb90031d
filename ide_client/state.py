"""Where the CLI remembers its session: ``<repo>/.dynarank/client.json`` when
working in a repository, else ``~/.config/dynarank/client.json``.

Entries are keyed by server URL, so one repository can talk to two servers.
The resume token is a credential: the file is written 0600 and the repo's
``.dynarank/`` gets a ``.gitignore`` so it is never committed by accident.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

FILE_NAME = "client.json"


def default_state_path(repo_root: Path | None) -> Path:
    if repo_root is not None:
        return Path(repo_root) / ".dynarank" / FILE_NAME
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "dynarank" / FILE_NAME


class StateFile:
    def __init__(self, path: Path):
        self.path = Path(path)

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def load(self, server: str) -> dict:
        """{session_id, resume_token} saved for this server, or {}."""
        entry = self._read().get("servers", {}).get(server, {})
        return entry if isinstance(entry, dict) else {}

    def save(self, server: str, **entry) -> None:
        data = self._read()
        data.setdefault("servers", {})[server] = {k: v for k, v in entry.items() if v is not None}
        self._write(data)

    def forget(self, server: str) -> None:
        data = self._read()
        if data.get("servers", {}).pop(server, None) is not None:
            self._write(data)

    def _write(self, data: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.parent.name == ".dynarank":
            ignore = self.path.parent / ".gitignore"
            if not ignore.exists():
                ignore.write_text("*\n")
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".client-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
