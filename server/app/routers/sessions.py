"""``/v1/sessions``: IDE sessions of this key, resident or stored, their feedback stats and adaptation figures,
and rollback to a stored version.

Per-session figures (steps, loss, rank per module, queue) are served here, to the session's key only;
``/metrics`` carries server-wide aggregates and nothing that names a session.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from server.app.deps import AUTH, Owner, ServicesDep, StateDep
from server.app.errors import APIError
from server.errors import ClientError
from server.sessions import SESSION_ID_RE

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], dependencies=AUTH)


def _not_found(session_id: str, what: str = "session") -> APIError:
    return APIError(404, f"no {what} {session_id}", code="session_not_found", param="session_id")


@router.get("")
def list_sessions(services: ServicesDep, owner: Owner):
    return {"object": "list",
            "data": [{**s.describe(), "resident": True} for s in services.sessions.sessions(owner)]}


@router.get("/{session_id}")
def get_session(session_id: str, services: ServicesDep, owner: Owner):
    session = services.sessions.get(owner, session_id)
    if session is not None:
        return {**session.describe(), "resident": True, "history": list(session.history)}
    stored = services.sessions.describe_stored(owner, session_id) if SESSION_ID_RE.match(session_id) else None
    if stored is None:
        raise _not_found(session_id)
    return stored


@router.get("/{session_id}/stats")
def session_stats(session_id: str, services: ServicesDep, state: StateDep, owner: Owner):
    session = services.sessions.get(owner, session_id)
    if session is None:
        raise _not_found(session_id, "resident session")
    return {"object": "session.stats", "session_id": session.id, "adapter": session.adapter_name,
            "adapter_version": session.current().version, "feedback": session.feedback.stats(),
            "adaptation": adaptation_figures(state.metrics, session),
            "models": services.feedback.model_stats(owner)}


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    version: int = Field(ge=0)  # a version the store keeps (GET /v1/adapters lists them)


@router.post("/{session_id}/rollback")
def rollback_session(session_id: str, body: RollbackBody, services: ServicesDep, owner: Owner):
    """Serve stored version ``version`` of the session's adapter again, as its next version; its tabs are
    told (``rolled_back``). 404 for an unknown session or a version that is not stored."""
    try:
        session, message = services.sessions.rollback(owner, session_id, body.version)
    except ClientError as exc:
        if exc.code == "version_not_found":
            raise APIError(404, exc.message, code=exc.code, param="version") from None
        raise
    return {**session.describe(), "resident": True, "restored_version": message["restored_version"]}


def adaptation_figures(metrics, session) -> dict:
    """The session's adaptation figures: lifetime ``steps`` / ``last_loss`` (persisted with the session),
    the current rank per module, and what the metrics counted since it became resident (``resident``)."""
    desc = session.describe()
    return {"steps": desc["steps"], "last_loss": desc["last_loss"], "queue_depth": desc["queue_depth"],
            "dropped": desc["dropped"], "ranks": dict(desc["ranks"]), "mean_rank": desc["mean_rank"],
            "resident": metrics.figures.get(session) if metrics is not None else None}
