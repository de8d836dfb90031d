"""Client of a dynarank server: the IDE websocket (async and blocking) and the HTTP API.

No torch here: this package talks to the server only over the wire.
"""

from ide_client.backoff import Backoff
from ide_client.http_api import API, APIError, AsyncAPI
from ide_client.messages import (
    Ack,
    Adapted,
    CompletionDone,
    Error,
    Ready,
    Reconnected,
    Status,
)
from ide_client.session import AsyncSession, Completion, ConnectionLost, ProtocolError
from ide_client.sync import Session

__all__ = [
    "API", "APIError", "Ack", "Adapted", "AsyncAPI", "AsyncSession", "Backoff", "Completion", "CompletionDone",
    "ConnectionLost", "Error", "ProtocolError", "Ready", "Reconnected", "Session", "Status",
]
