"""Futures and the queue that runs them: every op is a job, answered at once, executed by a worker.

Rules: the ops of one run execute in submission order; ops of different runs may execute together in
one pass (co-batching) or side by side on different workers (the engine's per-base-model lock
serialises what must be). Runs share the workers fairly by tokens. Workers are woken by `submit` and
waiters by completion — events, never sleeps or polling.
"""

from eztinker.scheduler.jobs import (
    Background,
    Batchable,
    Completion,
    Deferred,
    Job,
    JobResult,
    QueueEntry,
    QueueFullError,
    SchedulerStats,
    complete_when_done,
    when_done,
)
from eztinker.scheduler.queue import Scheduler

__all__ = [
    "Background",
    "Batchable",
    "Completion",
    "Deferred",
    "Job",
    "JobResult",
    "QueueEntry",
    "QueueFullError",
    "Scheduler",
    "SchedulerStats",
    "complete_when_done",
    "when_done",
]
