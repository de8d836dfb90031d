"""The command line's failures as one line with the fix: no server, a refused key, an unknown session."""

from __future__ import annotations

import httpx
import websockets

from ide_client.http_api import APIError
from ide_client.session import ConnectionLost, ProtocolError

# Codes by which the server says it does not know the session we asked for.
UNKNOWN_SESSION = {"invalid_resume_token", "session_not_found", "invalid_session_id"}


def unreachable(exc: BaseException) -> bool:
    """A failure to talk to the server at all (refused, unresolvable, timed out, not a dynarank server)."""
    if isinstance(exc, (httpx.TransportError, websockets.InvalidHandshake, websockets.InvalidURI, ConnectionLost)):
        return True
    # Socket errors carry no file name; a missing or unreadable local file does.
    return isinstance(exc, OSError) and exc.filename is None


def explain(exc: BaseException, server: str, api_key: str | None) -> str | None:
    """The one-line message for ``exc``, or None when it is none of these failures."""
    if unreachable(exc):
        return f"cannot reach the dynarank server at {server}: start it with `dynarank serve` or pass --server"
    status = exc.status if isinstance(exc, APIError) else None
    code = exc.code if isinstance(exc, (APIError, ProtocolError)) else None
    if status == 401 or code == "unauthorized":
        problem = "refused the API key" if api_key else "needs an API key"
        return f"the server at {server} {problem}: set DYNARANK_API_KEY or pass --api-key"
    if code in UNKNOWN_SESSION:
        detail = exc.message or code
        return (f"the server at {server} does not know that session ({detail}): check --session/--resume, "
                f"or leave them out to use the saved session, or pass --new-session")
    return None
