"""FastAPI application factory."""

from __future__ import annotations

import time

from fastapi import Depends, FastAPI
from fastapi.responses import Response

from server.app.auth import install_guards, require_api_key
from server.app.errors import install_error_handlers
from server.app.state import ServerState
from server.config import Settings
from server.observability.metrics import Metrics, RequestMetrics


def create_app(settings: Settings, model=None, tokenizer=None, engine=None) -> FastAPI:
    app = FastAPI(title="dynarank", version="0.1.0")
    if engine is None and model is not None and settings.engine == "vllm":
        from server.engines.vllm.engine import (
            build_vllm_engine,  # generation in vLLM; training stays on `model`
        )

        engine = build_vllm_engine(settings, tokenizer, getattr(model, "name_or_path", None))
    if engine is None and model is not None:
        from server.engines.hf import HFEngine

        engine = HFEngine(model, tokenizer, settings.served_name)
    metrics = Metrics()
    state = ServerState(settings=settings, engine=engine, tokenizer=tokenizer, model=model, metrics=metrics)
    state.extras["started"] = time.time()
    if engine is not None and hasattr(engine, "gate"):
        state.extras["serving_gate"] = engine.gate
    app.state.settings = settings
    app.state.model = model
    app.state.tokenizer = tokenizer
    app.state.dynarank = state

    install_error_handlers(app)
    install_guards(app, settings)
    # Outermost, so rejected (413) requests are timed and logged too.
    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": settings.served_name,
                "uptime_s": round(time.time() - state.extras["started"], 3)}

    @app.get("/metrics", dependencies=[Depends(require_api_key)])
    def prometheus_metrics():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    from server.app.routers.openai import router

    app.include_router(router)
    from server.app.routers.sessions import register_session_routes

    register_session_routes(app, state)
    if hasattr(engine, "attach"):  # the vLLM engine learns adapter lineages; shuts vLLM down with the app
        engine.attach(state)
        app.router.on_shutdown.append(engine.close)
    return app
