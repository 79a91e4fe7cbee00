"""Request errors and their JSON bodies in each API's own format.

Every route answers bad input with a 4xx JSON error shaped like the API it imitates: Anthropic's
`{"type": "error", "error": {"type", "message"}}` under /v1/messages, OpenAI's
`{"error": {"message", "type", "param", "code"}}` everywhere else.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("mlx_dsv4.server")


class RequestError(ValueError):
    """Bad input: the message names the offending field; `status` is the HTTP status (4xx)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


_ANTHROPIC_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                    429: "rate_limit_error", 503: "overloaded_error"}


def is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_response(path: str, message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    if is_anthropic(path):
        kind = _ANTHROPIC_KINDS.get(status, "api_error" if status >= 500 else "invalid_request_error")
        body = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        code = {401: "invalid_api_key", 404: "not_found", 413: "request_too_large"}.get(status)
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers={"www-authenticate": "Bearer"} if status == 401 else None)


def sse_error(path: str, message: str) -> dict:
    """The error object sent inside an event stream once the 200 status line is out."""
    if is_anthropic(path):
        return {"type": "error", "error": {"type": "api_error", "message": message}}
    return {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        return error_response(request.url.path, str(e), e.status, e.param)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):  # unknown route, wrong method
        return error_response(request.url.path, f"{request.method} {request.url.path}: {e.detail}", e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return error_response(request.url.path, str(e.errors()[:3]), 400)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):  # a bug, not bad input: still JSON in the API's format
        log.exception("internal error on %s", request.url.path)
        return error_response(request.url.path, f"internal error: {type(e).__name__}: {e}", 500)
