"""Futures and the queue that runs them: every op is a job, answered at once, executed by a worker.

Rules: the ops of one run execute in submission order; ops of different runs may run side by side on
different workers (the engine's per-base-model lock serialises what must be). Workers are woken by
`submit` and waiters by completion — events, never sleeps or polling.
"""

from eztinker.scheduler.jobs import Job, QueueFullError, Scheduler

__all__ = ["Job", "QueueFullError", "Scheduler"]
