"""`Store`: the server's durable state (runs, jobs, checkpoints, per-step metrics) in SQLite or PostgreSQL.

Why it looks like this:
- **Durability comes from small rows, not from tensors.** A job costs two writes (insert at submit,
  update at finish) and an optimizer step one (its metrics row, which also advances the run's step).
  Adapter weights reach the disk only through checkpoints, whose files the engine writes; the store
  keeps their index.
- **A crash loses nothing committed.** SQLite runs in WAL mode with `synchronous=NORMAL`: every commit
  survives the process being killed (`kill -9`); only a power cut can lose the last few. At startup the
  server calls `mark_active_runs_lost` (their adapters lived in the dead process's memory) and
  `fail_inflight_jobs` (no job is left "queued" or "running" forever).
- **Callers never hold a session.** Every method opens its own session and returns frozen records, so
  the store is safe to call from the event loop's threads and the worker threads at once. SQLite allows
  one writer at a time: a process-wide lock orders this process's writes (instead of letting threads
  spin on SQLITE_BUSY), and the busy timeout covers other processes. Readers never wait on writers (WAL).

URLs: `sqlite:///<path>` (see `sqlite_url`), `sqlite://` for a private in-memory database (tests), or
`postgresql://user:password@host/db`, which is read as `postgresql+psycopg://` (install the `postgres`
extra for psycopg 3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Generator
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Engine, create_engine, delete, event, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from eztinker.store.models import Base, CheckpointRow, JobRow, RunRow, StepMetricsRow
from eztinker.store.records import (
    INFLIGHT_JOB_STATUSES,
    CheckpointRecord,
    DuplicateError,
    ErrorCategory,
    JobRecord,
    JobStatus,
    RunRecord,
    RunStatus,
    StepMetricsRecord,
    UnknownRunError,
)

SQLITE_BUSY_TIMEOUT_S = 30.0
"""How long a SQLite write waits for another process's write lock before failing."""

_UNIQUE_VIOLATIONS = {"23505", "SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"}
_FOREIGN_KEY_VIOLATIONS = {"23503", "SQLITE_CONSTRAINT_FOREIGNKEY"}

R = TypeVar("R")


def sqlite_url(data_dir: Path) -> str:
    """The default database: `sqlite:///<data_dir>/eztinker.db` (absolute, so a later `chdir` is harmless)."""
    return f"sqlite:///{(Path(data_dir) / 'eztinker.db').resolve()}"


