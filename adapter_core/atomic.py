"""Atomic replacement of a directory: build beside it, fsync, swap in one step."""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import uuid
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False  # e.g. a filesystem without RENAME_EXCHANGE: use the fallback


def _old_copies(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.old-*"))


def recover(target: Path) -> None:
    """If a fallback swap was cut between its two renames, put the previous version back."""
    target = Path(target)
    if not target.exists():
        olds = _old_copies(target)
        if olds:
            os.rename(olds[-1], target)


def write_dir_atomically(target, write) -> Path:
    """Call ``write(tmp_dir)`` on a fresh directory beside ``target``, then make it ``target``.

    Readers see the old directory or the new one, never a mix; if ``write`` (or the
    process) dies first, the previous version stays in place.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_path(f)
        _fsync_path(tmp)
        if not target.exists():
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp)  # now holds the previous version
        else:
            # Two renames; a crash in between is undone by recover() on the next read/write.
            old = parent / f".{target.name}.old-{uuid.uuid4().hex}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        _fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
