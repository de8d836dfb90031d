"""Fixtures of the session tests: a real SessionManager and AdapterStore on a tiny random Llama."""

from __future__ import annotations

import pytest

from server.config import Settings
from server.sessions import SessionManager
from server.store import AdapterStore


@pytest.fixture
def make_manager(tmp_path, tokenizer, tiny_llama):
    """make_manager(**settings) -> SessionManager over ``tmp_path`` (several share it: a restart)."""
    made = []

    def make(**overrides) -> SessionManager:
        settings = Settings(model="tiny", data_dir=tmp_path, **overrides)
        store = AdapterStore(settings.data_dir, settings.served_name, settings.keep_versions)
        manager = SessionManager(settings, tiny_llama, tokenizer, store)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.stop_background()
