"""The service's own exceptions; the engine's (`eztinker.engine.errors`) and the queue's
(`QueueFullError`) reach the facades as they are. `eztinker.api.errors` maps every class to its answer."""

from __future__ import annotations

from eztinker.engine.errors import ConflictError


class AuthenticationError(Exception):
    """The request has no API key, or one the server does not know (HTTP 401)."""


class InvalidTokenError(AuthenticationError):
    """The request's JWT (one the server minted for an API key) is malformed, expired or no longer valid
    (HTTP 401 with `WWW-Authenticate: Bearer error="invalid_token"`, RFC 6750: the Tinker SDK then exchanges
    its API key for a new token and replays the request once)."""


class QuotaExceededError(Exception):
    """The caller holds as much of a resource as one API key may (HTTP 429, without Retry-After)."""


class RunLostError(ConflictError):
    """The run's adapter is not in memory (the server restarted, or its worker died before any
    checkpoint): load a checkpoint to resume it."""
