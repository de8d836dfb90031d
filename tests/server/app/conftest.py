"""Fixtures of the end-to-end app tests: a server on the tiny model that tests/server/conftest.py saves."""

from __future__ import annotations

import pytest

from tests.session_server import served


@pytest.fixture(scope="module")
def server(tiny_dir):
    yield from served(tiny_dir)
