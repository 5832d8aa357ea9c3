"""`Job` (a future with a status) and `Scheduler` (worker threads over per-run FIFO order)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from eztinker.engine.errors import EngineError

log = logging.getLogger(__name__)

JobStatus = Literal["queued", "running", "completed", "failed"]


class QueueFullError(Exception):
    """The queue is at its bound: the caller should retry later (HTTP 429)."""


@dataclass
class Job:
    """One submitted op. `future` resolves (never raises) when the job completes or fails."""

    op: str
    run_id: str | None
    fn: Callable[[], dict[str, Any]]
    owner: str | None = None
    job_id: str = field(default_factory=lambda: f"job-{uuid.uuid4().hex}")
    status: JobStatus = "queued"
    result: dict[str, Any] | None = None
    error: str | None = None
    error_category: Literal["user", "server"] | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    compute_seconds: float | None = None
    future: concurrent.futures.Future[Job] = field(default_factory=concurrent.futures.Future)

    @property
    def done(self) -> bool:
        return self.status in ("completed", "failed")

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


class Scheduler:
    """Runs jobs on `workers` threads. A job waits while an earlier job of the same run is unfinished.

    `on_start` / `on_finish` hooks run on the worker thread (the store records job state there).
    """

    def __init__(
        self,
        *,
        workers: int = 2,
        max_queue: int = 10_000,
        on_start: Callable[[Job], None] | None = None,
        on_finish: Callable[[Job], None] | None = None,
    ) -> None:
        self.max_queue = max_queue
        self._on_start = on_start
        self._on_finish = on_finish
        self._queue: deque[Job] = deque()
        self._busy_runs: set[str] = set()
        self._jobs: dict[str, Job] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._work, name=f"eztinker-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        self.completed = 0
        self.failed = 0

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs; running jobs finish, queued ones are failed with a reason."""
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            self._finish(job, error="the server shut down before the job started", category="server")
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    # --- submitting and looking up -------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"the job queue is full ({self.max_queue} jobs); retry shortly")
            self._jobs[job.job_id] = job
            self._queue.append(job)
            self._cond.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._busy_runs)

    def queue_position(self, job: Job) -> int | None:
        """0-based position among queued jobs, or None if not queued."""
        with self._cond:
            for i, queued in enumerate(self._queue):
                if queued is job:
                    return i
        return None

    def forget(self, older_than: float) -> None:
        """Drop finished jobs from memory (the store keeps their history)."""
        with self._cond:
            for job_id in [
                j.job_id for j in self._jobs.values() if j.done and (j.finished_at or 0) < older_than
            ]:
                del self._jobs[job_id]

    # --- the worker loop -----------------------------------------------------------------------------

    def _next_job(self) -> Job | None:
        """The first queued job whose run is not busy (called with the lock held)."""
        for job in self._queue:
            if job.run_id is None or job.run_id not in self._busy_runs:
                self._queue.remove(job)
                if job.run_id is not None:
                    self._busy_runs.add(job.run_id)
                return job
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                job = self._next_job()
                while job is None:
                    if self._stopping:
                        return
                    self._cond.wait()
                    job = self._next_job()
            try:
                self._run(job)
            finally:
                with self._cond:
                    if job.run_id is not None:
                        self._busy_runs.discard(job.run_id)
                    self._cond.notify_all()  # the run's next job may now go

    def _run(self, job: Job) -> None:
        job.status = "running"
        job.started_at = time.time()
        if self._on_start is not None:
            try:
                self._on_start(job)
            except Exception:
                log.exception("on_start hook failed for %s", job.job_id)
        start = time.perf_counter()
        try:
            result = job.fn()
        except EngineError as exc:
            job.compute_seconds = time.perf_counter() - start
            self._finish(job, error=str(exc), category=exc.category)
        except Exception as exc:  # a bug: report it on the job, keep the worker alive
            log.exception("job %s (%s) failed", job.job_id, job.op)
            job.compute_seconds = time.perf_counter() - start
            self._finish(job, error=f"internal error: {type(exc).__name__}: {exc}", category="server")
        else:
            job.compute_seconds = time.perf_counter() - start
            self._finish(job, result=result)

    def _finish(
        self,
        job: Job,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        category: Literal["user", "server"] | None = None,
    ) -> None:
        job.result, job.error, job.error_category = result, error, category
        job.finished_at = time.time()
        job.status = "failed" if error is not None else "completed"
        if error is None:
            self.completed += 1
        else:
            self.failed += 1
        # Waiters hear first; the record is written before this worker takes its next job. (A crash in
        # between reports the job failed after restart — true of its effect, which lived in memory.)
        job.future.set_result(job)
        if self._on_finish is not None:
            try:
                self._on_finish(job)
            except Exception:
                log.exception("on_finish hook failed for %s", job.job_id)
