"""The client's exceptions, one tree.

```
EZTinkerError                    every error the client raises on purpose (.message, .field, .response)
├── APIStatusError               the server answered 4xx/5xx (.status_code, .category, .detail)
│   ├── BadRequestError          400
│   ├── AuthenticationError      401, 403: no API key, or a wrong one
│   ├── NotFoundError            404: no such run, job or checkpoint (also a LookupError)
│   ├── ConflictError            409: a name already taken, a run `lost` after a restart
│   ├── ValidationError          422: the request's fields are invalid (also an InvalidRequestError)
│   ├── RateLimitError           429: the queue is full (.retry_after, seconds)
│   └── ServerError              5xx
├── APIConnectionError           no answer: the server is down or unreachable (.request)
│   └── APITimeoutError          no answer within the timeout (also a TimeoutError)
├── InvalidRequestError          the client refused the arguments before sending (.field; also a ValueError)
├── JobFailedError               a job finished `failed` (.job, .job_id, .category)
├── JobTimeoutError              `JobFuture.result(timeout=...)` ran out first; the job goes on (also a TimeoutError)
└── ClientClosedError            the client was used after `close()` (also a RuntimeError)
```

`.message` is the server's own `error` text and `.field` the request field it names (None when the error
is not about one field); `str(exc)` puts the status, the message and the field on one line. Every
`APIStatusError` keeps the `httpx.Response` it came from.

Arguments the client can reject before sending anything (a batch of the wrong shape, a prompt that is
neither text nor tokens) raise the stdlib's `TypeError` / `ValueError`, as httpx does; request bodies
are built with the shared pydantic schemas; a field they refuse raises `InvalidRequestError` naming it.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any, Literal

import httpx

from eztinker.models.api import ErrorBody, Job

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ClientClosedError",
    "ConflictError",
    "EZTinkerError",
    "InvalidRequestError",
    "JobFailedError",
    "JobTimeoutError",
    "NotFoundError",
    "RateLimitError",
    "ServerError",
    "ValidationError",
    "error_from_response",
    "retry_after_seconds",
]


class EZTinkerError(Exception):
    """Root of every error the client raises on purpose."""

    def __init__(
        self, message: str, *, field: str | None = None, response: httpx.Response | None = None
    ) -> None:
        self.message = message
        self.field = field
        self.response = response
        super().__init__(message if field is None else f"{message} (field: {field})")


class APIStatusError(EZTinkerError):
    """The server answered with an error status; `category` says whose fault it is ("user" or "server")."""

    status_code: int

    def __init__(
        self,
        message: str,
        *,
        response: httpx.Response,
        field: str | None = None,
        category: str = "user",
        detail: list[dict[str, Any]] | None = None,
    ) -> None:
        self.status_code = response.status_code
        self.category = category
        self.detail = detail
        super().__init__(message, field=field, response=response)
        where = "" if field is None else f" (field: {field})"
        self.args = (f"{response.status_code} {response.reason_phrase}: {message}{where}",)


class BadRequestError(APIStatusError):
    """400: the server cannot use the request as sent."""


class AuthenticationError(APIStatusError):
    """401 / 403: pass `api_key=` (or set EZTINKER_API_KEY) with a key the server knows."""


class NotFoundError(APIStatusError, LookupError):
    """404: no such run, job or checkpoint (or it belongs to another API key)."""


class ConflictError(APIStatusError):
    """409: the name is already taken, or the run is `lost` and needs a checkpoint loaded."""


class InvalidRequestError(EZTinkerError, ValueError):
    """The request is invalid: refused by the client before sending, or by the server (`ValidationError`).

    `.field` names the first offending field, e.g. `lora_config.r`.
    """


class ValidationError(APIStatusError, InvalidRequestError):
    """422: a field of the request is invalid; `.field` names it and `.detail` has every problem."""


class RateLimitError(APIStatusError):
    """429: the server's queue is full. `.retry_after` is the server's suggested wait in seconds, if any."""

    def __init__(self, message: str, *, response: httpx.Response, **kwargs: Any) -> None:
        super().__init__(message, response=response, **kwargs)
        self.retry_after = retry_after_seconds(response)


class ServerError(APIStatusError):
    """5xx: the server failed; retry later or report it."""


class APIConnectionError(EZTinkerError):
    """The request got no answer: the server is not running, not reachable, or dropped the connection."""

    def __init__(self, message: str, *, request: httpx.Request | None = None) -> None:
        self.request = request
        super().__init__(message)


class APITimeoutError(APIConnectionError, TimeoutError):
    """The request got no answer within the client's timeout."""


class JobFailedError(EZTinkerError):
    """The job finished with status `failed`. `.job` is the final `Job`, with its `error` and `error_category`."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.job_id = job.job_id
        self.category = job.error_category
        message = job.error or "the job failed without a message"
        super().__init__(message)
        self.args = (f"job {job.job_id} ({job.op}) failed: {message}",)


class JobTimeoutError(EZTinkerError, TimeoutError):
    """`result(timeout=...)` returned before the job finished. The job itself keeps running on the server."""


class ClientClosedError(EZTinkerError, RuntimeError):
    """The client was used after `close()`."""


_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    422: ValidationError,
    429: RateLimitError,
}


def error_from_response(response: httpx.Response) -> APIStatusError:
    """The exception for an error response, carrying the server's `ErrorBody` message and field.

    Reads FastAPI's default `{"detail": ...}` bodies and non-JSON bodies too, so a proxy's error page
    still becomes a readable exception.
    """
    cls = _STATUS_ERRORS.get(response.status_code)
    if cls is None:
        cls = ServerError if response.status_code >= 500 else APIStatusError
    body = _error_body(response)
    return cls(body.error, response=response, field=body.field, category=body.category, detail=body.detail)


def _error_body(response: httpx.Response) -> ErrorBody:
    category: Literal["user", "server"] = "server" if response.status_code >= 500 else "user"
    try:
        payload = response.json()
    except ValueError:
        text = response.text.strip()
        return ErrorBody(error=text[:500] or response.reason_phrase, category=category)
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        try:
            return ErrorBody.model_validate(payload)
        except ValueError:
            return ErrorBody(error=payload["error"], category=category)
    detail = payload.get("detail") if isinstance(payload, dict) else None
    if isinstance(detail, str):
        return ErrorBody(error=detail, category=category)
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):  # FastAPI's validation errors
        first = detail[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        return ErrorBody(
            error=str(first.get("msg", "invalid request")),
            field=".".join(loc) or None,
            category=category,
            detail=[d for d in detail if isinstance(d, dict)],
        )
    return ErrorBody(error=str(payload)[:500], category=category)


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The `Retry-After` header in seconds (it may be a number or an HTTP date), or None."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
