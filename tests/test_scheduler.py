"""The job scheduler: futures, per-run order, overlap across runs, backpressure, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fastapi.testclient import TestClient

from eztinker.api import create_app
from eztinker.engine.errors import InvalidInputError
from eztinker.scheduler import Batchable, Job, QueueFullError, Scheduler
from eztinker.service import Service
from eztinker.settings import Settings


@pytest.fixture
def scheduler():
    s = Scheduler(workers=2)
    s.start()
    yield s
    s.stop()


def test_jobs_of_one_run_execute_in_submission_order(scheduler: Scheduler) -> None:
    order: list[int] = []

    def op(i: int):
        def fn():
            time.sleep(0.002 * (5 - i % 5))  # later jobs are faster: order must not come from timing
            order.append(i)
            return {"i": i}

        return fn

    jobs = [scheduler.submit(Job(op="x", run_id="run-a", fn=op(i))) for i in range(20)]
    assert all(job.wait_sync(10) for job in jobs)
    assert order == list(range(20))
    assert [j.result for j in jobs] == [{"i": i} for i in range(20)]


def test_jobs_of_different_runs_overlap(scheduler: Scheduler) -> None:
    both_running = threading.Barrier(2, timeout=5)

    def meet():
        both_running.wait()  # only returns if the two runs' jobs run at the same time
        return {}

    jobs = [scheduler.submit(Job(op="x", run_id=run, fn=meet)) for run in ("run-a", "run-b")]
    assert all(job.wait_sync(10) for job in jobs)
    assert [j.status for j in jobs] == ["completed", "completed"]


def test_an_engine_error_fails_the_job_with_its_category_and_the_worker_lives_on(
    scheduler: Scheduler,
) -> None:
    def bad():
        raise InvalidInputError("data[0].tokens", "token id 9999 is out of the vocabulary")

    def bug():
        raise KeyError("oops")

    failed = scheduler.submit(Job(op="x", run_id="r", fn=bad))
    crashed = scheduler.submit(Job(op="x", run_id="r", fn=bug))
    fine = scheduler.submit(Job(op="x", run_id="r", fn=lambda: {"ok": True}))
    assert fine.wait_sync(5) and failed.done and crashed.done
    assert failed.status == "failed" and failed.error_category == "user" and "data[0].tokens" in failed.error
    assert crashed.status == "failed" and crashed.error_category == "server" and "KeyError" in crashed.error
    assert fine.result == {"ok": True}


def test_waiters_wake_on_completion_not_on_a_timer(scheduler: Scheduler) -> None:
    release = threading.Event()
    job = scheduler.submit(Job(op="x", run_id="r", fn=lambda: release.wait(5) and {}))

    async def wait_then_time() -> float:
        waiter = asyncio.create_task(job.wait(10))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        start = time.perf_counter()
        release.set()
        assert await waiter
        return time.perf_counter() - start

    assert asyncio.run(wait_then_time()) < 0.05
    assert not asyncio.run(Job(op="x", run_id=None, fn=dict).wait(0.01))  # a timeout answers False


def test_a_full_queue_refuses_new_jobs(scheduler: Scheduler) -> None:
    small = Scheduler(workers=1, max_queue=2)
    small.start()
    release = threading.Event()
    try:
        blocker = small.submit(Job(op="x", run_id="r", fn=lambda: release.wait(5) and {}))
        while blocker.status != "running":
            time.sleep(0.001)
        small.submit(Job(op="x", run_id="r", fn=dict))
        small.submit(Job(op="x", run_id="r", fn=dict))
        with pytest.raises(QueueFullError, match="full"):
            small.submit(Job(op="x", run_id="r", fn=dict))
        assert small.queue_depth == 2
    finally:
        release.set()
        small.stop()


def test_stopping_fails_queued_jobs_with_a_reason() -> None:
    s = Scheduler(workers=1)
    s.start()
    release = threading.Event()
    running = s.submit(Job(op="x", run_id="r", fn=lambda: release.wait(5) and {}))
    while running.status != "running":
        time.sleep(0.001)
    queued = s.submit(Job(op="x", run_id="r", fn=dict))
    threading.Timer(0.05, release.set).start()
    s.stop()
    assert running.status == "completed"
    assert queued.status == "failed" and "shut down" in queued.error


def test_the_api_answers_429_with_retry_after_and_records_the_refused_job(tmp_path) -> None:
    service = Service(Settings(data_dir=tmp_path, workers=1, max_queue=1))
    release = threading.Event()
    with TestClient(create_app(service=service)) as http:
        blocker = service.submit("block", "r", lambda: release.wait(5) and {}, None)
        while blocker.status != "running":  # off the queue, so the queue has room for exactly one more
            time.sleep(0.001)
        service.submit("queued", "r", dict, None)
        response = http.post("/v1/sample", json={"prompt_tokens": [1, 2], "base_model": "unused"})
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "1"
        assert "full" in response.json()["error"]
        refused = [j for j in service.store.list_jobs() if j.op == "sample"]
        assert [(j.status, j.error_category) for j in refused] == [("failed", "server")]
        release.set()


# --- passes: co-batching, the adaptive clock, fairness -----------------------------------------------------


class Recorder:
    """A pass runner that records each pass's requests and answers each request with itself."""

    def __init__(self, release: threading.Event | None = None) -> None:
        self.passes: list[list[str]] = []
        self.release = release

    def __call__(self, requests: list[str]) -> list[object]:
        if self.release is not None:
            self.release.wait(5)
        self.passes.append(list(requests))
        return [ValueError("bad request") if r.startswith("bad") else r for r in requests]


