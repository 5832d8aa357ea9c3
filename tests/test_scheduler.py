"""The job scheduler: futures, per-run order, overlap across runs, backpressure, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fastapi.testclient import TestClient

from eztinker.api import create_app
from eztinker.engine.errors import InvalidInputError
from eztinker.scheduler import Job, QueueFullError, Scheduler
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
