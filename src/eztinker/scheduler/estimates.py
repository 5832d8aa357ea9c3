"""`Estimates`: how long jobs take, measured as they run — start estimates and the scheduler's stats.

A job that carries tokens and may be co-batched is priced by throughput (its run's own rate, measured
from the passes it ran alone, else the overall rate); any other job by the moving average of its op.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

from eztinker.scheduler.jobs import Job

UTILISATION_WINDOW = 60.0  # seconds over which `utilisation` is measured
DEFAULT_OP_SECONDS = 0.05  # a guess for an op kind never seen yet, for start estimates


def priced_by_tokens(job: Job) -> bool:
    """Whether a job's duration follows its tokens (batchable token work) rather than its op's average."""
    return job.batch is not None and job.tokens > 0


class Estimates:
    """Moving averages of the passes run so far (the caller holds the scheduler's lock)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._recent: deque[tuple[float, float, int]] = deque()  # (end, seconds, tokens) of recent passes
        self._op_seconds: dict[str, float] = {}  # moving average of a lone job's seconds, by op
        self.tokens_per_second = 0.0  # moving average over token-carrying passes
        self._run_tokens_per_second: dict[str, float] = {}  # the same per run, from its lone passes

    def seconds(self, job: Job) -> float:
        """Seconds `job` is expected to keep a worker busy (throughput-based for token-carrying jobs)."""
        rate = self._run_tokens_per_second.get(job.queue_key, self.tokens_per_second)
        if priced_by_tokens(job) and rate > 0:
            return job.tokens / rate  # (a run's own rate knows its loss is slow, or its sequences long)
        return self._op_seconds.get(job.op, DEFAULT_OP_SECONDS)

    def starts(self, queued: Sequence[Job], pass_ends: Sequence[float], now: float) -> list[float]:
        """When each of `queued` (in execution order) is expected to start, given when the running passes
        are expected to end: each goes to the worker free first, which is then busy for its estimate."""
        free_at = sorted(max(now, end) for end in pass_ends) or [now]
        free_at += [now] * (self.workers - len(free_at))
        starts = []
        for job in queued:
            free_at.sort()
            starts.append(free_at[0])
            free_at[0] += self.seconds(job)
        return starts

    def drain_seconds(self, jobs: Sequence[Job]) -> float:
        """Rough seconds until a tenth of `jobs` has run: a Retry-After hint for a full queue."""
        total = sum(self.seconds(j) for j in list(jobs)[: max(1, len(jobs) // 10)])
        return min(60.0, max(1.0, total / self.workers))

    def record(self, jobs: list[Job], seconds: float) -> None:
        """A pass of `jobs` (those that computed in it) took `seconds`."""
        if not jobs:  # deferred jobs only: their time is the sampling engine's, not this pass's
            return
        tokens = sum(j.tokens for j in jobs)
        self._recent.append((time.time(), seconds, tokens))
        if all(priced_by_tokens(j) for j in jobs) and seconds > 0:
            rate = tokens / seconds
            self.tokens_per_second = (
                rate if not self.tokens_per_second else 0.8 * self.tokens_per_second + 0.2 * rate
            )
            if len(jobs) == 1 and jobs[0].run_id is not None:
                key, previous = jobs[0].queue_key, self._run_tokens_per_second.get(jobs[0].queue_key)
                self._run_tokens_per_second[key] = rate if previous is None else 0.5 * previous + 0.5 * rate
        else:
            op, per_job = jobs[0].op, seconds / len(jobs)
            self._op_seconds[op] = 0.8 * self._op_seconds.get(op, per_job) + 0.2 * per_job

    def utilisation(self) -> float:
        """The busy fraction of the workers over the last `UTILISATION_WINDOW` seconds."""
        now = time.time()
        while self._recent and self._recent[0][0] < now - UTILISATION_WINDOW:
            self._recent.popleft()
        busy = sum(min(seconds, end - (now - UTILISATION_WINDOW)) for end, seconds, _ in self._recent)
        return min(1.0, busy / (UTILISATION_WINDOW * self.workers))

    def forget(self, key: str) -> None:
        """Queue `key` is idle with nothing owed: drop its rate (memory stays bounded)."""
        self._run_tokens_per_second.pop(key, None)
