"""Atomic single-file writes: readers see the old file or the new one, never a mix."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_file_atomic(path: Path, write, mode: str = "w") -> None:
    """Call ``write(f)`` on a temp file beside ``path``, fsync, rename over it (readers see old or new).

    The one-file counterpart of ``adapter_core.atomic.write_dir_atomically``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise



def write_json_atomic(path: Path, data) -> None:
    """Write JSON beside ``path`` and rename over it (readers see old or new)."""
    write_file_atomic(path, lambda f: json.dump(data, f, indent=2, sort_keys=True))
