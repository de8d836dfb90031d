"""``/v1/sessions``: IDE sessions of this key, resident or stored, and their feedback stats."""

from __future__ import annotations

from fastapi import APIRouter

from server.app.deps import AUTH, Owner, ServicesDep
from server.app.errors import APIError
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
def session_stats(session_id: str, services: ServicesDep, owner: Owner):
    session = services.sessions.get(owner, session_id)
    if session is None:
        raise _not_found(session_id, "resident session")
    return {"object": "session.stats", "session_id": session.id, "adapter": session.adapter_name,
            "adapter_version": session.current().version, "feedback": session.feedback.stats(),
            "models": services.feedback.model_stats(owner)}
