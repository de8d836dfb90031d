"""Runs the VS Code extension's build and node tests, so `pytest` covers the TypeScript too.

The node tests include a live server on a tiny model (ide_client/vscode/test/client.live.test.ts).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXT = Path(__file__).resolve().parents[2] / "ide_client" / "vscode"


def _npm(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "DYNARANK_PYTHON": sys.executable, "npm_config_audit": "false", "npm_config_fund": "false"}
    return subprocess.run(["npm", *args], check=False, cwd=EXT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                    reason="node and npm are needed to build and test the VS Code extension")
def test_vscode_extension_builds_and_its_node_tests_pass():
    # npm ci when the lock file matches; a plain install otherwise (e.g. a registry mirror rewrote it).
    install = _npm("ci", timeout=600)
    if install.returncode != 0:
        install = _npm("install", timeout=600)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    build = _npm("run", "build", timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    test = _npm("test", timeout=600)
    out = test.stdout + test.stderr
    assert test.returncode == 0, out[-6000:]
    assert "# fail 0" in out and "# pass " in out, out[-3000:]
