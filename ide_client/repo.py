"""The repository on disk as the client sees it: its root, its id, and which
files are source worth sending (the server does the real classification)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Directories that are never the user's own code.
SKIP_DIRS = {".git", ".hg", ".svn", ".dynarank", "node_modules", "__pycache__", ".venv", "venv", "env",
             "build", "dist", "target", ".mypy_cache", ".pytest_cache", ".tox", ".idea", ".vscode", "out"}
SOURCE_SUFFIXES = {
    ".py", ".pyi", ".js", ".jsx", ".mjs", ".cjs", ".ts", ".tsx", ".go", ".rs", ".java", ".kt", ".scala",
    ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".cs", ".rb", ".php", ".swift", ".m", ".lua", ".sh",
    ".bash", ".sql", ".r", ".jl", ".hs", ".ml", ".ex", ".exs", ".erl", ".clj", ".dart", ".vue", ".svelte",
    ".html", ".css", ".scss", ".toml", ".yaml", ".yml", ".json", ".md", ".rst",
}
MAX_FILE_BYTES = 512 * 1024  # the server's message limit is 1 MiB; leave room for JSON escaping


def find_root(start: Path) -> Path:
    """The nearest ancestor holding .git or .dynarank; the start directory itself otherwise."""
    start = Path(start).resolve()
    here = start if start.is_dir() else start.parent
    for d in (here, *here.parents):
        if (d / ".git").exists() or (d / ".dynarank").is_dir():
            return d
    return here


def repository_info(root: Path) -> dict:
    """What hello and fine-tuning jobs call the repository: a stable id from its absolute path."""
    root = Path(root).resolve()
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return {"id": f"{root.name}-{digest}", "root_name": root.name}


def is_source(path: Path) -> bool:
    return path.suffix.lower() in SOURCE_SUFFIXES and not any(part in SKIP_DIRS for part in path.parts)


def read_text(path: Path) -> str | None:
    """The file's text, or None for binary, unreadable or oversized files."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def source_files(root: Path):
    """(relative posix path, text) of every source file under root."""
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root)
            if is_source(rel):
                text = read_text(path)
                if text is not None:
                    yield rel.as_posix(), text
