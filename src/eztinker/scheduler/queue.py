"""`Scheduler`: worker threads that execute jobs in passes.

A pass is one job, or several jobs of different runs that execute together (co-batching): when a worker
becomes free it takes the next job in fair order and, if that job is batchable, every other waiting job
that can join it (same kind and group, one per run, within the pass's token budget). No clock: an idle
worker starts the first job at once, and whatever arrives while a pass runs gathers for the next one.

Fairness is start-time fair queueing by tokens: each job gets a start tag max(virtual time, its run's
last finish tag) and a finish tag start + tokens; the smallest start tag goes first. A run that sends
big batches is served in proportion to its tokens, a run that was idle rejoins at the current virtual
time (no credit hoarding), and a run's own jobs keep their submission order.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Literal

from eztinker.engine.errors import EngineError
from eztinker.scheduler import passes
from eztinker.scheduler.estimates import Estimates
from eztinker.scheduler.jobs import (
    Background,
    Deferred,
    Job,
    JobResult,
    PassRunner,
    QueueEntry,
    QueueFullError,
    SchedulerStats,
    failure_of,
)

log = logging.getLogger(__name__)


class Scheduler:
    """Runs jobs on `workers` threads, in passes of one or several jobs (see the module docstring).

    `runners` maps a `Batchable.kind` to the function that executes several such jobs together; a job
    whose kind has no runner (or `max_pass_jobs=1`) always executes alone. `on_finish` runs on the
    worker thread for each job (the store records job state there); `on_pass` after each pass with its
    jobs and duration (telemetry). `on_run_busy(run_id)` runs when a run gets queued work while it had
    none, `on_run_idle(run_id)` when it has none queued or running any more (adapter paging: keep a busy
    run resident, page a queued one in ahead); both with the queue's lock held, so they must be quick.
    `runs_fit(run_ids)`, when set, says whether these runs' state fits the device together (adapter
    paging's budget): a pass takes companions only while it does, so that the runs executing at once stay
    within the budget (a first job always runs, even alone over it). Also called with the lock held.
    """

    def __init__(
        self,
        *,
        workers: int = 1,
        max_queue: int = 10_000,
        max_queue_per_run: int | None = None,
        max_pass_jobs: int = 64,
        pass_token_budget: int = 32_768,
        pass_linger: float = 0.005,
        runners: dict[str, PassRunner] | None = None,
        on_finish: Callable[[Job], None] | None = None,
        on_pass: Callable[[list[Job], float], None] | None = None,
        background: Background | None = None,
        on_run_busy: Callable[[str], None] | None = None,
        on_run_idle: Callable[[str], None] | None = None,
        runs_fit: Callable[[list[str]], bool] | None = None,
    ) -> None:
        self.on_run_busy, self.on_run_idle = on_run_busy, on_run_idle
        self.runs_fit = runs_fit
        self.max_queue = max_queue
        self.max_queue_per_run = max_queue_per_run or max_queue
        self.max_pass_jobs = max_pass_jobs
        self.pass_token_budget = pass_token_budget
        self.pass_linger = pass_linger
        # After a pass that served k runs, the next pass may wait a moment for their next ops (see `_linger`).
        self._linger: tuple[float, int, str, str] | None = None  # (until, k, kind, group)
        self.runners = dict(runners or {})
        self._on_finish, self._on_pass = on_finish, on_pass
        self.background = background
        self._background_lock = threading.Lock()  # one worker steps the background at a time
        self._queues: dict[str, deque[Job]] = {}  # queue key -> its queued jobs, in order
        self._depth = 0
        self._busy: dict[str, list[Job]] = {}  # queue key -> its running jobs (several only if shared)
        self._running: list[Job] = []
        self._jobs: dict[str, Job] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._seq = itertools.count()
        self._virtual_time = 0.0
        self._last_finish: dict[str, float] = {}  # queue key -> finish tag of its last submitted job
        self._threads = [
            threading.Thread(target=self._work, name=f"eztinker-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        self.passes = 0
        self.jobs_in_passes = 0
        self._pass_ends: list[float] = []  # expected end of each running pass
        self._estimates = Estimates(workers)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs; running jobs finish, queued ones are failed with a reason."""
        with self._cond:
            self._stopping = True
            pending = [job for queue in self._queues.values() for job in queue]
            self._queues.clear()
            self._depth = 0
            self._cond.notify_all()
        for job in pending:
            self._finish(job, error="the server shut down before the job started", category="server")
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    # --- submitting and looking up -------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        """Queue `job`; raise `QueueFullError` (and queue nothing) if the queue or the run's share is full."""
        with self._cond:
            if self._stopping:
                raise QueueFullError("the server is shutting down", retry_after=5.0)
            key = job.queue_key
            queue = self._queues.get(key)
            if self._depth >= self.max_queue:
                raise QueueFullError(
                    f"the job queue is full ({self.max_queue} jobs); retry shortly",
                    retry_after=self._drain_seconds(),
                )
            if queue is not None and len(queue) >= self.max_queue_per_run:
                raise QueueFullError(
                    f"run {key!r} already has {len(queue)} jobs queued (the limit per run); "
                    "wait for some to finish",
                    retry_after=self._drain_seconds(queue),
                )
            if job.run_id is not None and queue is None and key not in self._busy:
                _tell(self.on_run_busy, key)
            job.seq = next(self._seq)
            job.start_tag = max(self._virtual_time, self._last_finish.get(key, 0.0))
            self._last_finish[key] = job.start_tag + max(job.tokens, 1)
            self._jobs[job.job_id] = job
            self._queues.setdefault(key, deque()).append(job)
            self._depth += 1
            self._cond.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    @property
    def queue_depth(self) -> int:
        return self._depth

    @property
    def running(self) -> int:
        return len(self._running)

    def queue_position(self, job: Job) -> int | None:
        """0-based position among queued jobs in execution order, or None if not queued."""
        return next((entry.position for entry in self.snapshot() if entry.job is job), None)

    def snapshot(self) -> list[QueueEntry]:
        """Running jobs, then queued jobs in the order they are expected to start, with start estimates."""
        with self._cond:
            running = [QueueEntry(job, None, None) for job in self._running]
            queued = sorted((j for q in self._queues.values() for j in q), key=lambda j: (j.start_tag, j.seq))
            starts = self._estimates.starts(queued, self._pass_ends, time.time())
            return running + [
                QueueEntry(job, i, at) for i, (job, at) in enumerate(zip(queued, starts, strict=True))
            ]

    def stats(self) -> SchedulerStats:
        with self._cond:
            return SchedulerStats(
                queue_depth=self._depth,
                running=len(self._running),
                passes=self.passes,
                jobs_per_pass=self.jobs_in_passes / self.passes if self.passes else 0.0,
                utilisation=self._estimates.utilisation(),
                tokens_per_second=self._estimates.tokens_per_second,
            )

    def forget(self, older_than: float) -> None:
        """Drop finished jobs from memory (the store keeps their history)."""
        with self._cond:
            for job_id in [
                j.job_id for j in self._jobs.values() if j.done and (j.finished_at or 0) < older_than
            ]:
                del self._jobs[job_id]

    def cancel_queued(self, run_id: str, reason: str, category: Literal["user", "server"] = "server") -> int:
        """Fail every queued job of run `run_id` with `reason` (its running jobs are left alone).

        For when the state those jobs were sent against is gone: the run's worker died (the server's
        doing, the default category), or its owner deleted the run (`category="user"`).
        """
        with self._cond:
            pending = list(self._queues.pop(run_id, ()))
            self._depth -= len(pending)
            if pending and run_id not in self._busy:
                _tell(self.on_run_idle, run_id)
            self._cond.notify_all()
        for job in pending:
            self._finish(job, error=reason, category=category)
        return len(pending)

    def cancel(self, job_id: str, reason: str) -> bool:
        """Fail job `job_id` with `reason` (the caller's doing: category "user") if it is still queued;
        False if it is running, finished or unknown (a running job is stopped by whoever runs it)."""
        with self._cond:
            job = self._jobs.get(job_id)
            queue = self._queues.get(job.queue_key) if job is not None else None
            if job is None or queue is None or job not in queue:
                return False
            queue.remove(job)
            self._depth -= 1
            if not queue:
                del self._queues[job.queue_key]
                if job.run_id is not None and job.queue_key not in self._busy:
                    _tell(self.on_run_idle, job.run_id)
            self._cond.notify_all()
        self._finish(job, error=reason, category="user")
        return True

    # --- estimates -----------------------------------------------------------------------------------

    def _drain_seconds(self, queue: Sequence[Job] | None = None) -> float:
        """Rough seconds until `queue` (default: the whole queue) has room again: a Retry-After hint."""
        return self._estimates.drain_seconds(
            queue if queue is not None else [j for q in self._queues.values() for j in q]
        )

    # --- the worker loop -----------------------------------------------------------------------------

    def _may_start(self, job: Job) -> bool:
        """A run's next job starts when the run has nothing running, or when both it and everything
        running are `shared` (samples of one run generate side by side; a training op waits for them)."""
        running = self._busy.get(job.queue_key)
        return not running or (job.shared and all(j.shared for j in running))

    def _next_pass(self) -> list[Job]:
        """The next pass (called with the lock held): the first job in fair order, and its companions."""
        heads = self._heads()
        if not heads:
            return []
        first = passes.leader(heads, self.runners, self.max_pass_jobs)
        chosen = [first]
        batch = first.batch
        if batch is not None and batch.kind in self.runners and self.max_pass_jobs > 1:
            candidates = passes.candidates(self._queues, heads, first)
            chosen += passes.companions(
                first, candidates, self.max_pass_jobs, self.pass_token_budget, runs_fit=self.runs_fit
            )
        for job in chosen:
            self._queues[job.queue_key].popleft()
            if not self._queues[job.queue_key]:
                del self._queues[job.queue_key]
            self._busy.setdefault(job.queue_key, []).append(job)
            self._depth -= 1
            self._running.append(job)
        self._virtual_time = max(self._virtual_time, first.start_tag)
        self._pass_ends.append(time.time() + sum(self._estimates.seconds(j) for j in chosen))
        return chosen

    def _heads(self) -> list[Job]:
        """The first job of each queue that may start now, in fair order (lock held)."""
        heads = [q[0] for q in self._queues.values() if q and self._may_start(q[0])]
        return sorted(heads, key=lambda j: (j.start_tag, j.seq))

    def _await_companions(self) -> None:
        """After a pass that served several runs, wait briefly for their next ops (`passes.linger`)."""
        if self._linger is not None:
            linger, self._linger = self._linger, None
            passes.linger(linger, self._cond, self._heads, lambda: self._stopping)

    def _work(self) -> None:
        while True:
            with self._cond:
                self._await_companions()
                jobs = self._next_pass()
                # Background work another worker is stepping is not ours: wait (a worker that looped back
                # here would spin on the lock and starve the stepping thread of the GIL).
                while not jobs and not (self._background_ready() and not self._background_lock.locked()):
                    if self._stopping:
                        return
                    self._cond.wait()
                    jobs = self._next_pass()
                if self._stopping and not jobs:
                    return
                if jobs and self._background_ready():
                    self._cond.notify()  # an idle worker steps the background while this one runs the pass
                expected_end = self._pass_ends[-1] if jobs else 0.0
            if jobs:
                self._run_pass(jobs, expected_end)
            self._step_background()

    def wake(self) -> None:
        """Tell idle workers that background work arrived."""
        with self._cond:
            self._cond.notify_all()

    def _background_ready(self) -> bool:
        return self.background is not None and self.background.has_work

    def _step_background(self) -> None:
        if self.background is None or not self._background_lock.acquire(blocking=False):
            return
        try:
            if self.background.has_work:
                self.background.step()
        except Exception:
            log.exception("a background step failed")
        finally:
            self._background_lock.release()

    def _run_pass(self, jobs: list[Job], expected_end: float) -> None:
        start = time.perf_counter()
        try:
            self._execute(jobs)
        finally:
            seconds = time.perf_counter() - start
            with self._cond:
                self._pass_ends.remove(expected_end)
                computed = [j for j in jobs if not j.deferred]  # behind the estimates and stats
                self.passes += 1
                self.jobs_in_passes += len(computed)
                self._estimates.record(computed, seconds)
                runs = {j.queue_key for j in jobs}
                batch = jobs[0].batch
                if len(runs) >= 2 and batch is not None and self.pass_linger > 0:
                    linger = min(self.pass_linger, 0.25 * seconds)
                    self._linger = (time.monotonic() + linger, len(runs), batch.kind, batch.group)
                for job in jobs:
                    job.pass_closed = True
                    if not job.done:  # deferred: `_release` runs when it completes
                        continue
                    self._release(job)
                self._cond.notify_all()  # the runs' next jobs may now go
            if self._on_pass is not None:
                try:
                    self._on_pass(jobs, seconds)
                except Exception:
                    log.exception("on_pass hook failed")

    def _release(self, job: Job) -> None:
        """A finished job's run may start its next job (lock held)."""
        running = self._busy.get(job.queue_key, [])
        if job in running:
            running.remove(job)
        if not running:
            self._busy.pop(job.queue_key, None)
            if job.run_id is not None and job.queue_key not in self._queues:
                _tell(self.on_run_idle, job.run_id)
        self._running.remove(job)
        # A tag the virtual time has passed means nothing: drop it (memory stays bounded).
        key = job.queue_key
        stale = self._last_finish.get(key, 0.0) <= self._virtual_time
        if key not in self._queues and (job.run_id is None or stale):
            self._last_finish.pop(key, None)
            self._estimates.forget(key)

    def _defer(self, job: Job, deferred: Deferred, start: float) -> None:
        """Hand `job` to whoever completes it later (see `Deferred`)."""
        job.deferred = True

        def complete(outcome: JobResult | BaseException) -> None:
            if job.done:
                return
            job.compute_seconds = time.perf_counter() - start
            if isinstance(outcome, BaseException):
                self._fail(job, outcome)
            else:
                self._finish(job, result=outcome)
            with self._cond:
                if job.pass_closed and job in self._running:
                    self._release(job)
                self._cond.notify_all()

        try:
            deferred.start(complete)
        except Exception as exc:
            complete(exc)

    def _execute(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.status, job.started_at, job.pass_size = "running", time.time(), len(jobs)
        start = time.perf_counter()
        batch = jobs[0].batch
        if len(jobs) == 1 or batch is None:
            for job in jobs:
                self._run_alone(job, start)
            return
        outcomes = passes.run_together(self.runners[batch.kind], jobs)
        if outcomes is None:  # a bug in the shared path: fall back to executing each job alone
            for job in jobs:
                self._run_alone(job, time.perf_counter())
            return
        seconds = time.perf_counter() - start
        for job, outcome in zip(jobs, outcomes, strict=True):
            job.compute_seconds = seconds
            if isinstance(outcome, BaseException):
                self._fail(job, outcome)
                continue
            assert job.batch is not None
            try:
                result = job.batch.finish(outcome)
            except Exception as exc:
                self._fail(job, exc)
            else:
                self._done(job, result, start)

    def _run_alone(self, job: Job, start: float) -> None:
        try:
            result = job.fn()
        except Exception as exc:
            job.compute_seconds = time.perf_counter() - start
            self._fail(job, exc)
        else:
            job.compute_seconds = time.perf_counter() - start
            self._done(job, result, start)

    def _done(self, job: Job, result: JobResult | Deferred, start: float) -> None:
        if isinstance(result, Deferred):
            self._defer(job, result, start)
        else:
            self._finish(job, result=result)

    def _fail(self, job: Job, exc: BaseException) -> None:
        if not isinstance(exc, EngineError):  # a bug: reported on the job, the worker stays alive
            log.error("job %s (%s) failed", job.job_id, job.op, exc_info=exc)
        message, category = failure_of(exc)
        self._finish(job, error=message, category=category)

    def _finish(
        self,
        job: Job,
        *,
        result: JobResult | None = None,
        error: str | None = None,
        category: Literal["user", "server"] | None = None,
    ) -> None:
        # Waiters hear first; the record is written before this worker takes its next job. (A crash in
        # between reports the job failed after restart — true of its effect, which lived in memory.)
        job.settle(result, error, category)
        if self._on_finish is not None:
            try:
                self._on_finish(job)
            except Exception:
                log.exception("on_finish hook failed for %s", job.job_id)


def _tell(hook: Callable[[str], None] | None, run_id: str) -> None:
    """Call a run hook (`on_run_busy` / `on_run_idle`); a failing hook is logged, never raised."""
    if hook is not None:
        try:
            hook(run_id)
        except Exception:
            log.exception("a run hook failed for %s", run_id)
