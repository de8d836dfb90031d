"""Atomic replacement of a directory: build beside it, fsync, swap in one step.

A writer killed midway leaves a hidden ``.NAME.tmp-*`` (or ``.NAME.old-*``) beside its target;
readers ignore them, ``recover`` puts a cut swap back, and ``remove_leftovers`` clears them at startup.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from adapter_core.faults import fault_point

TMP_MARK = ".tmp-"  # hidden temp copies: ``.NAME.tmp-*`` (directories here, files in server/store/files.py)
OLD_MARK = ".old-"  # the previous version during a fallback swap: ``.NAME.old-*``
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory so that a rename in it survives a power cut."""
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
    return sorted(target.parent.glob(f".{target.name}{OLD_MARK}*"))


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARK}", dir=parent))
    try:
        write(tmp)
        fault_point("dir.before_fsync")
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        fsync_path(tmp)
        fault_point("dir.before_rename")
        if not target.exists():
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            fault_point("dir.after_swap")
            shutil.rmtree(tmp)  # now holds the previous version
        else:
            # Two renames; a crash in between is undone by recover() on the next read/write.
            old = parent / f".{target.name}{OLD_MARK}{uuid.uuid4().hex}"
            os.rename(target, old)
            fault_point("dir.between_renames")
            os.rename(tmp, target)
            shutil.rmtree(old)
        fault_point("dir.before_dir_fsync")
        fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _is_leftover(name: str, also: tuple[str, ...]) -> bool:
    return name.startswith(".") and (TMP_MARK in name or OLD_MARK in name) or name.startswith(also)


def remove_leftovers(root, also: tuple[str, ...] = ()) -> list[Path]:
    """Clear what writers killed midway left anywhere under ``root``: temp copies, previous versions
    (a cut swap is put back first) and entries whose names start with one of ``also``.

    Startup only, before anything writes: a writer running now would lose its temp copy.
    Returns the entries found.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        found += [Path(dirpath) / n for n in dirnames + filenames if _is_leftover(n, also)]
        dirnames[:] = [n for n in dirnames if not _is_leftover(n, also)]
    for path in found:
        if path.name.startswith(".") and OLD_MARK in path.name:
            recover(path.parent / path.name[1:].rsplit(OLD_MARK, 1)[0])  # may rename it back into place
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for parent in {p.parent for p in found}:
        fsync_path(parent)
    return found
