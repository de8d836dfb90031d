"""``create_app``: the FastAPI application, its shared state and its lifespan."""

from __future__ import annotations

import contextlib
import logging
import time

from fastapi import FastAPI

from server.app.errors import install_error_handlers
from server.app.middleware import install_middleware
from server.app.routers import ROUTERS
from server.app.state import ServerState, Services
from server.app.ws.connection import router as ws_router
from server.config import Settings
from server.devices import editor_prompt_budget
from server.engines import build_engine
from server.engines.base import Engine
from server.engines.bridge import GenerationBridge
from server.observability.metrics import Metrics

log = logging.getLogger("dynarank")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    """Start background training with the app; on shutdown stop it, persist sessions, close the engine."""
    state: ServerState = app.state.dynarank
    if state.services is not None:
        state.services.start()
    try:
        yield
    finally:
        if state.services is not None:
            state.services.stop()
            log.info("sessions persisted")
        if state.engine is not None:
            state.engine.close()


def create_app(settings: Settings, model=None, tokenizer=None, engine: Engine | None = None) -> FastAPI:
    """The app over ``model`` (the frozen hf base model training uses) and ``engine`` (generation).

    Without ``engine`` one is built from ``settings.engine``. Without ``model``
    there is no training: the session, adapter and fine-tuning routes answer 503.
    """
    metrics = Metrics()
    if engine is None and model is not None:
        engine = build_engine(settings, model, tokenizer)
    state = ServerState(settings=settings, metrics=metrics, started=time.time(), model=model,
                        tokenizer=tokenizer if tokenizer is not None else (engine.tokenizer if engine else None),
                        engine=engine)
    device = next(model.parameters()).device if model is not None else "cpu"
    state.editor_prompt_tokens = editor_prompt_budget(settings.editor_prompt_tokens, device)
    if engine is not None:
        state.bridge = GenerationBridge(engine, metrics, settings.max_inflight_requests)
        metrics.watch_replicas(engine)  # vllm-remote: each replica's health on /metrics
        metrics.watch_prefix_cache(engine)  # hf: prompt tokens reused and prefilled
    if model is not None and engine is not None:
        state.services = Services.build(settings, model, state.tokenizer, engine, metrics)
        state.adapters = state.services.sessions
        engine.attach(state.adapters)

    app = FastAPI(title="dynarank", version="0.1.0", lifespan=lifespan)
    app.state.dynarank = state
    install_error_handlers(app)
    install_middleware(app, settings, metrics)
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(ws_router)
    return app
