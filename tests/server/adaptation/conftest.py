"""Fixtures of the adaptation tests: a job manager over a tiny model."""

from __future__ import annotations

import threading
import types

import pytest

from server.adaptation.jobs import JobManager
from server.config import Settings
from server.sessions import SessionManager
from server.store import AdapterStore


@pytest.fixture
def make_jobs(tmp_path, tokenizer, tiny_llama):
    """make_jobs(**settings) -> namespace(settings, store, sessions, jobs, ready); over the same data dir each time."""

    def make(**overrides):
        settings = Settings(model="tiny", data_dir=tmp_path / "data", **overrides)
        store = AdapterStore(settings.data_dir, settings.served_name, settings.keep_versions)
        sessions = SessionManager(settings, tiny_llama, tokenizer, store)
        jobs = JobManager(settings, tiny_llama, tokenizer, store, sessions)
        ready = threading.Event()
        jobs.on_work = ready.set
        return types.SimpleNamespace(settings=settings, store=store, sessions=sessions, jobs=jobs, ready=ready)

    return make
