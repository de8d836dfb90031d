"""FastAPI application factory."""

from __future__ import annotations

import time

from fastapi import FastAPI

from server.settings import Settings


def create_app(settings: Settings, model=None, tokenizer=None) -> FastAPI:
    app = FastAPI(title="dynarank", version="0.1.0")
    app.state.settings = settings
    app.state.model = model
    app.state.tokenizer = tokenizer
    started = time.time()

    @app.get("/health")
    def health():
        return {"status": "ok", "model": settings.served_name, "uptime_s": round(time.time() - started, 3)}

    @app.get("/v1/models")
    def list_models():
        return {
            "object": "list",
            "data": [{"id": settings.served_name, "object": "model", "created": int(started), "owned_by": "dynarank"}],
        }

    return app
