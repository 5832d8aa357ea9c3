"""Who may reach what: the caller's identity, and the one ownership check the service and every facade use.

Every object a caller can name by id — runs, checkpoints, jobs and Tinker futures, sampler snapshots,
Tinker sessions and sampling sessions — carries the owner id of the key that made it (the key's hash;
None when the server runs without API keys). A caller reaches an object only if it owns it. An object
of another key is answered exactly like a missing one (`NotFoundError` with the same message), so ids
leak nothing. Retry and idempotency caches are keyed by owner too (`Access.key`), so a resent request
of one key can never be answered with another key's result. Sampler snapshots belong to the key that
took them (`claim_sampler`).

One exception, Tinker's: a checkpoint its owner published (`set_public`) is *readable* by every key —
sampled, trained from (create-from-state, `load_state`), described and downloaded — through
`readable_checkpoint`. Changing it (publish, TTL, delete) stays the owner's.
"""

from __future__ import annotations

import hashlib
import threading
from typing import TYPE_CHECKING, Any

from eztinker.engine.errors import ConflictError, NotFoundError
from eztinker.service import identity
from eztinker.service.errors import AuthenticationError
from eztinker.store.facade import FacadeState

if TYPE_CHECKING:
    from eztinker.engine import SamplerInfo
    from eztinker.store import CheckpointRecord, RunRecord, Store


# FacadeState namespace: "<run>/<name>" -> {} for each published checkpoint (absent: private)
PUBLIC_CHECKPOINTS = "checkpoint_public"


def hash_key(key: str) -> str:
    """The owner id of an API key: its SHA-256 (the key itself is never stored)."""
    return hashlib.sha256(key.encode()).hexdigest()


class Access:
    """The caller's identity from its key, and the ownership check on every object reached by id."""

    def __init__(self, api_keys: list[str] | tuple[str, ...] | set[str], store: Store) -> None:
        self.key_hashes = {hash_key(k) for k in api_keys}
        self.store = store
        self._durable = FacadeState(store)
        self._sampler_owners: dict[str, str | None] = {}  # sampler snapshot -> the key that took it
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether the server has API keys (without them every caller is the owner None)."""
        return bool(self.key_hashes)

    def owner_for_key(self, key: str | None) -> str | None:
        """The owner id of a request: its key's hash (None when auth is off), or that of the key a Tinker JWT
        was exchanged for (`identity`). Raises if the key or token is bad."""
        if key is not None and key.startswith(identity.JWT_PREFIX) and hash_key(key) not in self.key_hashes:
            return identity.owner_of(self, key)  # a token the SDK exchanged a key for
        if not self.enabled:
            return None
        if key is None or hash_key(key) not in self.key_hashes:
            raise AuthenticationError("a valid API key is required: send X-API-Key or Authorization: Bearer")
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

    def listing(self, caller: str | None) -> dict[str, Any]:
        """The store's listing arguments for what `caller` may see: its own, or everything without keys."""
        return {"owner": caller, "include_all": not self.enabled}

    # --- objects by id --------------------------------------------------------------------------------

    def run(self, run_id: str, caller: str | None) -> RunRecord:
        """The stored run `run_id`, if the caller may reach it."""
        record = self.store.get_run(run_id)
        if record is None:
            raise NotFoundError(f"no run {run_id!r}")
        self.require(record.owner, caller, f"no run {run_id!r}")
        return record

    def checkpoint(self, run_id: str, name: str, caller: str | None) -> CheckpointRecord:
        """Checkpoint `name` of run `run_id`, if the caller may reach the run."""
        self.run(run_id, caller)
        record = self.store.get_checkpoint(run_id, name)
        if record is None:
            raise NotFoundError(f"run {run_id!r} has no checkpoint named {name!r}")
        return record

    def readable_checkpoint(
        self, run_id: str, name: str, caller: str | None
    ) -> tuple[RunRecord, CheckpointRecord]:
        """Checkpoint `name` of run `run_id` and its run, to read: the caller's own, or one published."""
        record = self.store.get_checkpoint(run_id, name)
        run = self.store.get_run(run_id)
        if record is not None and run is not None and self.is_public(run_id, name):
            return run, record
        return self.run(run_id, caller), self.checkpoint(run_id, name, caller)

    def is_public(self, run_id: str, name: str) -> bool:
        return self._durable.get(PUBLIC_CHECKPOINTS, f"{run_id}/{name}") is not None

    def set_public(self, run_id: str, name: str, public: bool, caller: str | None) -> None:
        """Publish (every key may read it) or unpublish the caller's checkpoint."""
        self.checkpoint(run_id, name, caller)
        key = f"{run_id}/{name}"
        if public:
            self._durable.put(PUBLIC_CHECKPOINTS, key, {}, owner=caller)
        else:
            self._durable.delete(PUBLIC_CHECKPOINTS, key)

    def forget_checkpoint(self, run_id: str, name: str) -> None:
        """A deleted checkpoint is private again: a later one of the same name starts unpublished."""
        self._durable.delete(PUBLIC_CHECKPOINTS, f"{run_id}/{name}")

    # --- sampler snapshots ----------------------------------------------------------------------------

    def claim_sampler(self, sampler_id: str, caller: str | None) -> None:
        """Record `caller` as the owner of the snapshot about to be taken as `sampler_id`."""
        with self._lock:
            if self._sampler_owners.setdefault(sampler_id, caller) != caller:
                raise ConflictError(f"sampler id {sampler_id!r} is already in use")

    def sampler_owner(self, info: SamplerInfo) -> str | None:
        """Who took a snapshot: recorded when it was taken; else (a worker adopted after a restart) the
        owner of the run it was taken from."""
        if info.sampler_id in self._sampler_owners:
            return self._sampler_owners[info.sampler_id]
        record = self.store.get_run(info.run_id) if info.run_id else None
        return record.owner if record is not None else None

    def allows_sampler(self, info: SamplerInfo, caller: str | None) -> bool:
        return self.allows(self.sampler_owner(info), caller)
