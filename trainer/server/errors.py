"""Errors as Google's APIs give them: ``{"error": {"code", "message", "status"}}`` with the HTTP
status of ``google.rpc.Code`` (Google's HTTP mapping), so google-api-core raises the matching
exception in a client."""

from __future__ import annotations

import logging
import traceback
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from trainer.errors import UserError
from trainer.settings import redact

log = logging.getLogger("trainer.server")

HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INTERNAL": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


class ApiError(Exception):
    """An answer other than success: a google.rpc status name and one line of message."""

    def __init__(self, status: str, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.http_status = http_status or HTTP_STATUS[status]


def error_body(
    status: str, message: str, http_status: int | None = None
) -> tuple[int, dict[str, Any]]:
    """The HTTP status and Google's error JSON of an answer, its message redacted."""
    code = http_status or HTTP_STATUS[status]
    return code, {"error": {"code": code, "message": redact(message), "status": status}}


def error_response(status: str, message: str, http_status: int | None = None) -> JSONResponse:
    code, body = error_body(status, message, http_status)
    return JSONResponse(body, status_code=code)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.message, error.http_status)

    @app.exception_handler(UserError)
    async def user_error(_: Request, error: UserError) -> JSONResponse:
        return error_response(error.status, str(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        # Starlette's own: a path no route has, a method a route does not take.
        if error.status_code == 405:
            text = f"{request.method} {request.url.path} is not a method of this API"
            return error_response("UNIMPLEMENTED", text)
        if error.status_code == 404:
            return error_response("NOT_FOUND", f"no resource or method at {request.url.path}")
        return error_response("INVALID_ARGUMENT", str(error.detail), error.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception) -> JSONResponse:
        # The traceback goes to the server's log; the client gets one line, redacted.
        log.error("%s %s failed:\n%s", request.method, request.url.path,
                  redact(traceback.format_exc()))  # fmt: skip
        return error_response("INTERNAL", f"{type(error).__name__}: {error}")
