"""One table maps every error class to its answer, and every facade answers from it.

| class                            | status | category | OpenAI type / code                    | Anthropic type        |
| -------------------------------- | ------ | -------- | ------------------------------------- | --------------------- |
| `InvalidInputError`, validation  | 422 ¹  | user     | invalid_request_error                 | invalid_request_error |
| `NotFoundError`                  | 404    | user     | invalid_request_error / model_not_found | not_found_error     |
| `ConflictError` (`RunLostError`) | 409    | user     | invalid_request_error / conflict      | invalid_request_error |
| `ComputeError`                   | 500    | server   | server_error                          | api_error             |
| other `EngineError`              | 400    | user     | invalid_request_error                 | invalid_request_error |
| `AuthenticationError`            | 401    | user     | authentication_error / invalid_api_key | authentication_error |
| `QuotaExceededError`             | 429    | user     | rate_limit_error / rate_limit_exceeded | rate_limit_error     |
| `QueueFullError`                 | 429 ²  | server   | rate_limit_error / rate_limit_exceeded | overloaded_error     |

¹ 400 on the OpenAI routes, as OpenAI answers. ² With `Retry-After`.

The native API answers with an `ErrorBody`; the OpenAI routes with OpenAI's error object; the Tinker
wire with a failed future `{"error", "category"}` (HTTP 200). No route spells out a status code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from eztinker.engine.errors import ComputeError, ConflictError, EngineError, InvalidInputError, NotFoundError
from eztinker.models.api import ErrorBody, field_path
from eztinker.scheduler import QueueFullError
from eztinker.service.errors import AuthenticationError, InvalidTokenError, QuotaExceededError

Category = Literal["user", "server"]


@dataclass(frozen=True)
class ErrorKind:
    status: int
    category: Category
    openai_type: str
    anthropic_type: str
    openai_code: str | None = None
    openai_status: int | None = None  # where OpenAI's status differs from the native one

    @property
    def status_for_openai(self) -> int:
        return self.openai_status or self.status


_INVALID = ErrorKind(422, "user", "invalid_request_error", "invalid_request_error", openai_status=400)

# Most specific first: an error takes the first row whose class it is an instance of.
ERROR_TABLE: tuple[tuple[type[Exception], ErrorKind], ...] = (
    (InvalidInputError, _INVALID),
    (RequestValidationError, _INVALID),
    (ValidationError, _INVALID),  # a model a route builds from what the caller sent: the caller's mistake
    (NotFoundError, ErrorKind(404, "user", "invalid_request_error", "not_found_error", "model_not_found")),
    (ConflictError, ErrorKind(409, "user", "invalid_request_error", "invalid_request_error", "conflict")),
    (ComputeError, ErrorKind(500, "server", "server_error", "api_error")),
    (EngineError, ErrorKind(400, "user", "invalid_request_error", "invalid_request_error")),
    (
        AuthenticationError,
        ErrorKind(401, "user", "authentication_error", "authentication_error", "invalid_api_key"),
    ),
    (
        QuotaExceededError,
        ErrorKind(429, "user", "rate_limit_error", "rate_limit_error", "rate_limit_exceeded"),
    ),
    (QueueFullError, ErrorKind(429, "server", "rate_limit_error", "overloaded_error", "rate_limit_exceeded")),
)
_INTERNAL = ErrorKind(500, "server", "server_error", "api_error")


def error_kind(exc: BaseException) -> ErrorKind:
    """The table's row for `exc`; an error the table does not name is the server's (500)."""
    if isinstance(exc, StarletteHTTPException):  # a framework answer (404 no such route, 405 ...)
        category: Category = "server" if exc.status_code >= 500 else "user"
        return ErrorKind(exc.status_code, category, "invalid_request_error", "invalid_request_error")
    for cls, kind in ERROR_TABLE:
        if isinstance(exc, cls):
            return kind
    return _INTERNAL


def error_message(exc: BaseException) -> tuple[str, str | None, list[dict[str, Any]] | None]:
    """(message, the field it names, every problem) of an error, as each facade reports it."""
    if isinstance(exc, RequestValidationError | ValidationError):
        errors = list(exc.errors())
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = field_path(tuple(first.get("loc", ())))
        detail = [{"field": field_path(tuple(e.get("loc", ()))), "message": e.get("msg")} for e in errors]
        return f"{field}: {first.get('msg')}", field, detail
    if isinstance(exc, InvalidInputError):
        return str(exc), exc.field, None
    if isinstance(exc, StarletteHTTPException):
        return str(exc.detail), None, None
    if error_kind(exc) is _INTERNAL:
        return f"internal error: {type(exc).__name__}: {exc}", None, None
    return str(exc), None, None


def error_headers(exc: BaseException) -> dict[str, str]:
    """The headers an error answers with: a full queue's `Retry-After` (whole seconds, at least 1); a
    rejected JWT's `WWW-Authenticate` (RFC 6750's invalid_token, on which the Tinker SDK gets a new token)."""
    if isinstance(exc, QueueFullError):
        return {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    if isinstance(exc, InvalidTokenError):
        return {"WWW-Authenticate": 'Bearer error="invalid_token"'}
    return {}


def failure(exc: BaseException) -> tuple[str, Category]:
    """(message, category) of an op refused or failed: how a Tinker future reports it."""
    message, _, _ = error_message(exc)
    return message, error_kind(exc).category


def native_response(exc: BaseException) -> JSONResponse:
    """An `ErrorBody` with the table's status (and the framework's or the queue's headers)."""
    kind = error_kind(exc)
    message, field, detail = error_message(exc)
    body = ErrorBody(error=message, field=field, category=kind.category, detail=detail)
    response = JSONResponse(body.model_dump(exclude_none=True), status_code=kind.status)
    response.headers.update(error_headers(exc))
    if isinstance(exc, StarletteHTTPException):
        response.headers.update(exc.headers or {})
    return response


def openai_response(exc: BaseException) -> JSONResponse:
    """OpenAI's error object with the table's OpenAI type and status; `param` names the field."""
    kind = error_kind(exc)
    message, field, _ = error_message(exc)
    error = {"message": message, "type": kind.openai_type, "param": field, "code": kind.openai_code}
    return JSONResponse({"error": error}, status_code=kind.status_for_openai, headers=error_headers(exc))


_HANDLED: Sequence[type[Exception]] = (StarletteHTTPException, *(cls for cls, _ in ERROR_TABLE))


def install_error_handlers(app: FastAPI) -> None:
    """Every error answered with `native_response` (the OpenAI and Anthropic routes answer for themselves)."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return native_response(exc)

    for cls in _HANDLED:
        app.add_exception_handler(cls, handle)
    # Anything else is a bug of ours: still answered as JSON (`internal error: <type>: <message>`, category
    # server) rather than Starlette's plain-text page, so every client can read it. Starlette logs it too.
    app.add_exception_handler(Exception, handle)
