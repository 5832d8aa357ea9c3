"""Who may reach what: the one ownership check that the service and every facade use.

Every object a caller can name by id — runs, checkpoints, jobs and Tinker futures, sampler snapshots,
Tinker sessions and sampling sessions — carries the owner id of the key that made it (the key's hash;
None when the server runs without API keys). A caller reaches an object only if it owns it. An object
of another key is answered exactly like a missing one (`NotFoundError` with the same message), so ids
leak nothing. Retry and idempotency caches are keyed by owner too (`Access.key`), so a resent request
of one key can never be answered with another key's result.
"""

from __future__ import annotations

import hashlib

from eztinker.engine.errors import NotFoundError


def hash_key(key: str) -> str:
    """The owner id of an API key: its SHA-256 (the key itself is never stored)."""
    return hashlib.sha256(key.encode()).hexdigest()


class Access:
    """The caller's identity from its key, and the ownership check on every object reached by id."""

    def __init__(self, api_keys: list[str] | tuple[str, ...] | set[str]) -> None:
        self.key_hashes = {hash_key(k) for k in api_keys}

    @property
    def enabled(self) -> bool:
        """Whether the server has API keys (without them every caller is the owner None)."""
        return bool(self.key_hashes)

    def owner_for_key(self, key: str | None) -> str | None:
        """The owner id of a request: its key's hash (None when auth is off). Raises if the key is bad."""
        if not self.enabled:
            return None
        if key is None or hash_key(key) not in self.key_hashes:
            raise PermissionError("a valid API key is required: send X-API-Key or Authorization: Bearer")
        return hash_key(key)

    def allows(self, object_owner: str | None, caller: str | None) -> bool:
        """Whether `caller` may reach an object owned by `object_owner`."""
        return not self.enabled or object_owner == caller

    def require(self, object_owner: str | None, caller: str | None, missing: str) -> None:
        """Raise `NotFoundError(missing)` — the missing object's own message — unless `caller` may reach it."""
        if not self.allows(object_owner, caller):
            raise NotFoundError(missing)

    def key(self, caller: str | None, *parts: str) -> tuple[str, ...]:
        """A cache key of `caller`'s: the same parts sent by another key never hit it."""
        return (caller or "", *parts)
