"""One handler per error class, so no route spells out a status code for a failure."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from eztinker.engine.errors import ComputeError, ConflictError, EngineError, InvalidInputError, NotFoundError
from eztinker.models.api import ErrorBody, field_path
from eztinker.scheduler import QueueFullError


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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = field_path(tuple(first.get("loc", ())))
        detail = [{"field": field_path(tuple(e.get("loc", ()))), "message": e.get("msg")} for e in errors]
        return _error(422, f"{field}: {first.get('msg')}", field=field, detail=detail)

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

    @app.exception_handler(QueueFullError)
    async def _full(request: Request, exc: QueueFullError) -> JSONResponse:
        response = _error(429, str(exc), category="server")
        response.headers["Retry-After"] = "1"
        return response
