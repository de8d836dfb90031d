"""File edits to replay: from a JSONL(.gz) file or from a local git repository's history.

An edit is a dict with the fields of ``shared/data/click_edits.jsonl.gz``:
repo, commit, parent, time, path, language, before, after (oldest first).
"""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

from code_signals import detect_language

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "click_edits.jsonl.gz"
DEFAULT_EXTENSIONS = (".py",)


def read_jsonl_edits(path: str | Path, limit: int | None = None) -> list[dict]:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    edits = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                edits.append(json.loads(line))
                if limit is not None and len(edits) >= limit:
                    break
    return edits


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True, encoding="utf-8", errors="replace").stdout


def _blob(repo: Path, rev: str, path: str) -> str | None:
    # Missing on that side (added/deleted file) or not text: None.
    out = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:{path}"], capture_output=True)
    if out.returncode != 0 or b"\0" in out.stdout:
        return None
    try:
        return out.stdout.decode("utf-8")
    except UnicodeDecodeError:
        return None


def first_parent_commits(repo: str | Path, max_commits: int | None = None) -> list[tuple[str, str, str]]:
    """(commit, first parent, ISO time) of first-parent, non-merge commits with a parent, oldest first.

    With ``max_commits`` the most recent ones are kept (replayed oldest first).
    """
    out = _git(Path(repo), "log", "--first-parent", "--no-merges", "--format=%H %P|%cI", "HEAD")
    rows = []
    for line in out.splitlines():
        hashes, _, when = line.partition("|")
        parts = hashes.split()
        if len(parts) >= 2:  # the root commit has nothing to diff against
            rows.append((parts[0], parts[1], when))
    rows.reverse()
    return rows[-max_commits:] if max_commits else rows


def git_history_edits(repo: str | Path, max_commits: int | None = None, extensions=DEFAULT_EXTENSIONS,
                      limit: int | None = None) -> list[dict]:
    """File edits (modified or added files with a matching extension) of the replayed commits."""
    repo = Path(repo)
    edits = []
    for commit, parent, when in first_parent_commits(repo, max_commits):
        names = _git(repo, "diff", "--name-only", "--no-renames", "--diff-filter=AM", parent, commit, "--")
        for path in names.splitlines():
            if extensions and not path.endswith(tuple(extensions)):
                continue
            before, after = _blob(repo, parent, path), _blob(repo, commit, path)
            if after is None:
                continue
            edits.append({"repo": repo.name, "commit": commit, "parent": parent, "time": when, "path": path,
                          "language": detect_language(path, after, None), "before": before or "", "after": after})
            if limit is not None and len(edits) >= limit:
                return edits
    return edits


def load_edits(source: str | Path, limit: int | None = None, max_commits: int | None = None,
               extensions=DEFAULT_EXTENSIONS) -> list[dict]:
    """A git work tree (a directory with .git) or a JSONL(.gz) file."""
    source = Path(source)
    if source.is_dir():
        return git_history_edits(source, max_commits, extensions, limit)
    return read_jsonl_edits(source, limit)
