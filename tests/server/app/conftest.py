"""Fixtures of the end-to-end app tests: a tiny model saved once per module and a server on it."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.session_server import Server, save_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tokenizer):
    d = Path(tempfile.mkdtemp(prefix="dynarank-tiny-")) / "tiny"
    save_tiny_model(d, tokenizer)
    yield d
    shutil.rmtree(d.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tiny_dir):
    data = Path(tempfile.mkdtemp(prefix="dynarank-data-"))
    srv = Server(tiny_dir, data).start()
    yield srv
    out = srv.stop()
    shutil.rmtree(data, ignore_errors=True)
    assert "Traceback" not in out, out[-3000:]
