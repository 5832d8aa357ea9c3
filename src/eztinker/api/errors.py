"""One handler per error class, so no route spells out a status code for a failure."""

from __future__ import annotations

import math
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from eztinker.engine.errors import ComputeError, ConflictError, EngineError, InvalidInputError, NotFoundError
from eztinker.models.api import ErrorBody, field_path
from eztinker.scheduler import QueueFullError
from eztinker.service import QuotaExceededError


def _error(
    status: int,
    error: str,
    *,
    field: str | None = None,
    category: Literal["user", "server"] = "user",
    **extra: Any,
) -> JSONResponse:
    body = ErrorBody(error=error, field=field, category=category, **extra)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status)


def _invalid_fields(errors: list[Any]) -> JSONResponse:
    """A 422 naming the first invalid field, with every error in `detail`."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = field_path(tuple(first.get("loc", ())))
    detail = [{"field": field_path(tuple(e.get("loc", ()))), "message": e.get("msg")} for e in errors]
    return _error(422, f"{field}: {first.get('msg')}", field=field, detail=detail)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Framework errors (404 no such route, 405 wrong method) in the same shape as every other error."""
        category: Literal["user", "server"] = "server" if exc.status_code >= 500 else "user"
        response = _error(exc.status_code, str(exc.detail), category=category)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _invalid_fields(list(exc.errors()))

    @app.exception_handler(ValidationError)
    async def _model_validation(request: Request, exc: ValidationError) -> JSONResponse:
        """A model a route builds from what the caller sent (e.g. a wire field turned into a native
        request) is the caller's mistake too: a 422 naming the field, never a 500."""
        return _invalid_fields(list(exc.errors()))

    @app.exception_handler(InvalidInputError)
    async def _invalid(request: Request, exc: InvalidInputError) -> JSONResponse:
        return _error(422, str(exc), field=exc.field)

    @app.exception_handler(NotFoundError)
    async def _not_found(request: Request, exc: NotFoundError) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(ConflictError)
    async def _conflict(request: Request, exc: ConflictError) -> JSONResponse:
        return _error(409, str(exc))

    @app.exception_handler(ComputeError)
    async def _compute(request: Request, exc: ComputeError) -> JSONResponse:
        return _error(500, str(exc), category="server")

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(PermissionError)
    async def _auth(request: Request, exc: PermissionError) -> JSONResponse:
        return _error(401, str(exc))

    @app.exception_handler(QuotaExceededError)
    async def _quota(request: Request, exc: QuotaExceededError) -> JSONResponse:
        return _error(429, str(exc))

    @app.exception_handler(QueueFullError)
    async def _full(request: Request, exc: QueueFullError) -> JSONResponse:
        response = _error(429, str(exc), category="server")
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return response
