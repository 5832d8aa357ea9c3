"""`Job` (a future with a status) and what the scheduler needs to know about one: how it may execute
with others (`Batchable`), and how it completes later (`Deferred`). `Scheduler` is `scheduler.queue`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from eztinker.engine.errors import EngineError

log = logging.getLogger(__name__)

JobStatus = Literal["queued", "running", "completed", "failed"]
R = TypeVar("R")
V = TypeVar("V")
# A job's result: the op's typed result (see `eztinker.service.results`), or a JSON dict. The scheduler
# only hands it on.
JobResult = Any


class QueueFullError(Exception):
    """The queue is at its bound: the caller should retry after `retry_after` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Batchable:
    """How a job can execute together with others.

    Jobs with equal `kind` and `group` (e.g. "train" on one base model) may share a pass: the scheduler
    hands their `request`s to the runner registered for `kind`, which returns one outcome per request
    (a value or an exception), and each job's `finish` turns its outcome into the job's result.
    """

    kind: str
    group: str
    request: Any
    finish: Callable[[Any], JobResult | Deferred]


PassRunner = Callable[[list[Any]], Sequence[Any]]  # requests -> one outcome (value or exception) each
Completion = Callable[[JobResult | BaseException], None]


@dataclass(frozen=True)
class Deferred:
    """Returned by a job's `fn` or `finish` when its result comes later: the scheduler calls
    `start(complete)` at once, and the job completes when `complete(result or exception)` is called
    (from any thread). Until then the job is running and its run's next jobs wait."""

    start: Callable[[Completion], None]


def when_done(future: concurrent.futures.Future[V], then: Callable[[V], R]) -> R | Deferred:
    """A job's result from the future of its op: `then(value)` now if the op has computed (it raises
    the op's error, failing the job), else a `Deferred` that completes the job when the future does."""
    if future.done():
        return then(future.result())
    return Deferred(lambda complete: complete_when_done(future, then, complete))


def complete_when_done(
    future: concurrent.futures.Future[V], then: Callable[[V], R], complete: Completion
) -> None:
    """Call `complete(then(value))` — or `complete(error)` — once `future` is done."""

    def done(settled: concurrent.futures.Future[V]) -> None:
        try:
            result = then(settled.result())
        except Exception as exc:
            complete(exc)
        else:
            complete(result)

    future.add_done_callback(done)


class Background(Protocol):
    """Work the workers do between passes, one short step at a time (the sampling engines)."""

    @property
    def has_work(self) -> bool: ...

    def step(self) -> None: ...


@dataclass
class Job:
    """One submitted op. `future` resolves (never raises) when the job completes or fails."""

    op: str
    run_id: str | None
    fn: Callable[[], JobResult | Deferred]  # executes the job on its own
    owner: str | None = None
    tokens: int = 0  # its work in tokens: the unit of fairness, pass budgets and start estimates
    batch: Batchable | None = None
    job_id: str = field(default_factory=lambda: f"job-{uuid.uuid4().hex}")
    status: JobStatus = "queued"
    result: JobResult | None = None
    error: str | None = None
    error_category: Literal["user", "server"] | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    compute_seconds: float | None = None
    pass_size: int | None = None  # how many jobs executed in its pass
    future: concurrent.futures.Future[Job] = field(default_factory=concurrent.futures.Future)
    bypassed: bool = False  # once let another kind's larger pass go first (see `Scheduler._realign`)
    start_tag: float = 0.0  # fair-queueing order (set on submit)
    seq: int = 0
    shared: bool = False  # may run beside its run's other shared jobs (reads of the run, e.g. samples)
    deferred: bool = False  # its result comes later (see `Deferred`)
    pass_closed: bool = False  # its pass has ended (a deferred job may still be running)

    @property
    def done(self) -> bool:
        return self.status in ("completed", "failed")

    @property
    def queue_key(self) -> str:
        """Jobs with one key execute one at a time, in order: a run's ops; a run-less job is its own key."""
        return self.run_id if self.run_id is not None else self.job_id

    def settle(
        self, result: JobResult | None, error: str | None, category: Literal["user", "server"] | None
    ) -> None:
        """Record the job's outcome (its result, or an error and whose fault it is); wake its waiters."""
        self.result, self.error, self.error_category = result, error, category
        self.finished_at = time.time()
        self.status = "failed" if error is not None else "completed"
        self.future.set_result(self)

    async def wait(self, timeout: float | None) -> bool:
        """Wait (without blocking the event loop) until done or `timeout` seconds; True if done."""
        if self.done:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self.future)), timeout)
        except TimeoutError:
            return False
        return True

    def wait_sync(self, timeout: float | None = None) -> bool:
        try:
            self.future.result(timeout)
        except concurrent.futures.TimeoutError:
            return False
        return True


@dataclass(frozen=True)
class QueueEntry:
    """A job waiting or running, as `Scheduler.snapshot` reports it."""

    job: Job
    position: int | None  # 0-based place among queued jobs in execution order; None while running
    estimated_start: float | None  # epoch seconds; None while running


@dataclass(frozen=True)
class SchedulerStats:
    queue_depth: int
    running: int
    passes: int
    jobs_per_pass: float  # mean over all passes
    utilisation: float  # busy fraction of the workers over the last minute (`UTILISATION_WINDOW`)
    tokens_per_second: float  # recent throughput of token-carrying passes (0 before the first)


def failure_of(exc: BaseException) -> tuple[str, Literal["user", "server"]]:
    """How a job that raised `exc` reports it: an engine error as it says; anything else is a bug."""
    if isinstance(exc, EngineError):
        return str(exc), exc.category
    return f"internal error: {type(exc).__name__}: {exc}", "server"
