"""OpenAI-style error responses: every failure leaves the server as {"error": {message, type, param, code}}.

Client mistakes map to 4xx (FastAPI's 422 becomes 400); only the server's own faults are 5xx.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from photoninfer.engine.async_engine import (
    EngineDeadError,
    QueueFullError,
    RequestFailedError,
    ServerShuttingDownError,
)
from photoninfer.errors import InvalidRequestError

logger = logging.getLogger(__name__)

# OpenAI's error "type" for each status we send.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """Raised by route code to answer with an OpenAI error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                   headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def engine_failure(exc: Exception) -> tuple[int, str]:
    """(HTTP status, error code) for an error the engine side raised for a request already accepted."""
    if isinstance(exc, ServerShuttingDownError):
        return 503, "server_shutting_down"
    if isinstance(exc, EngineDeadError):
        return 503, "engine_unavailable"
    return 500, "engine_error"


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param_path(loc: tuple) -> Optional[str]:
    """("body", "messages", 0, "role") -> "messages[0].role". Drops the leading "body" and the names
    pydantic gives union branches ("list[str]", "constrained-str", ...): they are not request fields."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in _TYPE_TAGS:
            path += f".{part}" if path else part
    return path or None


def validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    """Turns pydantic's error list into one readable sentence and the offending param.

    A field with a union type (stop: str | list[str]) fails once per branch. Of those errors the most
    telling is kept: one that is not just "wrong kind" (that branch matched the input's kind), the
    deepest first; same-place alternatives are joined with "or"."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"request body is not valid JSON: {detail}".rstrip(": "), None
    if loc == ("body",):
        if first.get("type") == "missing":
            return "request body is required and must be a JSON object", None
        return "request body must be a JSON object (send it with Content-Type: application/json)", None

    def path(error) -> str:
        return _param_path(tuple(error.get("loc", ()))) or ""

    def field(error) -> str:
        return path(error).split(".")[0].split("[")[0]

    group = [e for e in errors if field(e) == field(first)]
    specific = [e for e in group if not str(e.get("type", "")).endswith("_type")] or group
    depth = max(path(e).count(".") + path(e).count("[") for e in specific)
    chosen = [e for e in specific if path(e).count(".") + path(e).count("[") == depth]
    param = path(chosen[0]) or None
    reasons = list(dict.fromkeys(str(e.get("msg")) for e in chosen if path(e) == path(chosen[0])))
    message = f"{param}: {' or '.join(reasons)}" if param else " or ".join(reasons)
    others = len({field(e) for e in errors} - {field(first)})
    if others:
        message += f" (and problems in {others} more field{'s' if others > 1 else ''})"
    return message, param


def install_error_handlers(app: FastAPI, on_reject: Callable[[int], Any] = lambda status: None) -> None:
    """Registers the handlers that turn every exception into an OpenAI error body.

    `on_reject(status)` is told about each 4xx, so metrics can count rejected requests.
    """

    def reply(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
        if status < 500:
            on_reject(status)
        return error_response(status, message, param, code, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return reply(400, message, param)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return reply(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, exc: InvalidRequestError):
        return reply(400, str(exc), exc.param)

    @app.exception_handler(QueueFullError)
    async def _queue_full(request: Request, exc: QueueFullError):
        return reply(429, str(exc), None, "queue_full", headers={"Retry-After": "1"})

    @app.exception_handler(EngineDeadError)
    @app.exception_handler(RequestFailedError)
    async def _engine_failed(request: Request, exc: Exception):
        status, code = engine_failure(exc)
        return reply(status, str(exc), None, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route for {request.method} {request.url.path}"
        return reply(exc.status_code, message, None, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error while serving %s %s", request.method, request.url.path)
        return reply(500, f"internal server error: {type(exc).__name__}: {exc}", None, "internal_error")
