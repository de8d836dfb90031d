"""``/health`` (open) and ``/metrics`` (Prometheus text, behind the API key when keys are set).

``/metrics`` is the same for every key: server-wide aggregates only, no label that names a session,
an adapter or a key (server/observability/metrics.py). Per-session figures are at
``GET /v1/sessions/{id}/stats``, for the session's own key.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from server.app.auth import require_api_key
from server.app.deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/health")
def health(state: StateDep):
    return {"status": "ok", "model": state.settings.served_name, "uptime_s": round(time.time() - state.started, 3)}


@router.get("/metrics", dependencies=[Depends(require_api_key)])
def prometheus_metrics(state: StateDep):
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)