class Store:
    """The durable state of one server. Thread-safe; every method is one short transaction."""

    def __init__(self, url: str) -> None:
        """Connect to `url` and create the tables that are missing (existing rows are kept)."""
        self.engine = _create_engine(url)
        self.url = self.engine.url.render_as_string(hide_password=True)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        is_sqlite = self.engine.dialect.name == "sqlite"
        in_memory = is_sqlite and isinstance(self.engine.pool, StaticPool)
        # SQLite: one writer at a time. In memory: one shared connection, so readers take the lock too.
        self._write_lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if is_sqlite else contextlib.nullcontext()
        )
        self._read_lock = self._write_lock if in_memory else contextlib.nullcontext()
        Base.metadata.create_all(self.engine)

    def close(self) -> None:
        """Close every pooled connection. The store must not be used afterwards."""
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # --- runs ----------------------------------------------------------------------------------------

    def add_run(self, record: RunRecord) -> None:
        """Insert a run. Raises `DuplicateError` if the run id exists."""
        self._insert(RunRow(**dataclasses.asdict(record)), f"run {record.run_id!r}")

    def get_run(self, run_id: str) -> RunRecord | None:
        with self._read() as session:
            row = session.get(RunRow, run_id)
            return None if row is None else _record(RunRecord, row)

    def list_runs(self, owner: str | None = None, *, include_all: bool = False) -> list[RunRecord]:
        """The runs of `owner`, oldest first; `owner=None` means unowned runs (auth off).

        `include_all=True` lists every run whatever its owner (an admin view). Forgetting to pass an
        owner therefore shows nobody else's runs.
        """
        query = select(RunRow).order_by(RunRow.created_at, RunRow.run_id)
        if not include_all:
            query = query.where(RunRow.owner.is_(None) if owner is None else RunRow.owner == owner)
        with self._read() as session:
            return [_record(RunRecord, row) for row in session.scalars(query)]

    def update_run(
        self,
        run_id: str,
        *,
        step: int | None = None,
        status: RunStatus | None = None,
        last_loss: float | None = None,
        num_parameters: int | None = None,
    ) -> bool:
        """Set the given fields (None leaves a field as it is) and `updated_at`. False if no such run."""
        values: dict[str, Any] = {"updated_at": time.time()}
        for name, value in (
            ("step", step),
            ("status", status),
            ("last_loss", last_loss),
            ("num_parameters", num_parameters),
        ):
            if value is not None:
                values[name] = value
        with self._write() as session:
            result = session.execute(update(RunRow).where(RunRow.run_id == run_id).values(**values))
            return _rowcount(result) > 0

    def delete_run(self, run_id: str, *, also: Callable[[Session], object] | None = None) -> bool:
        """Delete a run with its checkpoint rows and metrics (the job history stays). False if absent.

        Only the rows: removing the checkpoint directories is the caller's business. `also(session)`
        deletes what else belongs to the run (a facade's records of it) in the same transaction, so that
        a crash keeps either all of it or none.
        """
        with self._write() as session:
            # Explicit child deletes as well as ON DELETE CASCADE: a database someone opened with
            # foreign keys off must not keep orphans.
            session.execute(delete(CheckpointRow).where(CheckpointRow.run_id == run_id))
            session.execute(delete(StepMetricsRow).where(StepMetricsRow.run_id == run_id))
            if also is not None:
                also(session)
            return _rowcount(session.execute(delete(RunRow).where(RunRow.run_id == run_id))) > 0

    def mark_active_runs_lost(self, keep: Collection[str] = ()) -> list[str]:
        """At startup: every `active` run becomes `lost` (its adapter died with the old process), but
        those in `keep` (adapters that outlived it, on Ray workers).

        Returns the ids marked. `load_checkpoint` on a lost run makes it active again (`update_run`).
        """
        with self._write() as session:
            active = session.scalars(select(RunRow.run_id).where(RunRow.status == "active"))
            run_ids = [run_id for run_id in active if run_id not in keep]
            if run_ids:
                session.execute(
                    update(RunRow)
                    .where(RunRow.run_id.in_(run_ids))
                    .values(status="lost", updated_at=time.time())
                )
            return run_ids

    # --- jobs ----------------------------------------------------------------------------------------

    def add_job(self, record: JobRecord) -> None:
        """Insert a job (at submit). Raises `DuplicateError` if the job id exists."""
        self._insert(JobRow(**dataclasses.asdict(record)), f"job {record.job_id!r}")

    def finish_job(
        self,
        job_id: str,
        *,
        status: JobStatus,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        error_category: ErrorCategory | None = None,
        started_at: float | None = None,
        finished_at: float | None = None,
    ) -> bool:
        """Record a job's outcome: the job's second and last write. False if no such job.

        `finished_at` defaults to now. There is deliberately no "started" write: a job that was running
        when the server died is still found, as `queued`, by `fail_inflight_jobs`.
        """
        values = {
            "status": status,
            "result": result,
            "error": error,
            "error_category": error_category,
            "started_at": started_at,
            "finished_at": time.time() if finished_at is None else finished_at,
        }
        with self._write() as session:
            return (
                _rowcount(session.execute(update(JobRow).where(JobRow.job_id == job_id).values(**values))) > 0
            )

    def get_job(self, job_id: str) -> JobRecord | None:
        with self._read() as session:
            row = session.get(JobRow, job_id)
            return None if row is None else _record(JobRecord, row)

    def list_jobs(self, run_id: str | None = None, limit: int = 100) -> list[JobRecord]:
        """The newest `limit` jobs, newest first; only those of `run_id` if given."""
        query = select(JobRow).order_by(JobRow.created_at.desc(), JobRow.job_id.desc()).limit(limit)
        if run_id is not None:
            query = query.where(JobRow.run_id == run_id)
        with self._read() as session:
            return [_record(JobRecord, row) for row in session.scalars(query)]

    def fail_inflight_jobs(self, reason: str) -> int:
        """At startup: every queued or running job becomes failed with `error=reason`, category "server".

        Returns how many. Their clients see a clear failure instead of a job that never finishes.
        """
        with self._write() as session:
            result = session.execute(
                update(JobRow)
                .where(JobRow.status.in_(INFLIGHT_JOB_STATUSES))
                .values(status="failed", error=reason, error_category="server", finished_at=time.time())
            )
            return _rowcount(result)

    # --- checkpoints ---------------------------------------------------------------------------------

    def add_checkpoint(self, record: CheckpointRecord) -> None:
        """Index a saved checkpoint.

        Raises `DuplicateError` if the run already has a checkpoint of that name, `UnknownRunError` if
        the run is not in the store.
        """
        what = f"checkpoint {record.name!r} of run {record.run_id!r}"
        self._insert(CheckpointRow(**dataclasses.asdict(record)), what)

    def replace_checkpoint(self, record: CheckpointRecord) -> None:
        """Index a checkpoint in place of the run's one of that name (if any), in one transaction."""
        try:
            with self._write() as session:
                session.merge(CheckpointRow(**dataclasses.asdict(record)))
        except IntegrityError as exc:
            raise _integrity_error(exc, f"checkpoint {record.name!r} of run {record.run_id!r}") from exc

    def get_checkpoint(self, run_id: str, name: str) -> CheckpointRecord | None:
        with self._read() as session:
            row = session.get(CheckpointRow, (run_id, name))
            return None if row is None else _record(CheckpointRecord, row)

    def list_checkpoints(
        self, run_id: str | None = None, owner: str | None = None, *, include_all: bool = False
    ) -> list[CheckpointRecord]:
        """Checkpoints of `owner` (None: unowned ones), oldest first; only `run_id`'s if given.

        `owner` and `include_all` mean what they mean in `list_runs`.
        """
        query = select(CheckpointRow).order_by(CheckpointRow.created_at, CheckpointRow.name)
        if run_id is not None:
            query = query.where(CheckpointRow.run_id == run_id)
        if not include_all:
            query = query.where(
                CheckpointRow.owner.is_(None) if owner is None else CheckpointRow.owner == owner
            )
        with self._read() as session:
            return [_record(CheckpointRecord, row) for row in session.scalars(query)]

    def delete_checkpoint(self, run_id: str, name: str) -> bool:
        """Remove a checkpoint's row (not its files). False if there was none."""
        with self._write() as session:
            result = session.execute(
                delete(CheckpointRow).where(CheckpointRow.run_id == run_id, CheckpointRow.name == name)
            )
            return _rowcount(result) > 0

    # --- metrics -------------------------------------------------------------------------------------

    def add_step_metrics(self, record: StepMetricsRecord) -> None:
        """Record one optimizer step, and advance the run's `step` (and `last_loss`, if a loss is given).

        Both in one transaction, so after a crash the run's step and its metrics agree. Raises
        `UnknownRunError` if the run is not in the store (e.g. deleted while the step ran).
        """
        values: dict[str, Any] = {"step": record.step, "updated_at": time.time()}
        if record.loss is not None:
            values["last_loss"] = record.loss
        with self._write() as session:
            result = session.execute(update(RunRow).where(RunRow.run_id == record.run_id).values(**values))
            if _rowcount(result) == 0:
                raise UnknownRunError(f"metrics of run {record.run_id!r}: no such run")
            session.add(StepMetricsRow(**dataclasses.asdict(record)))

    def get_step_metrics(self, run_id: str) -> list[StepMetricsRecord]:
        """A run's metrics ordered by step (a step recorded twice, after a resume, in recording order)."""
        query = (
            select(StepMetricsRow)
            .where(StepMetricsRow.run_id == run_id)
            .order_by(StepMetricsRow.step, StepMetricsRow.id)
        )
        with self._read() as session:
            return [_record(StepMetricsRecord, row) for row in session.scalars(query)]

    # --- plumbing ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Generator[Session, None, None]:
        """A session in a transaction, committed on exit (rolled back on an exception)."""
        with self._write_lock, self._sessions.begin() as session:
            yield session

    @contextlib.contextmanager
    def _read(self) -> Generator[Session, None, None]:
        with self._read_lock, self._sessions() as session:
            yield session

    def _insert(self, row: Base, what: str) -> None:
        try:
            with self._write() as session:
                session.add(row)
        except IntegrityError as exc:
            raise _integrity_error(exc, what) from exc


