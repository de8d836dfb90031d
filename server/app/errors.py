"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

``install_error_handlers(app)`` makes every failure of the app (our own
``APIError``, FastAPI's validation errors, malformed JSON, Starlette's HTTP
exceptions, uncaught exceptions) come out in that shape, so OpenAI clients
raise their usual exception types.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.app.params import refusal
from server.engines.bridge import GenerationFailed
from server.errors import ClientError

log = logging.getLogger("dynarank.errors")

# OpenAI's error types by status; any other 4xx is an invalid request, any 5xx a server error.
_TYPE_BY_STATUS = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _TYPE_BY_STATUS.get(status, "invalid_request_error")


class APIError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or error_type(status)
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def from_client_error(exc: ClientError) -> APIError:
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return APIError(exc.status, exc.message, code=exc.code, param=exc.param, headers=headers)


def _validation_error(errors: list[dict]) -> APIError:
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, "The request body is not valid JSON.", code="invalid_json")
    # The field at fault, as the websocket's `complete` names it too (server/app/params.py).
    return from_client_error(refusal(errors))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(ClientError)
    async def _client_error(request: Request, exc: ClientError):
        return error_response(from_client_error(exc))

    @app.exception_handler(GenerationFailed)
    async def _generation_failed(request: Request, exc: GenerationFailed):
        log.error("event=generation_failed path=%s error=%s", request.url.path, exc.__cause__ or exc)
        return error_response(APIError(500, str(exc), code="generation_failed"))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(_validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        # FastAPI's 400: a body it could not parse, other than a JSON syntax error (a broken multipart form).
        code = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed",
                413: "request_too_large"}.get(exc.status_code)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(APIError(exc.status_code, message, code=code, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("event=unhandled_error path=%s", request.url.path)
        return error_response(APIError(500, "The server had an error while processing your request.",
                                       code="internal_error"))
