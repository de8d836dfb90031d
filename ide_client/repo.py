"""The repository on disk as the client sees it: its root, its id, and which
files are source worth sending (the server does the real classification).

What may be sent at all is code_signals.privacy's decision (docs/privacy.md):
never ignored, secret, binary or oversized files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from code_signals.privacy import allowed_files

# Directories that are never the user's own code (not a privacy matter: not worth sending).
SKIP_DIRS = {".git", ".hg", ".svn", ".dynarank", "node_modules", "__pycache__", ".venv", "venv", "env",
             "build", "dist", "target", ".mypy_cache", ".pytest_cache", ".tox", ".idea", ".vscode", "out"}
SOURCE_SUFFIXES = {
    ".py", ".pyi", ".js", ".jsx", ".mjs", ".cjs", ".ts", ".tsx", ".go", ".rs", ".java", ".kt", ".scala",
    ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".cs", ".rb", ".php", ".swift", ".m", ".lua", ".sh",
    ".bash", ".sql", ".r", ".jl", ".hs", ".ml", ".ex", ".exs", ".erl", ".clj", ".dart", ".vue", ".svelte",
    ".html", ".css", ".scss", ".toml", ".yaml", ".yml", ".json", ".md", ".rst",
}


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


def is_source(path: Path | str) -> bool:
    """Whether a relative path is source worth sending (the privacy rules decide separately whether it may be)."""
    path = Path(path)
    return path.suffix.lower() in SOURCE_SUFFIXES and not any(part in SKIP_DIRS for part in path.parts)


def _skip_dir(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name in SKIP_DIRS or name.startswith(".")


def source_files(root: Path):
    """(relative posix path, text) of every source file under root that the privacy rules allow."""
    yield from allowed_files(root, want=is_source, skip_dir=_skip_dir)
