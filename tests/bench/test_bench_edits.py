"""The git-history reader: first-parent, non-merge commits, oldest first, filtered by file type."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess

import pytest

from bench.edits import first_parent_commits, git_history_edits, load_edits, read_jsonl_edits

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def commit(repo, files: dict, message: str) -> str:
    for name, text in files.items():
        (repo / name).write_text(text)
        git(repo, "add", name)
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "r"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    c0 = commit(repo, {"a.py": "x = 1\n"}, "root")
    c1 = commit(repo, {"a.py": "x = 2\n", "notes.txt": "n\n"}, "one")
    git(repo, "checkout", "-q", "-b", "side")
    s1 = commit(repo, {"b.py": "y = 1\n"}, "side work")
    git(repo, "checkout", "-q", "main")
    c2 = commit(repo, {"a.py": "x = 3\n"}, "two")
    git(repo, "merge", "-q", "--no-ff", "-m", "merge side", "side")
    merge = git(repo, "rev-parse", "HEAD")
    c3 = commit(repo, {"a.py": "x = 4\n", "c.py": "z = 0\n"}, "three")
    return repo, {"c0": c0, "c1": c1, "s1": s1, "c2": c2, "merge": merge, "c3": c3}


def test_first_parent_non_merge_commits_oldest_first(repo):
    repo, c = repo
    rows = first_parent_commits(repo)
    assert [r[0] for r in rows] == [c["c1"], c["c2"], c["c3"]]  # no root, no merge, no side-branch commit
    assert rows[-1][1] == c["merge"] and rows[0][1] == c["c0"]
    assert [r[0] for r in first_parent_commits(repo, max_commits=2)] == [c["c2"], c["c3"]]


def test_git_history_edits_before_after_and_file_types(repo):
    repo, c = repo
    edits = git_history_edits(repo)
    assert [(e["commit"], e["path"]) for e in edits] == [(c["c1"], "a.py"), (c["c2"], "a.py"),
                                                          (c["c3"], "a.py"), (c["c3"], "c.py")]
    assert edits[0]["before"] == "x = 1\n" and edits[0]["after"] == "x = 2\n"
    assert edits[3]["before"] == "" and edits[3]["language"] == "python"  # an added file
    txt = git_history_edits(repo, extensions=(".txt",))
    assert [e["path"] for e in txt] == ["notes.txt"]
    assert len(load_edits(repo, limit=2)) == 2


def test_jsonl_reader(tmp_path):
    rows = [{"path": f"{i}.py", "before": "", "after": "x"} for i in range(5)]
    path = tmp_path / "e.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_jsonl_edits(path, limit=3) == rows[:3]
    assert load_edits(path) == rows
