"""`Job` (a future with a status) and `Scheduler`: worker threads that execute jobs in passes.

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

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from eztinker.engine.errors import EngineError

log = logging.getLogger(__name__)

JobStatus = Literal["queued", "running", "completed", "failed"]
UTILISATION_WINDOW = 60.0  # seconds over which `stats().utilisation` is measured
DEFAULT_OP_SECONDS = 0.05  # a guess for an op kind never seen yet, for start estimates


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
    finish: Callable[[Any], dict[str, Any] | Deferred]


PassRunner = Callable[[list[Any]], Sequence[Any]]  # requests -> one outcome (value or exception) each
Completion = Callable[[dict[str, Any] | BaseException], None]


@dataclass(frozen=True)
class Deferred:
    """Returned by a job's `fn` or `finish` when its result comes later: the scheduler calls
    `start(complete)` at once, and the job completes when `complete(result or exception)` is called
    (from any thread). Until then the job is running and its run's next jobs wait."""

    start: Callable[[Completion], None]


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
    fn: Callable[[], dict[str, Any] | Deferred]  # executes the job on its own
    owner: str | None = None
    tokens: int = 0  # its work in tokens: the unit of fairness, pass budgets and start estimates
    batch: Batchable | None = None
    job_id: str = field(default_factory=lambda: f"job-{uuid.uuid4().hex}")
    status: JobStatus = "queued"
    result: dict[str, Any] | None = None
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
    utilisation: float  # busy fraction of the workers over the last `UTILISATION_WINDOW` seconds
    tokens_per_second: float  # recent throughput of token-carrying passes (0 before the first)


def _priced_by_tokens(job: Job) -> bool:
    """Whether a job's duration follows its tokens (batchable token work) rather than its op's average."""
    return job.batch is not None and job.tokens > 0


