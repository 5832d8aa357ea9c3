"""`FacadeState`: small durable records a facade keeps beside the core tables, in the same database.

The Tinker wire API needs a few things to outlive a restart that the engine's tables do not hold:
its sessions (for `list_sessions` / `get_session`), its sampling sessions made from checkpoints (so a
`SamplingClient` keeps working after the restart), checkpoint metadata set over REST (`public`, TTL),
and which job answers a request id when the two differ. Each is a JSON value under `(namespace, key)`,
written when it changes. The one per-op record is a Tinker sample's place in its client's completion queue
(`tinker_completions`: one insert at `asample`, one delete when delivered), so that a client waiting on a
sample hears after a restart that it failed; every other op writes nothing here.

The table lives in its own declarative base, created next to the core tables of a `Store`: adding it
changes nothing in them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, Double, String, delete, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from eztinker.store.db import Store


class _Base(DeclarativeBase):
    pass


class FacadeRow(_Base):
    __tablename__ = "facade_state"

    namespace: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(512), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(255), index=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Double, index=True)
    updated_at: Mapped[float] = mapped_column(Double)


@dataclass(frozen=True)
class FacadeRecord:
    key: str
    owner: str | None
    value: dict[str, Any]
    created_at: float


class FacadeState:
    """JSON values by (namespace, key) in the store's database. Thread-safe; each call is one transaction."""

    def __init__(self, store: Store) -> None:
        self._store = store
        _Base.metadata.create_all(store.engine)

    def put(self, namespace: str, key: str, value: dict[str, Any], owner: str | None = None) -> None:
        """Insert or replace the value (the owner and creation time of an existing record are kept)."""
        now = time.time()
        with self._store._write() as session:
            row = session.get(FacadeRow, (namespace, key))
            if row is None:
                session.add(
                    FacadeRow(
                        namespace=namespace, key=key, owner=owner, value=value, created_at=now, updated_at=now
                    )
                )
            else:
                row.value, row.updated_at = dict(value), now

    def update(self, namespace: str, key: str, **values: Any) -> dict[str, Any] | None:
        """Merge `values` into an existing record's value; None (and nothing written) if there is none."""
        with self._store._write() as session:
            row = session.get(FacadeRow, (namespace, key))
            if row is None:
                return None
            row.value, row.updated_at = {**row.value, **values}, time.time()
            return dict(row.value)

    def get(self, namespace: str, key: str) -> FacadeRecord | None:
        with self._store._read() as session:
            row = session.get(FacadeRow, (namespace, key))
            return None if row is None else _record(row)

    def records(
        self,
        namespace: str,
        *,
        owner: str | None = None,
        include_all: bool = False,
        prefix: str | None = None,
    ) -> list[FacadeRecord]:
        """The records of `namespace` (of `owner` unless `include_all`), oldest first."""
        query = select(FacadeRow).where(FacadeRow.namespace == namespace)
        if not include_all:
            query = query.where(FacadeRow.owner.is_(None) if owner is None else FacadeRow.owner == owner)
        if prefix is not None:
            query = query.where(FacadeRow.key.startswith(prefix, autoescape=True))
        with self._store._read() as session:
            rows = session.scalars(query.order_by(FacadeRow.created_at, FacadeRow.key))
            return [_record(row) for row in rows]

    def delete(self, namespace: str, key: str) -> None:
        with self._store._write() as session:
            row = session.get(FacadeRow, (namespace, key))
            if row is not None:
                session.delete(row)

    def delete_many(self, namespace: str, keys: Iterable[str] = (), *, prefix: str | None = None) -> None:
        """Delete the records `keys` and, with `prefix`, every record whose key starts with it: one write."""
        keys = list(keys)
        if not keys and prefix is None:
            return
        with self._store._write() as session:
            delete_in(session, namespace, keys, prefix=prefix)


def delete_in(
    session: Session, namespace: str, keys: Iterable[str] = (), *, prefix: str | None = None
) -> None:
    """`FacadeState.delete_many` inside the caller's transaction (`Store.delete_run(..., also=...)`)."""
    keys = list(keys)
    if keys:
        session.execute(delete(FacadeRow).where(FacadeRow.namespace == namespace, FacadeRow.key.in_(keys)))
    if prefix is not None:
        session.execute(
            delete(FacadeRow).where(
                FacadeRow.namespace == namespace, FacadeRow.key.startswith(prefix, autoescape=True)
            )
        )


def _record(row: FacadeRow) -> FacadeRecord:
    return FacadeRecord(key=row.key, owner=row.owner, value=dict(row.value), created_at=row.created_at)
