"""The repository itself passes its privacy rules: no committed file looks like a secret.

Test fixtures that need a key build it at run time (tests/privacy_repo.py), so this
file list holds no key-shaped text for our rules or a host's push protection to flag.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from code_signals.privacy import PrivacyFilter

ROOT = Path(__file__).resolve().parents[1]
NOT_SECRETS = ("binary", "not UTF-8", "over ")  # size and encoding rules are about what to send, not secrets


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [p for p in out.splitlines() if (ROOT / p).is_file() and not (ROOT / p).is_symlink()]


def test_no_tracked_file_looks_like_a_secret():
    privacy = PrivacyFilter(ROOT)
    flagged = []
    for path in tracked_files():
        why = privacy.reason(path, (ROOT / path).read_bytes())
        if why is not None and not why.startswith(NOT_SECRETS):
            flagged.append(f"{path}: {why}")
    assert not flagged, flagged