def batch_job(run: str, request: str, tokens: int = 64, fn=None) -> Job:
    """A batchable job whose result (alone or in a pass) is `{"request": request}`."""
    finish = lambda outcome: {"request": outcome}  # noqa: E731
    return Job(
        op="train",
        run_id=run,
        fn=fn or (lambda: finish(request)),
        tokens=tokens,
        batch=Batchable(kind="train", group="base", request=request, finish=finish),
    )


def hold(s: Scheduler) -> threading.Event:
    """Occupy the (single) worker until the returned event is set."""
    release = threading.Event()
    job = s.submit(Job(op="hold", run_id=None, fn=lambda: release.wait(5) and {}))
    while job.status != "running":
        time.sleep(0.001)
    return release


def started(runner: Recorder, **kwargs) -> Scheduler:
    s = Scheduler(workers=1, runners={"train": runner}, **kwargs)
    s.start()
    return s


def test_an_op_on_an_idle_worker_starts_at_once_alone() -> None:
    runner = Recorder()
    s = started(runner)
    try:
        job = s.submit(batch_job("a", "a0"))
        assert job.wait_sync(5) and job.result == {"request": "a0"}
        assert job.pass_size == 1 and runner.passes == []  # alone: no waiting for company
    finally:
        s.stop()


def test_ops_arriving_during_a_pass_gather_into_the_next_one_in_fair_order() -> None:
    runner = Recorder()
    s = started(runner)
    try:
        release = hold(s)
        jobs = [s.submit(batch_job(run, f"{run}{i}")) for i in range(2) for run in "abc"]
        release.set()
        assert all(j.wait_sync(5) for j in jobs)
        # One job per run per pass (a run's ops stay in order); each pass serves every run.
        assert runner.passes == [["a0", "b0", "c0"], ["a1", "b1", "c1"]]
        assert [j.pass_size for j in jobs] == [3] * 6
        assert [j.result for j in jobs] == [{"request": f"{run}{i}"} for i in range(2) for run in "abc"]
    finally:
        s.stop()


def test_a_pass_stays_within_its_token_budget_and_job_limit() -> None:
    runner = Recorder()
    s = started(runner, pass_token_budget=200, max_pass_jobs=3)
    try:
        release = hold(s)
        jobs = [s.submit(batch_job(run, run, tokens=64)) for run in "abcde"]
        big = s.submit(batch_job("f", "f", tokens=500))  # over the budget: it runs, alone
        release.set()
        assert all(j.wait_sync(5) for j in [*jobs, big])
        assert runner.passes == [["a", "b", "c"], ["d", "e"]]
        assert big.pass_size == 1
    finally:
        s.stop()


def test_a_pass_takes_only_runs_whose_state_fits_the_paging_budget_together() -> None:
    runner = Recorder()
    sizes = {"a": 40, "b": 40, "c": 40, "d": 90, "e": 10}  # run -> its state's bytes; the budget is 100
    asked: list[list[str]] = []

    def runs_fit(run_ids: list[str]) -> bool:
        asked.append(run_ids)
        return sum(sizes[r] for r in run_ids) <= 100

    s = started(runner, runs_fit=runs_fit)
    try:
        release = hold(s)
        jobs = [s.submit(batch_job(run, f"{run}{i}")) for i in range(2) for run in "abcde"]
        release.set()
        assert all(j.wait_sync(5) for j in jobs)
        # a + b fit (80), c would not (120), d never fits beside a (130); e (10) does: a, b, e.
        # c and d each lead a pass, then the seconds follow in fair order, by the same rule.
        assert runner.passes[0] == ["a0", "b0", "e0"]
        for members in runner.passes:
            assert sum(sizes[m[0]] for m in members) <= 100
        assert sorted(j.result["request"] for j in jobs) == sorted(
            f"{r}{i}" for i in range(2) for r in "abcde"
        )
        assert asked and all(len(set(ids)) == len(ids) for ids in asked)  # each run counted once
    finally:
        s.stop()


