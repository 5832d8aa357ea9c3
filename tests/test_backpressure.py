"""Bounded queues: a full queue answers 429 with Retry-After, clients wait and resubmit, no op is lost.

Also the queue view: each waiting job's position and estimated start, through the API, client and CLI.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

import eztinker
from eztinker import EZTinkerClient
from eztinker.cli import app as cli
from eztinker.service import Service
from eztinker.settings import Settings

TOKENS = [(7 + 13 * i) % 900 + 3 for i in range(12)]


@pytest.fixture
def held(tmp_path, tiny_model_dir):
    """A live server with a per-run queue of 2, and `hold()`: occupy its one worker until released."""
    service = Service(Settings(data_dir=tmp_path, models=[str(tiny_model_dir)], max_queue_per_run=2))

    def hold() -> threading.Event:
        release = threading.Event()
        job = service.submit("hold", None, lambda: release.wait(30) and {}, None)
        while job.status != "running":
            time.sleep(0.001)
        return release

    with eztinker.serve(service=service) as url:
        yield url, service, hold


def test_a_full_run_queue_answers_429_with_retry_after_and_the_client_resubmits(held, tiny_model_dir) -> None:
    url, _service, hold = held
    with EZTinkerClient(base_url=url) as client:
        run_id = client.create_run(base_model=str(tiny_model_dir), lora_config={"r": 4})
        release = hold()
        queued = [client.forward_backward(run_id, input_ids=TOKENS) for _ in range(2)]
        refused = httpx.post(
            f"{url}/v1/runs/{run_id}/forward_backward", json={"data": [{"input_ids": TOKENS}]}
        )
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        assert "limit per run" in refused.json()["error"]

        threading.Timer(0.5, release.set).start()
        started = time.monotonic()
        third = client.forward_backward(run_id, input_ids=TOKENS)  # 429 at first; retried after Retry-After
        assert time.monotonic() - started >= 0.4
        step = client.optim_step(run_id, learning_rate=1e-2)
        results = [f.result(timeout=30) for f in (*queued, third)]
        assert all(r["loss"] > 0 for r in results)
        assert step.result(timeout=30)["step"] == 1
        assert client.get_run(run_id).step == 1  # nothing lost, nothing run twice


def test_the_tinker_sdk_backs_off_on_429_and_its_ops_all_complete(
    held, tiny_model_dir, monkeypatch, tmp_path
) -> None:
    tinker = pytest.importorskip("tinker")
    from tinker import types

    monkeypatch.setenv("TINKER_API_KEY", "tml-test")
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("HOME", str(tmp_path))
    url, service, hold = held
    client = tinker.ServiceClient(base_url=url)
    try:
        client.get_server_capabilities()
        training = client.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=0)
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(TOKENS[:-1]),
            loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)},
        )
        deadline = time.monotonic() + 30  # the SDK creates the model in the background: let it finish
        while not any(j.op == "create_run" and j.status == "completed" for j in service.store.list_jobs()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        release = hold()
        # After the hold, a second second of work: the SDK's ops arrive while it runs and fill the queue.
        service.submit("slow", None, lambda: time.sleep(1.0) or {}, None)
        threading.Timer(0.5, release.set).start()
        futures = [training.forward_backward([datum], "cross_entropy") for _ in range(4)]  # 2 fit, 2 wait
        futures.append(training.optim_step(types.AdamParams(learning_rate=1e-2)))
        outputs = [f.result() for f in futures]
        assert all(out.metrics["loss:sum"] > 0 for out in outputs[:4])
        refused = [j for j in service.store.list_jobs() if j.error and "limit per run" in j.error]
        assert refused, "the queue never filled: the test did not exercise backpressure"
    finally:
        client.close("success").result()


def test_the_queue_view_shows_positions_and_estimated_starts(held, tiny_model_dir) -> None:
    url, _service, hold = held
    with EZTinkerClient(base_url=url) as client:
        runs = [client.create_run(base_model=str(tiny_model_dir), lora_config={"r": 4}) for _ in range(3)]
        release = hold()
        futures = [client.forward_backward(run_id, input_ids=TOKENS) for run_id in runs]
        view = client.get_queue()
        job = client.get_job(futures[2].job_id)
        printed = CliRunner().invoke(cli, ["queue", "--url", url], env={"COLUMNS": "200"})
        release.set()
        for future in futures:
            future.result(timeout=30)
    assert view.queue_depth == 3 and view.running == 1
    assert [(j.op, j.position) for j in view.jobs] == [("hold", None)] + [
        ("forward_backward", i) for i in range(3)
    ]
    starts = [j.estimated_start for j in view.jobs[1:]]
    assert all(s is not None for s in starts) and starts == sorted(starts)
    assert job.status == "queued" and job.queue_position == 2 and job.estimated_start is not None
    assert printed.exit_code == 0, printed.output
    assert "running" in printed.output and "forward_backward" in printed.output
    assert "3 queued, 1 running" in printed.output
