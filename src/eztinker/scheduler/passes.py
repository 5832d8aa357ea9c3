"""Which jobs make the next pass: its leader in fair order, the shared jobs behind a run's head, and the
companions of other runs that may execute with the leader. Pure functions over the scheduler's queues
(called with its lock held)."""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from eztinker.scheduler.jobs import Job, PassRunner

log = logging.getLogger(__name__)


def leader(heads: list[Job], runners: Mapping[str, object], max_pass_jobs: int) -> Job:
    """The job to lead the next pass: the first in fair order, unless most runs wait on another kind.

    Runs whose clients alternate ops (forward_backward, optim_step, …) drift out of phase: one run's
    optim_step waits while the others' forward_backward are ready. Served strictly in order, the lone
    op costs a pass of its own every cycle, for ever. Letting the larger group go first — once per
    job, so the bypassed op runs in the very next pass — brings the runs back into step.
    """
    first = heads[0]
    if first.batch is None or first.bypassed or max_pass_jobs <= 1:
        return first
    groups = collections.Counter(
        (h.batch.kind, h.batch.group) for h in heads if h.batch is not None and h.batch.kind in runners
    )
    key, size = groups.most_common(1)[0] if groups else (None, 0)
    if size <= groups[(first.batch.kind, first.batch.group)]:
        return first
    first.bypassed = True
    return next(h for h in heads if h.batch is not None and (h.batch.kind, h.batch.group) == key)


def followers(queues: Mapping[str, deque[Job]], job: Job) -> list[Job]:
    """The shared jobs queued right behind a shared `job` (they may run beside it)."""
    found: list[Job] = []
    if job.shared:
        for other in itertools.islice(queues[job.queue_key], 1, None):
            if not other.shared:
                break
            found.append(other)
    return found


def candidates(queues: Mapping[str, deque[Job]], heads: list[Job], first: Job) -> list[Job]:
    """Who may join `first`'s pass, in order: the shared jobs behind it, then the heads of the other
    queues, each followed by the shared jobs queued right behind it."""
    others = [x for h in heads if h is not first for x in (h, *followers(queues, h))]
    return followers(queues, first) + others


def companions(
    first: Job,
    candidates: list[Job],
    max_pass_jobs: int,
    token_budget: int,
    *,
    runs_fit: Callable[[list[str]], bool] | None = None,
) -> list[Job]:
    """The candidates that execute with `first`: its kind and group, in order, within the pass's size
    and token budget, and (with `runs_fit`) only while the pass's runs fit the device's run-state budget
    together; a queue whose job was left out contributes nothing after it (its order holds)."""
    assert first.batch is not None
    kind, group = first.batch.kind, first.batch.group
    chosen: list[Job] = []
    tokens = first.tokens
    runs = [first.queue_key]
    blocked: set[str] = set()
    for job in candidates:
        if len(chosen) + 1 >= max_pass_jobs:
            break
        other = job.batch
        fits = tokens + job.tokens <= token_budget
        same = other is not None and other.kind == kind and other.group == group
        new_run = job.queue_key not in runs
        if (
            job.queue_key in blocked
            or not same
            or not fits
            or (new_run and runs_fit is not None and not runs_fit([*runs, job.queue_key]))
        ):
            blocked.add(job.queue_key)
            continue
        chosen.append(job)
        tokens += job.tokens
        if new_run:
            runs.append(job.queue_key)
    return chosen


def run_together(runner: PassRunner, jobs: list[Job]) -> list[Any] | None:
    """The outcomes of executing `jobs` in one pass of `runner` (one per job, in order: a result or the
    exception of that job), or None when the shared path itself failed — a bug, logged; the scheduler
    then executes each job alone."""
    batch = jobs[0].batch
    assert batch is not None
    try:
        outcomes = list(runner([j.batch.request for j in jobs if j.batch is not None]))
        if len(outcomes) != len(jobs):
            raise RuntimeError(
                f"the {batch.kind!r} runner gave {len(outcomes)} outcomes for {len(jobs)} jobs"
            )
    except Exception:
        log.exception("a %s pass of %d jobs failed; running them one by one", batch.kind, len(jobs))
        return None
    return outcomes


def linger(
    until_wanted_kind: tuple[float, int, str, str],
    cond: threading.Condition,
    heads: Callable[[], list[Job]],
    stopping: Callable[[], bool],
) -> None:
    """After a pass that served k ≥ 2 runs, wait briefly (lock held) until k of their kind are ready.

    Clients of a co-batched pass hear back together and send their next ops a moment later; starting
    the first arrival at once would split them into a pass of one and a pass of the rest, and every
    later pass along the same seam. The wait is bounded by `pass_linger` and a quarter of the last
    pass (`until`), happens only after a shared pass (a lone client never waits), and ends as soon as
    the companions are in, or if the job next in fair order is of another kind.
    """
    until, wanted, kind, group = until_wanted_kind
    while not stopping():
        ready = heads()
        same = [j for j in ready if j.batch is not None and (j.batch.kind, j.batch.group) == (kind, group)]
        if len(same) >= wanted or (ready and ready[0] not in same):
            return
        remaining = until - time.monotonic()
        if remaining <= 0:
            return
        cond.wait(remaining)