def _integrity_error(exc: IntegrityError, what: str) -> Exception:
    """What a failed write of `what` means: `DuplicateError`, `UnknownRunError` (its run is gone), or
    the database's own error."""
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "sqlite_errorname", None)
    if code in _UNIQUE_VIOLATIONS:
        return DuplicateError(f"{what} already exists")
    if code in _FOREIGN_KEY_VIOLATIONS:
        return UnknownRunError(f"{what}: no such run")
    return exc


def _create_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.drivername == "postgresql":  # SQLAlchemy's default driver is psycopg2; we use psycopg 3
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)

    kwargs: dict[str, Any] = {
        "connect_args": {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
    }
    if parsed.database in (None, "", ":memory:"):
        kwargs["poolclass"] = StaticPool  # every session must see the same in-memory database
    else:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, **kwargs)
    event.listen(engine, "connect", _configure_sqlite_connection)
    return engine


def _configure_sqlite_connection(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    """Per connection: WAL (readers don't block the writer), NORMAL sync (durable against a killed
    process, one fsync per checkpoint of the WAL rather than per commit), foreign keys enforced."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    finally:
        cursor.close()


def _record(cls: type[R], row: Base) -> R:
    """An ORM row as its record: the record's field names are the row's column names."""
    names = [f.name for f in dataclasses.fields(cast(Any, cls))]
    return cls(**{name: getattr(row, name) for name in names})


def _rowcount(result: object) -> int:
    """Rows matched by an UPDATE or DELETE (`Session.execute` is typed as returning a plain `Result`)."""
    return cast(CursorResult[Any], result).rowcount
