"""The one error type for a client's mistake, shared by every layer below the app.

Sessions, the websocket protocol and feedback raise ``ClientError(code, message)``.
The websocket sends it as an ``error`` message; HTTP routes answer it with
``status`` in OpenAI's error shape (``server/app/errors.py``).
"""

from __future__ import annotations

# HTTP status of the codes that are not a plain 400.
_STATUS = {"unknown_completion": 404, "session_not_found": 404, "model_not_found": 404, "duplicate_feedback": 409,
           "contradictory_feedback": 409, "unauthorized": 401, "too_many_requests": 429,
           "too_many_sessions": 429, "too_many_connections": 429}


class ClientError(Exception):
    def __init__(self, code: str, message: str, *, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param  # the request field at fault, when there is one
        self.status = _STATUS.get(code, 400)
