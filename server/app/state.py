"""What the request handlers share: one ``ServerState`` per app (``app.state.dynarank``)."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Protocol

from server.adaptation.jobs import JobManager
from server.adaptation.workers import AdaptationWorkers
from server.config import Settings
from server.engines.base import Engine
from server.engines.bridge import GenerationBridge
from server.feedback import FeedbackRegistry
from server.observability.metrics import Metrics
from server.sessions import SessionManager
from server.store import AdapterStore, FileStore
from server.store.files import remove_stale_temps


class AdapterResolver(Protocol):
    """Maps a `model` name from a request to an adapter snapshot the caller may use."""

    def resolve(self, model_name: str, api_key: str | None):
        """Return (snapshot or None for the base model, adapter_id or None).

        Raises KeyError if the name is neither the base model nor an adapter
        this key may use (the API turns it into a 404 ``model_not_found``).
        """
        ...

    def list_for(self, api_key: str | None) -> list[dict]:
        """Adapters this key may use, as OpenAI model objects (``id``, ``owned_by``, ``parent``)."""
        ...


@dataclasses.dataclass
class Services:
    """The session layer: built only when a model is loaded (training needs it)."""

    store: AdapterStore
    sessions: SessionManager
    workers: AdaptationWorkers
    jobs: JobManager
    feedback: FeedbackRegistry
    files: FileStore  # uploads that jobs train on

    @classmethod
    def build(cls, settings: Settings, model, tokenizer, engine: Engine, metrics: Metrics) -> Services:
        remove_stale_temps(settings.data_dir)  # a killed writer's leftovers; nothing writes yet
        # Stored adapters move to the model's device once, when read, not at every forward.
        store = AdapterStore(settings.data_dir, settings.served_name, settings.keep_versions,
                             device=next(model.parameters()).device)
        sessions = SessionManager(settings, model, tokenizer, store, metrics)
        workers = AdaptationWorkers(settings, model, tokenizer, sessions, engine.gate, metrics)
        files = FileStore(settings.data_dir)
        jobs = JobManager(settings, model, tokenizer, store, sessions, files)
        jobs.on_work = workers.wake
        workers.sources.append(jobs.take)
        feedback = FeedbackRegistry(settings, sessions)
        metrics.watch_feedback(feedback)
        metrics.watch_services(sessions, jobs)
        return cls(store, sessions, workers, jobs, feedback, files)

    def start(self) -> None:
        self.workers.start()
        self.sessions.start_background()  # writes what changed within persist_interval_s; retention

    def stop(self) -> None:
        """Stop training (the current step finishes), then persist every session and feedback book."""
        self.workers.stop()
        self.sessions.stop_background()
        self.sessions.persist_all()
        self.feedback.flush()


@dataclasses.dataclass
class ServerState:
    settings: Settings
    metrics: Metrics
    started: float
    model: Any = None  # the frozen base model, shared by serving and training
    tokenizer: Any = None
    engine: Engine | None = None
    bridge: GenerationBridge | None = None
    services: Services | None = None
    adapters: AdapterResolver | None = None  # the session manager when services exist
    editor_prompt_tokens: int | None = None  # a websocket completion's prompt budget (devices.editor_prompt_budget)
    # Open websocket sessions per owner (None: no API keys); changed only on the event loop.
    ws_open: collections.Counter = dataclasses.field(default_factory=collections.Counter)
