"""Fixtures of the end-to-end app tests: a server on the tiny model that tests/server/conftest.py saves."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.session_server import Server


@pytest.fixture(scope="module")
def server(tiny_dir):
    data = Path(tempfile.mkdtemp(prefix="dynarank-data-"))
    srv = Server(tiny_dir, data).start()
    yield srv
    out = srv.stop()
    shutil.rmtree(data, ignore_errors=True)
    assert "Traceback" not in out, out[-3000:]