class Scheduler:
    """Runs jobs on `workers` threads, in passes of one or several jobs (see the module docstring).

    `runners` maps a `Batchable.kind` to the function that executes several such jobs together; a job
    whose kind has no runner (or `max_pass_jobs=1`) always executes alone. `on_start` / `on_finish`
    run on the worker thread for each job (the store records job state there); `on_pass` after each
    pass with its jobs and duration (telemetry).
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
        on_start: Callable[[Job], None] | None = None,
        on_finish: Callable[[Job], None] | None = None,
        on_pass: Callable[[list[Job], float], None] | None = None,
        background: Background | None = None,
    ) -> None:
        self.max_queue = max_queue
        self.max_queue_per_run = max_queue_per_run or max_queue
        self.max_pass_jobs = max_pass_jobs
        self.pass_token_budget = pass_token_budget
        self.pass_linger = pass_linger
        # After a pass that served k runs, the next pass may wait a moment for their next ops (see `_linger`).
        self._linger: tuple[float, int, str, str] | None = None  # (until, k, kind, group)
        self.runners = dict(runners or {})
        self._on_start, self._on_finish, self._on_pass = on_start, on_finish, on_pass
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
        self._workers = workers
        self.completed = 0
        self.failed = 0
        self.passes = 0
        self.jobs_in_passes = 0
        self._recent: deque[tuple[float, float, int]] = deque()  # (end, seconds, tokens) of recent passes
        self._pass_ends: list[float] = []  # expected end of each running pass
        self._op_seconds: dict[str, float] = {}  # moving average of a lone job's seconds, by op
        self._tokens_per_second = 0.0  # moving average over token-carrying passes
        self._run_tokens_per_second: dict[str, float] = {}  # the same per run, from its lone passes

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
        for entry in self.snapshot():
            if entry.job is job:
                return entry.position
        return None

    def snapshot(self) -> list[QueueEntry]:
        """Running jobs, then queued jobs in the order they are expected to start, with start estimates."""
        with self._cond:
            now = time.time()
            running = [QueueEntry(job, None, None) for job in self._running]
            free_at = sorted(max(now, end) for end in self._pass_ends) or [now]
            free_at += [now] * (self._workers - len(free_at))
            queued = sorted((j for q in self._queues.values() for j in q), key=lambda j: (j.start_tag, j.seq))
            entries = []
            for position, job in enumerate(queued):
                free_at.sort()
                entries.append(QueueEntry(job, position, free_at[0]))
                free_at[0] += self._estimate(job)
            return running + entries

    def stats(self) -> SchedulerStats:
        with self._cond:
            now = time.time()
            while self._recent and self._recent[0][0] < now - UTILISATION_WINDOW:
                self._recent.popleft()
            busy = sum(min(seconds, end - (now - UTILISATION_WINDOW)) for end, seconds, _ in self._recent)
            return SchedulerStats(
                queue_depth=self._depth,
                running=len(self._running),
                passes=self.passes,
                jobs_per_pass=self.jobs_in_passes / self.passes if self.passes else 0.0,
                utilisation=min(1.0, busy / (UTILISATION_WINDOW * self._workers)),
                tokens_per_second=self._tokens_per_second,
            )

    def forget(self, older_than: float) -> None:
        """Drop finished jobs from memory (the store keeps their history)."""
        with self._cond:
            for job_id in [
                j.job_id for j in self._jobs.values() if j.done and (j.finished_at or 0) < older_than
            ]:
                del self._jobs[job_id]

    def cancel_queued(self, run_id: str, reason: str) -> int:
        """Fail every queued job of run `run_id` with `reason` (its running jobs are left alone).

        For when the state those jobs were sent against is gone, e.g. the run's worker died.
        """
        with self._cond:
            pending = list(self._queues.pop(run_id, ()))
            self._depth -= len(pending)
            self._cond.notify_all()
        for job in pending:
            self._finish(job, error=reason, category="server")
        return len(pending)

    # --- estimates -----------------------------------------------------------------------------------

    def _estimate(self, job: Job) -> float:
        """Seconds `job` is expected to keep a worker busy (throughput-based for token-carrying jobs)."""
        rate = self._run_tokens_per_second.get(job.queue_key, self._tokens_per_second)
        if _priced_by_tokens(job) and rate > 0:
            return job.tokens / rate  # (a run's own rate knows its loss is slow, or its sequences long)
        return self._op_seconds.get(job.op, DEFAULT_OP_SECONDS)

    def _drain_seconds(self, queue: Sequence[Job] | None = None) -> float:
        """Rough seconds until `queue` (default: the whole queue) has room again: a Retry-After hint."""
        jobs = queue if queue is not None else [j for q in self._queues.values() for j in q]
        total = sum(self._estimate(j) for j in list(jobs)[: max(1, len(jobs) // 10)])
        return min(60.0, max(1.0, total / self._workers))

    # --- the worker loop -----------------------------------------------------------------------------

    def _may_start(self, job: Job) -> bool:
        """A run's next job starts when the run has nothing running, or when both it and everything
        running are `shared` (samples of one run generate side by side; a training op waits for them)."""
        running = self._busy.get(job.queue_key)
        return not running or (job.shared and all(j.shared for j in running))

    def _followers(self, job: Job) -> list[Job]:
        """The shared jobs queued right behind a shared `job` (they may run beside it)."""
        followers: list[Job] = []
        if job.shared:
            for other in itertools.islice(self._queues[job.queue_key], 1, None):
                if not other.shared:
                    break
                followers.append(other)
        return followers

    def _next_pass(self) -> list[Job]:
        """The next pass (called with the lock held): the first job in fair order, and its companions."""
        heads = [q[0] for key, q in self._queues.items() if q and self._may_start(q[0])]
        if not heads:
            return []
        heads.sort(key=lambda j: (j.start_tag, j.seq))
        first = self._realign(heads)
        chosen = [first]
        batch = first.batch
        if batch is not None and batch.kind in self.runners and self.max_pass_jobs > 1:
            tokens = first.tokens
            # Heads of other queues, each followed by the shared jobs queued right behind it.
            others = [h for h in heads if h is not first]
            candidates = self._followers(first) + [x for h in others for x in (h, *self._followers(h))]
            blocked: set[str] = set()  # a queue whose job was left out: its later jobs must wait too
            for job in candidates:
                if len(chosen) >= self.max_pass_jobs:
                    break
                other = job.batch
                fits = tokens + job.tokens <= self.pass_token_budget
                same = other is not None and other.kind == batch.kind and other.group == batch.group
                if job.queue_key in blocked or not same or not fits:
                    blocked.add(job.queue_key)
                    continue
                chosen.append(job)
                tokens += job.tokens
        for job in chosen:
            self._queues[job.queue_key].popleft()
            if not self._queues[job.queue_key]:
                del self._queues[job.queue_key]
            self._busy.setdefault(job.queue_key, []).append(job)
            self._depth -= 1
            self._running.append(job)
        self._virtual_time = max(self._virtual_time, first.start_tag)
        self._pass_ends.append(time.time() + sum(self._estimate(j) for j in chosen))
        return chosen

    def _realign(self, heads: list[Job]) -> Job:
        """The job to lead the next pass: the first in fair order, unless most runs wait on another kind.

        Runs whose clients alternate ops (forward_backward, optim_step, …) drift out of phase: one run's
        optim_step waits while the others' forward_backward are ready. Served strictly in order, the lone
        op costs a pass of its own every cycle, for ever. Letting the larger group go first — once per
        job, so the bypassed op runs in the very next pass — brings the runs back into step.
        """
        first = heads[0]
        if first.batch is None or first.bypassed or self.max_pass_jobs <= 1:
            return first
        groups = collections.Counter(
            (h.batch.kind, h.batch.group)
            for h in heads
            if h.batch is not None and h.batch.kind in self.runners
        )
        key, size = groups.most_common(1)[0] if groups else (None, 0)
        if size <= groups[(first.batch.kind, first.batch.group)]:
            return first
        first.bypassed = True
        return next(h for h in heads if h.batch is not None and (h.batch.kind, h.batch.group) == key)

    def _await_companions(self) -> None:
        """After a pass that served k ≥ 2 runs, wait briefly (lock held) until k of their kind are ready.

        Clients of a co-batched pass hear back together and send their next ops a moment later; starting
        the first arrival at once would split them into a pass of one and a pass of the rest, and every
        later pass along the same seam. The wait is bounded by `pass_linger` and a quarter of the last
        pass, happens only after a shared pass (a lone client never waits), and ends as soon as the
        companions are in, or if the job next in fair order is of another kind.
        """
        if self._linger is None:
            return
        until, wanted, kind, group = self._linger
        self._linger = None
        while not self._stopping:
            heads = sorted(
                (q[0] for q in self._queues.values() if q and self._may_start(q[0])),
                key=lambda j: (j.start_tag, j.seq),
            )
            same = [
                j for j in heads if j.batch is not None and (j.batch.kind, j.batch.group) == (kind, group)
            ]
            if len(same) >= wanted or (heads and heads[0] not in same):
                return
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _work(self) -> None:
        while True:
            with self._cond:
                self._await_companions()
                jobs = self._next_pass()
                while not jobs and not self._background_ready():
                    if self._stopping:
                        return
                    self._cond.wait()
                    jobs = self._next_pass()
                if self._stopping and not jobs:
                    return
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
                self._account([j for j in jobs if not j.deferred], seconds)
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
        self._running.remove(job)
        # A tag the virtual time has passed means nothing: drop it (memory stays bounded).
        key = job.queue_key
        stale = self._last_finish.get(key, 0.0) <= self._virtual_time
        if key not in self._queues and (job.run_id is None or stale):
            self._last_finish.pop(key, None)
            self._run_tokens_per_second.pop(key, None)

    def _defer(self, job: Job, deferred: Deferred, start: float) -> None:
        """Hand `job` to whoever completes it later (see `Deferred`)."""
        job.deferred = True

        def complete(outcome: dict[str, Any] | BaseException) -> None:
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

    def _account(self, jobs: list[Job], seconds: float) -> None:
        """Update pass counts and the moving averages behind estimates and stats (lock held)."""
        self.passes += 1
        self.jobs_in_passes += len(jobs)
        if not jobs:  # deferred jobs only: their time is the sampling engine's, not this pass's
            return
        tokens = sum(j.tokens for j in jobs)
        self._recent.append((time.time(), seconds, tokens))
        if all(_priced_by_tokens(j) for j in jobs) and seconds > 0:
            rate = tokens / seconds
            self._tokens_per_second = (
                rate if not self._tokens_per_second else 0.8 * self._tokens_per_second + 0.2 * rate
            )
            if len(jobs) == 1 and jobs[0].run_id is not None:
                key, previous = jobs[0].queue_key, self._run_tokens_per_second.get(jobs[0].queue_key)
                self._run_tokens_per_second[key] = rate if previous is None else 0.5 * previous + 0.5 * rate
        else:
            op, per_job = jobs[0].op, seconds / len(jobs)
            self._op_seconds[op] = 0.8 * self._op_seconds.get(op, per_job) + 0.2 * per_job

    def _execute(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._started(job, len(jobs))
        start = time.perf_counter()
        batch = jobs[0].batch
        if len(jobs) == 1 or batch is None:
            for job in jobs:
                self._run_alone(job, start)
            return
        try:
            outcomes = list(self.runners[batch.kind]([j.batch.request for j in jobs if j.batch is not None]))
            if len(outcomes) != len(jobs):
                raise RuntimeError(
                    f"the {batch.kind!r} runner gave {len(outcomes)} outcomes for {len(jobs)} jobs"
                )
        except Exception:  # a bug in the shared path: fall back to executing each job alone
            log.exception("a %s pass of %d jobs failed; running them one by one", batch.kind, len(jobs))
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

    def _started(self, job: Job, pass_size: int) -> None:
        job.status = "running"
        job.started_at = time.time()
        job.pass_size = pass_size
        if self._on_start is not None:
            try:
                self._on_start(job)
            except Exception:
                log.exception("on_start hook failed for %s", job.job_id)

    def _run_alone(self, job: Job, start: float) -> None:
        try:
            result = job.fn()
        except Exception as exc:
            job.compute_seconds = time.perf_counter() - start
            self._fail(job, exc)
        else:
            job.compute_seconds = time.perf_counter() - start
            self._done(job, result, start)

    def _done(self, job: Job, result: dict[str, Any] | Deferred, start: float) -> None:
        if isinstance(result, Deferred):
            self._defer(job, result, start)
        else:
            self._finish(job, result=result)

    def _fail(self, job: Job, exc: BaseException) -> None:
        if isinstance(exc, EngineError):
            self._finish(job, error=str(exc), category=exc.category)
            return
        # A bug: report it on the job, keep the worker alive.
        log.error("job %s (%s) failed", job.job_id, job.op, exc_info=exc)
        self._finish(job, error=f"internal error: {type(exc).__name__}: {exc}", category="server")

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
