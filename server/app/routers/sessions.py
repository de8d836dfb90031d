"""Wires the session layer into the app: ``register_session_routes(app, state)``.

Mounts ``/v1/ws``, the fine-tuning jobs router, ``/v1/adapters``,
``/v1/sessions`` and the dashboard; sets ``state.adapters`` (the resolver the
OpenAI API uses); starts the adaptation workers on startup and, on shutdown,
stops them (the current step finishes) and persists every session's adapter.
"""

from __future__ import annotations

import dataclasses
import logging

from fastapi import APIRouter, Depends, FastAPI, WebSocket
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from server.adaptation.jobs import JobManager, make_router
from server.adaptation.workers import AdaptationWorkers
from server.app.auth import require_api_key
from server.app.errors import APIError
from server.app.ws.connection import websocket_endpoint
from server.errors import ClientError
from server.feedback import FeedbackRegistry
from server.sessions import SESSION_PREFIX, SessionManager
from server.store import AdapterStore, StoreError

log = logging.getLogger("dynarank.sessions")


@dataclasses.dataclass
class SessionContext:
    store: AdapterStore
    sessions: SessionManager
    workers: AdaptationWorkers
    jobs: JobManager
    feedback: FeedbackRegistry


def build_context(state) -> SessionContext:
    settings = state.settings
    store = AdapterStore(settings.data_dir, settings.served_name, settings.keep_versions)
    sessions = SessionManager(settings, state.model, state.tokenizer, store, state.metrics)
    gate = getattr(state.engine, "gate", None) or state.extras.get("serving_gate")
    workers = AdaptationWorkers(settings, state.model, state.tokenizer, sessions, gate, state.metrics)
    jobs = JobManager(settings, state.model, state.tokenizer, store, sessions)
    jobs.on_work = workers.wake
    workers.sources.append(jobs.take)
    return SessionContext(store, sessions, workers, jobs, FeedbackRegistry(settings, sessions))


def on_startup(ctx: SessionContext) -> None:
    ctx.workers.start()


def on_shutdown(ctx: SessionContext) -> None:
    ctx.workers.stop()
    ctx.sessions.persist_all()
    ctx.feedback.flush()
    log.info("sessions persisted")


def register_session_routes(app: FastAPI, state) -> SessionContext:
    ctx = build_context(state)
    state.adapters = ctx.sessions
    state.extras["sessions"] = ctx
    state.extras["feedback"] = ctx.feedback
    if state.metrics is not None:
        state.metrics.watch_feedback(ctx.feedback)
    app.router.on_startup.append(lambda: on_startup(ctx))
    app.router.on_shutdown.append(lambda: on_shutdown(ctx))

    @app.websocket("/v1/ws")
    async def ws(websocket: WebSocket):
        await websocket_endpoint(websocket, state, ctx)

    app.include_router(make_router(ctx.jobs, require_api_key))
    app.include_router(_adapters_router(ctx, state))
    app.include_router(_sessions_router(ctx))
    app.include_router(_feedback_router(ctx))

    from server.app.routers.dashboard import make_router as dashboard_router

    app.include_router(dashboard_router(ctx, state, require_api_key))
    return ctx


def _adapters_router(ctx: SessionContext, state) -> APIRouter:
    router = APIRouter(prefix="/v1/adapters", tags=["adapters"])
    base = state.settings.served_name

    def _check(name: str) -> str:
        try:
            from server.store import check_name

            return check_name(name)
        except StoreError as exc:
            raise APIError(400, str(exc), code="invalid_adapter_name", param="name") from None

    @router.get("")
    def list_adapters(owner=Depends(require_api_key)):
        rows = {r["name"]: {**r, "model": f"{base}:{r['name']}"} for r in ctx.store.list(owner)}
        for s in ctx.sessions.sessions(owner):
            row = rows.setdefault(s.adapter_name, {"name": s.adapter_name, "kind": "session", "versions": [],
                                                   "repository": s.repository, "model": f"{base}:{s.adapter_name}"})
            row["live_version"] = s.current().version
        return {"object": "list", "data": sorted(rows.values(), key=lambda r: r["name"])}

    @router.delete("/{name}")
    def delete_adapter(name: str, owner=Depends(require_api_key)):
        _check(name)
        if name.startswith(SESSION_PREFIX):
            deleted = ctx.sessions.delete_session(owner, name[len(SESSION_PREFIX):])
        else:
            deleted = ctx.store.delete(owner, name)
        if not deleted:
            raise APIError(404, f"no adapter {name}", code="adapter_not_found", param="name")
        return {"id": name, "object": "adapter", "deleted": True}

    @router.get("/{name}/download")
    def download_adapter(name: str, version: int | None = None, owner=Depends(require_api_key)):
        _check(name)
        session = ctx.sessions.get(owner, name[len(SESSION_PREFIX):]) if name.startswith(SESSION_PREFIX) else None
        if session is not None:
            with session.train_lock:  # export what serving uses now
                ctx.sessions.persist(session)
        try:
            data = ctx.store.export_tar(owner, name, version)
        except KeyError:
            raise APIError(404, f"no adapter {name}" + (f" version {version}" if version else ""),
                           code="adapter_not_found", param="name") from None
        return Response(data, media_type="application/gzip",
                        headers={"Content-Disposition": f'attachment; filename="{name}.tar.gz"'})

    return router


def _sessions_router(ctx: SessionContext) -> APIRouter:
    router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

    @router.get("")
    def list_sessions(owner=Depends(require_api_key)):
        return {"object": "list", "data": [{**s.describe(), "resident": True} for s in ctx.sessions.sessions(owner)]}

    @router.get("/{session_id}")
    def get_session(session_id: str, owner=Depends(require_api_key)):
        session = ctx.sessions.get(owner, session_id)
        if session is not None:
            return {**session.describe(), "resident": True, "history": list(session.history)}
        stored = ctx.sessions.describe_stored(owner, session_id) if session_id.replace("-", "").replace("_", "").isalnum() else None
        if stored is None:
            raise APIError(404, f"no session {session_id}", code="session_not_found", param="session_id")
        return stored

    @router.get("/{session_id}/stats")
    def session_stats(session_id: str, owner=Depends(require_api_key)):
        session = ctx.sessions.get(owner, session_id)
        if session is None:
            raise APIError(404, f"no resident session {session_id}", code="session_not_found", param="session_id")
        return {"object": "session.stats", "session_id": session.id, "adapter": session.adapter_name,
                "adapter_version": session.current().version, "feedback": session.feedback.stats(),
                "models": ctx.feedback.model_stats(owner)}

    return router


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event: str
    accepted_text: str | None = None
    index: int = Field(0, ge=0)  # choice index, for requests with several prompts or n > 1


def _feedback_router(ctx: SessionContext) -> APIRouter:
    router = APIRouter(tags=["feedback"])

    @router.post("/v1/completions/{completion_id}/feedback")
    def feedback(completion_id: str, body: FeedbackBody, owner=Depends(require_api_key)):
        cid = completion_id if body.index == 0 else f"{completion_id}.{body.index}"
        try:
            return ctx.feedback.apply(owner, cid, body.event, body.accepted_text)
        except ClientError as exc:
            raise APIError(exc.status, exc.message, code=exc.code, param="completion_id") from None

    return router
