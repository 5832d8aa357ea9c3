"""The durable store: what survives a restart (even `kill -9`), what a restart repairs, and who sees what.

Every test that takes `url` runs against SQLite, and against PostgreSQL too when
`EZTINKER_TEST_POSTGRES_URL` names a database the tests may wipe (`.ci/run` starts one when it can).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from eztinker.store import (
    CheckpointRecord,
    DuplicateError,
    JobRecord,
    RunRecord,
    StepMetricsRecord,
    Store,
    UnknownRunError,
    sqlite_url,
)
from eztinker.store.models import Base

POSTGRES_URL = os.environ.get("EZTINKER_TEST_POSTGRES_URL")
RESTART_REASON = "the server restarted before the job finished"


def _wipe(url: str) -> None:
    with Store(url) as store:
        Base.metadata.drop_all(store.engine)


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL with no tables yet: a fresh SQLite file, or the wiped PostgreSQL test database."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "data")
        return
    if not POSTGRES_URL:
        pytest.skip("EZTINKER_TEST_POSTGRES_URL is not set")
    pytest.importorskip("psycopg", reason="install the postgres extra: uv sync --extra postgres")
    _wipe(POSTGRES_URL)
    yield POSTGRES_URL
    _wipe(POSTGRES_URL)


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    with Store(url) as store:
        yield store


def _run(run_id: str = "run-1", owner: str | None = None, **changes: Any) -> RunRecord:
    lora_config = {"rank": 8, "alpha": 16.0, "targets": ["q", "v"]}
    record = RunRecord(run_id=run_id, base_model="tiny-qwen2", lora_config=lora_config, owner=owner)
    return dataclasses.replace(record, **changes)


def _checkpoint(run_id: str = "run-1", name: str = "ckpt", owner: str | None = None) -> CheckpointRecord:
    return CheckpointRecord(
        run_id=run_id, name=name, kind="state", step=3, path=f"/data/{run_id}/{name}", owner=owner
    )


# --- round trips -------------------------------------------------------------------------------------


def test_run_round_trip_and_update(store: Store) -> None:
    record = _run(
        loss_config={"name": "cross_entropy", "kwargs": {}}, owner="keyhash", num_parameters=3 * 2**31
    )
    store.add_run(record)
    assert store.get_run("run-1") == record
    assert store.get_run("nope") is None

    assert store.update_run("run-1", step=5, last_loss=0.25, status="lost", num_parameters=7)
    updated = store.get_run("run-1")
    assert updated is not None
    assert (updated.step, updated.last_loss, updated.status, updated.num_parameters) == (5, 0.25, "lost", 7)
    assert updated.updated_at >= record.updated_at
    assert updated.lora_config == record.lora_config and updated.created_at == record.created_at

    assert store.update_run("run-1", status="active")  # fields not given are left alone
    again = store.get_run("run-1")
    assert again is not None and (again.step, again.last_loss, again.status) == (5, 0.25, "active")
    assert not store.update_run("nope", step=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(again, "step", 6)


def test_job_round_trip(store: Store) -> None:
    submitted = JobRecord(job_id="job-1", op="forward_backward", run_id="run-1", owner="k", created_at=100.0)
    store.add_job(submitted)
    assert store.get_job("job-1") == submitted
    assert store.get_job("nope") is None

    result = {"loss": 1.5, "metrics": {"tokens": 12}, "logprobs": [[-0.5, -1.25]]}
    assert store.finish_job("job-1", status="completed", result=result, started_at=100.5, finished_at=101.0)
    finished = store.get_job("job-1")
    assert finished == dataclasses.replace(
        submitted, status="completed", result=result, started_at=100.5, finished_at=101.0
    )

    store.add_job(JobRecord(job_id="job-2", op="sample", run_id="run-2", created_at=102.0))
    assert store.finish_job("job-2", status="failed", error="data[0]: empty", error_category="user")
    failed = store.get_job("job-2")
    assert failed is not None and failed.error == "data[0]: empty" and failed.error_category == "user"
    assert failed.finished_at is not None  # defaults to now
    store.add_job(JobRecord(job_id="job-3", op="create_run", created_at=103.0))
    assert not store.finish_job("nope", status="completed")

    assert [j.job_id for j in store.list_jobs()] == ["job-3", "job-2", "job-1"]  # newest first
    assert [j.job_id for j in store.list_jobs(limit=2)] == ["job-3", "job-2"]
    assert [j.job_id for j in store.list_jobs(run_id="run-1")] == ["job-1"]


def test_checkpoint_round_trip(store: Store) -> None:
    store.add_run(_run("run-1"))
    store.add_run(_run("run-2"))
    state = dataclasses.replace(
        _checkpoint("run-1", "step-3"),
        optimizer_path="/data/run-1/step-3/optimizer.safetensors",
        size_bytes=5 * 2**31,
        created_at=1.0,
    )
    weights = CheckpointRecord(
        run_id="run-1", name="sampler-3", kind="weights", step=3, path="/w", created_at=2.0
    )
    same_name_other_run = dataclasses.replace(_checkpoint("run-2", "step-3"), created_at=3.0)
    for record in (state, weights, same_name_other_run):
        store.add_checkpoint(record)

    assert store.get_checkpoint("run-1", "step-3") == state
    assert store.get_checkpoint("run-1", "nope") is None
    assert store.list_checkpoints("run-1") == [state, weights]
    assert store.list_checkpoints() == [state, weights, same_name_other_run]

    assert store.delete_checkpoint("run-1", "step-3")
    assert not store.delete_checkpoint("run-1", "step-3")
    assert store.list_checkpoints("run-1") == [weights]
    assert store.get_checkpoint("run-2", "step-3") == same_name_other_run


def test_step_metrics_are_ordered_by_step_and_advance_the_run(store: Store) -> None:
    store.add_run(_run("run-1"))
    records = [
        StepMetricsRecord(
            run_id="run-1", step=step, loss=1.0 / step, learning_rate=1e-4, grad_norm=0.5, num_tokens=64
        )
        for step in (2, 1, 3)
    ]
    for record in records:
        store.add_step_metrics(record)
    store.add_step_metrics(StepMetricsRecord(run_id="run-1", step=4))  # no loss measured

    got = store.get_step_metrics("run-1")
    assert [m.step for m in got] == [1, 2, 3, 4]
    assert got[:3] == sorted(records, key=lambda m: m.step)
    run = store.get_run("run-1")
    assert run is not None and run.step == 4 and run.last_loss == pytest.approx(1 / 3)

    assert store.get_step_metrics("nope") == []
    with pytest.raises(UnknownRunError):
        store.add_step_metrics(StepMetricsRecord(run_id="nope", step=1, loss=1.0))


# --- ownership, deletion, duplicates -----------------------------------------------------------------


def test_owner_filtering(store: Store) -> None:
    for run_id, owner in (("a1", "alice"), ("b1", "bob"), ("a2", "alice"), ("open", None)):
        store.add_run(_run(run_id, owner=owner))
        store.add_checkpoint(_checkpoint(run_id, "c", owner=owner))

    assert [r.run_id for r in store.list_runs("alice")] == ["a1", "a2"]
    assert [r.run_id for r in store.list_runs("bob")] == ["b1"]
    assert [r.run_id for r in store.list_runs("mallory")] == []
    assert [r.run_id for r in store.list_runs()] == ["open"]  # auth off: only unowned runs
    assert {r.run_id for r in store.list_runs(include_all=True)} == {"a1", "b1", "a2", "open"}

    assert [c.run_id for c in store.list_checkpoints(owner="alice")] == ["a1", "a2"]
    assert [c.run_id for c in store.list_checkpoints("b1", owner="alice")] == []
    assert [c.run_id for c in store.list_checkpoints()] == ["open"]
    assert len(store.list_checkpoints(include_all=True)) == 4


def test_delete_run_removes_metrics_and_checkpoints_but_keeps_jobs(store: Store) -> None:
    for run_id in ("gone", "kept"):
        store.add_run(_run(run_id))
        store.add_checkpoint(_checkpoint(run_id))
        store.add_step_metrics(StepMetricsRecord(run_id=run_id, step=1, loss=1.0))
        store.add_job(JobRecord(job_id=f"job-{run_id}", op="optim_step", run_id=run_id))

    assert store.delete_run("gone")
    assert not store.delete_run("gone")
    assert store.get_run("gone") is None
    assert store.get_checkpoint("gone", "ckpt") is None
    assert store.get_step_metrics("gone") == []
    job = store.get_job("job-gone")
    assert job is not None and job.run_id == "gone"  # the history outlives the run

    assert store.get_run("kept") is not None
    assert store.get_checkpoint("kept", "ckpt") is not None
    assert len(store.get_step_metrics("kept")) == 1


def test_duplicates_and_unknown_runs_are_refused(store: Store) -> None:
    store.add_run(_run("run-1"))
    store.add_checkpoint(_checkpoint("run-1", "c"))
    with pytest.raises(DuplicateError, match="checkpoint 'c' of run 'run-1' already exists"):
        store.add_checkpoint(dataclasses.replace(_checkpoint("run-1", "c"), path="/elsewhere"))
    kept = store.get_checkpoint("run-1", "c")
    assert kept is not None and kept.path == "/data/run-1/c"  # the first one is untouched

    with pytest.raises(DuplicateError):
        store.add_run(_run("run-1", base_model="other"))
    store.add_job(JobRecord(job_id="job-1", op="sample"))
    with pytest.raises(DuplicateError):
        store.add_job(JobRecord(job_id="job-1", op="sample"))
    with pytest.raises(UnknownRunError):
        store.add_checkpoint(_checkpoint("no-such-run", "c"))
    store.add_checkpoint(_checkpoint("run-1", "d"))  # the store is still usable after the errors


# --- restarts ----------------------------------------------------------------------------------------


def test_startup_recovery_marks_runs_lost_and_fails_inflight_jobs(store: Store) -> None:
    store.add_run(_run("active-1"))
    store.add_run(_run("active-2"))
    store.add_run(_run("already-lost", status="lost"))
    store.add_job(JobRecord(job_id="queued", op="forward_backward"))
    store.add_job(JobRecord(job_id="running", op="optim_step", status="running", started_at=1.0))
    store.add_job(JobRecord(job_id="done", op="sample"))
    store.finish_job("done", status="completed", result={"ok": True}, finished_at=2.0)

    before = time.time()
    assert sorted(store.mark_active_runs_lost()) == ["active-1", "active-2"]
    assert store.fail_inflight_jobs(RESTART_REASON) == 2
    assert {r.run_id: r.status for r in store.list_runs()} == {
        "active-1": "lost",
        "active-2": "lost",
        "already-lost": "lost",
    }
    for job_id in ("queued", "running"):
        job = store.get_job(job_id)
        assert job is not None
        assert (job.status, job.error, job.error_category) == ("failed", RESTART_REASON, "server")
        assert job.finished_at is not None and job.finished_at >= before
    done = store.get_job("done")
    assert done is not None and (done.status, done.result, done.finished_at) == (
        "completed",
        {"ok": True},
        2.0,
    )

    assert store.mark_active_runs_lost() == []  # nothing left to repair
    assert store.fail_inflight_jobs(RESTART_REASON) == 0
    assert store.update_run("active-1", status="active")  # load_checkpoint brings a run back


def test_everything_survives_reopening(url: str) -> None:
    run = _run("run-1", owner="k", loss_config={"name": "ppo"})
    ckpt = _checkpoint("run-1", "final", owner="k")
    metrics = StepMetricsRecord(run_id="run-1", step=1, loss=0.5, learning_rate=1e-3, grad_norm=2.0)
    with Store(url) as store:
        store.add_run(run)
        store.add_checkpoint(ckpt)
        store.add_step_metrics(metrics)
        store.add_job(JobRecord(job_id="job-1", op="save_state", run_id="run-1", owner="k"))
        store.finish_job("job-1", status="completed", result={"path": "/x"}, finished_at=5.0)

    with Store(url) as reopened:
        got = reopened.get_run("run-1")
        assert got is not None
        assert got == dataclasses.replace(run, step=1, last_loss=0.5, updated_at=got.updated_at)
        assert reopened.list_checkpoints(owner="k") == [ckpt]
        assert reopened.get_step_metrics("run-1") == [metrics]
        job = reopened.get_job("job-1")
        assert job is not None and (job.status, job.result) == ("completed", {"path": "/x"})


_KILLED_CHILD = textwrap.dedent(
    """
    import sys, time
    from eztinker.store import CheckpointRecord, JobRecord, RunRecord, StepMetricsRecord, Store

    store = Store(sys.argv[1])
    for run_id in ("run-a", "run-b"):
        store.add_run(RunRecord(run_id=run_id, base_model="tiny", lora_config={"rank": 4}, owner="h"))
    store.add_run(RunRecord(run_id="run-lost", base_model="tiny", lora_config={}, status="lost"))
    store.add_checkpoint(CheckpointRecord(run_id="run-a", name="c1", kind="state", step=0, path="/c1", owner="h"))
    store.add_job(JobRecord(job_id="job-done", op="forward_backward", run_id="run-a", owner="h"))
    store.finish_job("job-done", status="completed", result={"loss": 1.5}, started_at=1.0, finished_at=2.0)
    store.add_job(JobRecord(job_id="job-bad", op="sample", run_id="run-a"))
    store.finish_job("job-bad", status="failed", error="bad prompt", error_category="user")
    store.add_job(JobRecord(job_id="job-queued", op="optim_step", run_id="run-a"))
    store.add_job(JobRecord(job_id="job-running", op="forward_backward", run_id="run-b", status="running"))
    print("ready", flush=True)
    step = 0
    while True:  # keep writing until killed, so the kill lands in or between transactions
        step += 1
        store.add_step_metrics(StepMetricsRecord(run_id="run-a", step=step, loss=1.0 / step))
        print(step, flush=True)
    """
)


@pytest.mark.timeout(120)
def test_kill_9_loses_nothing_committed_and_restart_repairs_the_rest(url: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CHILD, url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready", child.stderr.read() if child.stderr else ""
        last_committed = 0
        while last_committed < 30:
            line = child.stdout.readline()
            assert line, child.stderr.read() if child.stderr else "the child exited"
            last_committed = int(line)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    with Store(url) as store:
        if store.engine.dialect.name == "sqlite":
            with store.engine.connect() as conn:
                assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
        assert {r.run_id: r.status for r in store.list_runs(include_all=True)} == {
            "run-a": "active",
            "run-b": "active",
            "run-lost": "lost",
        }
        steps = [m.step for m in store.get_step_metrics("run-a")]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= last_committed
        run_a = store.get_run("run-a")
        assert run_a is not None and run_a.step == len(steps)  # run row and metrics agree
        assert [c.name for c in store.list_checkpoints("run-a", owner="h")] == ["c1"]

        # What the server does at startup:
        assert sorted(store.mark_active_runs_lost()) == ["run-a", "run-b"]
        assert store.fail_inflight_jobs(RESTART_REASON) == 2

        jobs = {j.job_id: j for j in store.list_jobs()}
        assert set(jobs) == {"job-done", "job-bad", "job-queued", "job-running"}
        assert not [j for j in jobs.values() if j.status in ("queued", "running")]
        for job_id in ("job-queued", "job-running"):
            assert (jobs[job_id].status, jobs[job_id].error, jobs[job_id].error_category) == (
                "failed",
                RESTART_REASON,
                "server",
            )
        assert (jobs["job-done"].status, jobs["job-done"].result) == ("completed", {"loss": 1.5})
        assert (jobs["job-bad"].error, jobs["job-bad"].error_category) == ("bad prompt", "user")
        assert {r.status for r in store.list_runs(include_all=True)} == {"lost"}


# --- concurrency and SQLite details ------------------------------------------------------------------


def _hammer(store: Store, threads: int = 8, iterations: int = 30) -> None:
    """`threads` threads, each with its own run, writing jobs, metrics and checkpoints while reading."""
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            run_id = f"run-{t}"
            store.add_run(_run(run_id, owner=f"owner-{t % 2}"))
            barrier.wait()
            for i in range(iterations):
                job_id = f"job-{t}-{i}"
                store.add_job(JobRecord(job_id=job_id, op="forward_backward", run_id=run_id))
                store.finish_job(job_id, status="completed", result={"i": i})
                store.add_step_metrics(StepMetricsRecord(run_id=run_id, step=i + 1, loss=float(i)))
                if i % 10 == 0:
                    store.add_checkpoint(_checkpoint(run_id, f"step-{i}", owner=f"owner-{t % 2}"))
                store.list_runs(f"owner-{t % 2}")
                store.get_job(job_id)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []

    assert len(store.list_runs(include_all=True)) == threads
    jobs = store.list_jobs(limit=10 * threads * iterations)
    assert len(jobs) == threads * iterations and {j.status for j in jobs} == {"completed"}
    checkpoints_per_run = len(range(0, iterations, 10))
    assert len(store.list_checkpoints(include_all=True)) == threads * checkpoints_per_run
    for t in range(threads):
        assert [m.step for m in store.get_step_metrics(f"run-{t}")] == list(range(1, iterations + 1))
        run = store.get_run(f"run-{t}")
        assert run is not None and run.step == iterations


@pytest.mark.timeout(120)
def test_concurrent_writes_from_8_threads(store: Store) -> None:
    _hammer(store)


def test_in_memory_sqlite_is_one_shared_database() -> None:
    with Store("sqlite://") as store:
        _hammer(store, threads=4, iterations=10)


def test_sqlite_url_and_connection_settings(tmp_path: Path) -> None:
    data_dir = tmp_path / "not" / "yet"
    url = sqlite_url(data_dir)
    assert url == f"sqlite:///{data_dir.resolve()}/eztinker.db"
    with Store(url) as store:
        assert (data_dir / "eztinker.db").exists()
        with store.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30_000