def test_a_failed_request_fails_its_job_alone_and_a_broken_runner_falls_back_to_one_by_one() -> None:
    runner = Recorder()
    s = started(runner)
    try:
        release = hold(s)
        ok, bad = s.submit(batch_job("a", "a")), s.submit(batch_job("b", "bad"))
        release.set()
        assert ok.wait_sync(5) and bad.wait_sync(5)
        assert ok.status == "completed" and bad.status == "failed" and "bad request" in bad.error

        def broken(requests):
            raise RuntimeError("bug in the shared path")

        s.runners["train"] = broken
        release = hold(s)
        jobs = [s.submit(batch_job(run, run)) for run in "cd"]
        release.set()
        assert all(j.wait_sync(5) for j in jobs)
        assert [j.result for j in jobs] == [{"request": "c"}, {"request": "d"}]  # each ran alone
    finally:
        s.stop()


def test_runs_share_by_tokens_so_a_heavy_run_cannot_starve_a_light_one() -> None:
    order: list[str] = []

    def record(name: str):
        return lambda: order.append(name) or {}

    s = Scheduler(workers=1)
    s.start()
    try:
        release = hold(s)
        heavy = [s.submit(Job(op="x", run_id="heavy", fn=record("H"), tokens=400)) for _ in range(3)]
        light = [s.submit(Job(op="x", run_id="light", fn=record("L"), tokens=100)) for _ in range(8)]
        release.set()
        assert all(j.wait_sync(5) for j in heavy + light)
        # Arrival order would run all of "heavy" first; fair share interleaves by tokens served.
        assert order[:6] == ["H", "L", "L", "L", "L", "H"]
        assert order.count("H") == 3 and order.count("L") == 8
    finally:
        s.stop()


def test_queued_jobs_show_position_and_an_estimated_start() -> None:
    s = Scheduler(workers=1)
    s.start()
    try:
        release = hold(s)
        jobs = [s.submit(Job(op="x", run_id=f"r{i}", fn=dict)) for i in range(3)]
        positions = [s.queue_position(j) for j in jobs]
        entries = {e.job.job_id: e for e in s.snapshot()}
        release.set()
        assert positions == [0, 1, 2]
        starts = [entries[j.job_id].estimated_start for j in jobs]
        assert all(start is not None and start >= time.time() - 5 for start in starts)
        assert starts == sorted(starts)
        assert all(j.wait_sync(5) for j in jobs)
        assert s.stats().passes >= 4 and 0 < s.stats().utilisation <= 1
    finally:
        s.stop()


def test_one_run_cannot_fill_the_queue() -> None:
    s = Scheduler(workers=1, max_queue=100, max_queue_per_run=2)
    s.start()
    try:
        release = hold(s)
        s.submit(Job(op="x", run_id="greedy", fn=dict))
        s.submit(Job(op="x", run_id="greedy", fn=dict))
        with pytest.raises(QueueFullError, match="limit per run") as caught:
            s.submit(Job(op="x", run_id="greedy", fn=dict))
        assert caught.value.retry_after >= 1
        s.submit(Job(op="x", run_id="modest", fn=dict))  # other runs still get in
        release.set()
    finally:
        s.stop()


def test_a_cancelled_queued_job_fails_without_running_and_the_rest_of_its_run_goes_on() -> None:
    scheduler = Scheduler(workers=1)  # not started: every job stays queued until it is
    ran: list[str] = []
    jobs = [
        scheduler.submit(Job(op=op, run_id="r", fn=lambda op=op: ran.append(op))) for op in ("a", "b", "c")
    ]

    assert scheduler.cancel(jobs[1].job_id, "cancelled by its client")
    assert jobs[1].status == "failed" and jobs[1].error == "cancelled by its client"
    assert jobs[1].error_category == "user" and scheduler.queue_depth == 2
    scheduler.start()
    try:
        assert jobs[2].wait_sync(10) and ran == ["a", "c"]
        assert not scheduler.cancel(jobs[0].job_id, "too late")  # finished: nothing to cancel
        assert jobs[0].status == "completed"
    finally:
        scheduler.stop()
