"""Fixtures shared by the server tests: a tiny model saved once per module, for real server processes."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.session_server import save_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tokenizer):
    d = Path(tempfile.mkdtemp(prefix="dynarank-tiny-")) / "tiny"
    save_tiny_model(d, tokenizer)
    yield d
    shutil.rmtree(d.parent, ignore_errors=True)
