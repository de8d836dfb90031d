"""Atomic single-file writes: readers see the old file or the new one, never a mix."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from adapter_core.atomic import TMP_MARK, fsync_path, remove_leftovers
from adapter_core.faults import fault_point

TRASH_PREFIX = ".deleted-"  # AdapterStore._remove renames a directory to this before deleting it


def write_file_atomic(path: Path, write, mode: str = "w") -> None:
    """Call ``write(f)`` on a temp file beside ``path``, fsync, rename over it (readers see old or new).

    The one-file counterpart of ``adapter_core.atomic.write_dir_atomically``; a writer killed midway
    leaves a hidden ``.NAME.tmp-*`` that ``remove_stale_temps`` clears at startup.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            fault_point("file.before_fsync")
            os.fsync(f.fileno())
        fault_point("file.before_replace")
        os.replace(tmp, path)
        fault_point("file.before_dir_fsync")
        fsync_path(path.parent)  # the rename itself survives a power cut
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data) -> None:
    """Write JSON beside ``path`` and rename over it (readers see old or new)."""
    write_file_atomic(path, lambda f: json.dump(data, f, indent=2, sort_keys=True))


def remove_stale_temps(data_dir: Path) -> list[Path]:
    """At startup, before anything writes: clear the temp files, temp directories and trash that
    writers killed midway left under ``data_dir``. Returns what was found."""
    return remove_leftovers(data_dir, also=(TRASH_PREFIX,))
