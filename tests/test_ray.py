"""The Ray worker pool (`--workers ray`): a local cluster of two CPU model workers behind one API server.

Runs are placed on workers by free memory, two base models live on different workers at once, ops give
exactly what they give in-process, and when a worker is killed mid-training its runs resume on the other
worker from their last checkpoint — in-flight ops fail with the reason, the metrics history stays.
"""

import concurrent.futures
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

import eztinker
from eztinker import EZTinkerClient, LossFunctionConfig
from eztinker.backend import RunSpec
from eztinker.backend.ray_pool import CancelWatch
from eztinker.engine import AdamParams, Datum, Engine, SamplingParams, TrainOp
from eztinker.engine.errors import ConflictError, NotFoundError
from eztinker.engine.sampler import SampleRequest
from eztinker.exceptions import ConflictError as ClientConflictError
from eztinker.exceptions import JobFailedError
from eztinker.service import Service
from eztinker.settings import Settings
from eztinker.testing import make_tiny_model

pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a Ray cluster takes ~15 s to start on two cores

SLOW_LOSS = "ray_test_slow_cross_entropy"
NAN_LOSS = "ray_test_nan"
PLUGIN = f'''
import time

import torch

from eztinker.engine import register_loss_function


def slow_cross_entropy(logits, labels, weights=None, **kwargs):
    time.sleep(1.0)  # keeps an op running long enough to kill its worker under it
    shift = logits[:, :-1, :].contiguous()
    return torch.nn.functional.cross_entropy(
        shift.view(-1, shift.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def nan_loss(logits, labels, weights=None, **kwargs):
    return logits.sum() * float("nan")


register_loss_function("{SLOW_LOSS}", slow_cross_entropy)
register_loss_function("{NAN_LOSS}", nan_loss)
'''


def ids(n: int, start: int = 7) -> list[int]:
    return [(start + 13 * i) % 900 + 3 for i in range(n)]


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("tiny-gpt2-ray")
    return make_tiny_model(out, "gpt2", hidden_size=64, num_layers=2, tokenizer_dir=tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, monkeypatch_module):
    """A local Ray cluster of two CPUs, as `ray start --head` would run it; servers join it."""
    import ray

    plugin_dir = tmp_path_factory.mktemp("ray-plugin")
    (plugin_dir / "ray_test_losses.py").write_text(textwrap.dedent(PLUGIN))
    # Workers are new processes: they find the plugin through PYTHONPATH, inherited at cluster start.
    monkeypatch_module.setenv("PYTHONPATH", f"{plugin_dir}:{':'.join(sys.path)}")
    monkeypatch_module.syspath_prepend(str(plugin_dir))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()  # the cluster ends, and the detached workers with it


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray-data")


def pool_settings(data_dir: Path) -> Settings:
    """Two model workers, each paging its idle runs out beyond a budget smaller than one run's state (so
    every test here also checks that paging on a worker is invisible)."""
    return Settings(
        data_dir=data_dir,
        worker_pool="ray",
        ray_workers=2,
        plugins=["ray_test_losses"],
        port=0,
        adapter_memory="16KB",
    )


@pytest.fixture(scope="module")
def pool_service(cluster, data_dir):
    """A server whose models live on two Ray actors; a plugin loss the workers import too."""
    service = Service(pool_settings(data_dir))
    with eztinker.serve(service=service) as url:
        yield service, url


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_runs_on_two_base_models_are_placed_on_different_workers(
    pool_service, tiny_model_dir, second_model_dir
) -> None:
    service, url = pool_service
    with EZTinkerClient(base_url=url) as client:
        run_a = client.create_run(str(tiny_model_dir), {"r": 4, "seed": 1})
        run_b = client.create_run(str(second_model_dir), {"r": 4, "seed": 1})
        assert service.backend.worker_of(run_a) != service.backend.worker_of(run_b)
        for step in (1, 2):
            futures = [
                client.forward_backward(r, input_ids=ids(24), target_ids=ids(24)) for r in (run_a, run_b)
            ]
            steps = [client.optim_step(r, learning_rate=1e-2) for r in (run_a, run_b)]
            assert all(f.result()["loss"] > 0 for f in futures)
            assert [s.result()["step"] for s in steps] == [step, step]
        assert client.get_run(run_a).step == 2 and client.get_run(run_b).step == 2
        holders = {s.name: set(s.models) for s in service.backend.workers()}
        assert holders[service.backend.worker_of(run_a)] == {str(tiny_model_dir)}
        assert holders[service.backend.worker_of(run_b)] == {str(second_model_dir)}
        stats = httpx.get(f"{url}/dashboard/api/stats").json()  # the dashboard's server page
        assert {(w["name"], tuple(w["models"]), w["runs"]) for w in stats["workers"]} == {
            (service.backend.worker_of(run_a), (str(tiny_model_dir),), 1),
            (service.backend.worker_of(run_b), (str(second_model_dir),), 1),
        }
        text = client.sample("hello", max_new_tokens=4, run_id=run_b, seed=3)
        assert isinstance(text, str)
        client.delete_run(run_a)
        client.delete_run(run_b)


def test_ops_on_a_worker_equal_ops_in_process(pool_service, tiny_model_dir) -> None:
    _, url = pool_service
    engine = Engine()
    local = engine.create_run(str(tiny_model_dir), {"r": 4, "seed": 7}).run_id
    with EZTinkerClient(base_url=url) as client:
        remote = client.create_run(str(tiny_model_dir), {"r": 4, "seed": 7})
        for step in range(3):
            tokens = ids(20, start=step)
            expected = engine.forward_backward(local, [Datum.from_labels(tokens, tokens)])
            expected_step = engine.optim_step(local)
            got = client.forward_backward(remote, input_ids=tokens, target_ids=tokens).result()
            got_step = client.optim_step(remote).result()
            assert got["loss"] == pytest.approx(expected.loss, rel=1e-5)
            assert got["logprobs"][0] == pytest.approx(expected.logprobs[0].tolist(), rel=1e-5, abs=1e-6)
            assert got_step["grad_norm"] == pytest.approx(expected_step.grad_norm, rel=1e-4)
        client.delete_run(remote)


def test_a_run_id_in_use_on_any_worker_is_a_conflict(pool_service, tiny_model_dir) -> None:
    """As in-process: creating a run under an id in use fails with `ConflictError`, whichever worker
    placement would pick — never a second copy of the run on another worker (the service's rebuild of a
    lost run relies on this)."""
    service, _ = pool_service
    backend = service.backend
    backend.create_run(RunSpec(str(tiny_model_dir), {"r": 4}, run_id="ray-taken"))
    holder = backend.worker_of("ray-taken")
    for _ in range(len(backend.workers()) + 1):  # placement would pick each worker in turn
        with pytest.raises(ConflictError, match="already in use"):
            backend.create_run(RunSpec(str(tiny_model_dir), {"r": 4}, run_id="ray-taken"))
    copies = [w.name for w in backend.cluster.alive() if "ray-taken" in _runs_on(backend, w.name)]
    assert copies == [holder]
    backend.delete_run("ray-taken")


def test_an_op_for_a_run_its_worker_no_longer_holds_fails_as_not_found(pool_service, tiny_model_dir) -> None:
    """A run deleted on its worker behind this server's back (by a delete racing the op, or another API
    server of the cluster): its ops fail with `NotFoundError` (a 404, the caller's), not a failed call."""
    service, _ = pool_service
    backend = service.backend
    run_id = backend.create_run(RunSpec(str(tiny_model_dir), {"r": 4})).run_id
    backend._sync(backend.worker_of(run_id), lambda actor: actor.delete_run.remote(run_id))
    (trained,) = backend.forward_backward([TrainOp(run_id, [Datum.from_labels(ids(8), ids(8))], None)])
    (stepped,) = backend.optim_step([(run_id, AdamParams())])
    for future in (trained, stepped):
        with pytest.raises(NotFoundError, match=run_id):
            future.result(120)
    with pytest.raises(NotFoundError):
        backend.delete_run(run_id)


def _runs_on(backend, worker: str) -> set[str]:
    return {info.run_id for info in backend._sync(worker, lambda actor: actor.list_runs.remote())}


def test_model_workers_page_idle_runs_within_their_budget(pool_service, tiny_model_dir) -> None:
    """With `--adapter-memory`, each worker pages its idle runs out; a paged run trains on as if it never
    left, and the pool's `/metrics` sum its workers' pagers."""
    service, url = pool_service
    engine = Engine()
    with EZTinkerClient(base_url=url) as client:
        runs = [client.create_run(str(tiny_model_dir), {"r": 4, "seed": s}) for s in range(3)]
        locals_ = [engine.create_run(str(tiny_model_dir), {"r": 4, "seed": s}).run_id for s in range(3)]
        for step in range(2):
            tokens = ids(16, start=step)
            for remote, local in zip(runs, locals_, strict=True):  # each op pages its run in, then out
                expected = engine.forward_backward(local, [Datum.from_labels(tokens, tokens)])
                engine.optim_step(local)
                got = client.forward_backward(remote, input_ids=tokens, target_ids=tokens).result()
                client.optim_step(remote).result()
                assert got["loss"] == pytest.approx(expected.loss, rel=1e-5)
        service.backend.cluster.statuses()  # fresh worker reports
        stats = service.backend.paging_stats()
        assert stats is not None and stats.enabled and stats.budget_bytes == 2 * 16 * 1000
        assert stats.page_outs > 0 and stats.disk_runs >= 1
        assert "eztinker_adapter_page_outs_total" in httpx.get(f"{url}/metrics").text
        for remote in runs:
            client.delete_run(remote)


def test_an_op_failing_in_a_co_batched_pass_keeps_its_error_class(pool_service, tiny_model_dir) -> None:
    service, url = pool_service
    slow, nan = LossFunctionConfig(loss_type=SLOW_LOSS), LossFunctionConfig(loss_type=NAN_LOSS)
    with EZTinkerClient(base_url=url) as client:
        runs: dict[str, list[str]] = {}
        while not any(len(on) == 3 for on in runs.values()):  # three runs on one worker (of two)
            run_id = client.create_run(str(tiny_model_dir), {"r": 4})
            runs.setdefault(service.backend.worker_of(run_id), []).append(run_id)
        busy, bad, good = next(on for on in runs.values() if len(on) == 3)
        # One run's slow op holds the worker; the other two runs' ops arrive during it and share its next pass.
        holding = client.forward_backward(busy, input_ids=ids(16), loss_config=slow)
        wait_until(lambda: client.get_job(holding.job_id).status == "running")
        failing = client.forward_backward(bad, input_ids=ids(16), loss_config=nan)
        passing = client.forward_backward(good, input_ids=ids(16))
        assert passing.result()["loss"] > 0 and holding.result()["loss"] > 0
        with pytest.raises(JobFailedError) as failed:
            failing.result()
        # As in-process: the user's NaN (a NonFiniteError, category "user"), not an internal error.
        assert failed.value.category == "user"
        assert failed.value.message.startswith(f"loss {NAN_LOSS!r} is nan"), failed.value.message
        for run_id in (r for on in runs.values() for r in on):
            client.delete_run(run_id)


def test_the_tinker_sdk_and_the_openai_api_work_through_the_pool(
    pool_service, tiny_model_dir, tmp_path, monkeypatch
) -> None:
    tinker = pytest.importorskip("tinker")
    openai = pytest.importorskip("openai")
    from tinker import types

    _, url = pool_service
    monkeypatch.setenv("TINKER_API_KEY", "tml-test")
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("HOME", str(tmp_path))
    service_client = tinker.ServiceClient(base_url=url)
    service_client.get_server_capabilities()
    training = service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=0)
    tokens = ids(12)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    losses = []
    for _ in range(4):
        forward_backward = training.forward_backward([datum], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        losses.append(forward_backward.result().metrics["loss:sum"])
    assert losses[-1] < losses[0]
    sampler = training.save_weights_and_get_sampling_client(name="ray-sampler")
    sampled = sampler.sample(
        types.ModelInput.from_ints(tokens[:4]), 2, types.SamplingParams(max_tokens=5, seed=1)
    ).result()
    assert len(sampled.sequences) == 2 and all(len(s.tokens) == 5 for s in sampled.sequences)
    service_client.close("success").result()

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    completion = client.completions.create(model=str(tiny_model_dir), prompt="hello", max_tokens=4, seed=0)
    assert completion.usage.completion_tokens == 4
    stream = client.completions.create(
        model=str(tiny_model_dir), prompt="hello", max_tokens=4, seed=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == completion.choices[0].text


def test_an_abandoned_stream_stops_decoding_on_its_worker(pool_service, tiny_model_dir) -> None:
    service, url = pool_service
    before = {j.job_id for j in service.store.list_jobs(limit=1000)}
    body = {"model": str(tiny_model_dir), "messages": [{"role": "user", "content": "talk"}], "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        first = next(lines)
        next(lines), next(lines)  # a few events in: then the client hangs up
        assert first.startswith("data: ")
    (job_id,) = [j.job_id for j in service.store.list_jobs(limit=1000) if j.job_id not in before]
    wait_until(lambda: service.store.get_job(job_id).status == "completed")
    result = service.store.get_job(job_id).result
    generated = sum(len(s["tokens"]) for r in result["results"] for s in r["sequences"])
    assert generated < 100  # stopped soon after the hang-up, not at the end of the context


def test_runs_outlive_a_restart_of_the_api_server(pool_service, data_dir, tiny_model_dir) -> None:
    first, url = pool_service
    with EZTinkerClient(base_url=url) as client:
        run_id = client.create_run(str(tiny_model_dir), {"r": 4})
        client.forward_backward(run_id, input_ids=ids(16), target_ids=ids(16))
        assert client.optim_step(run_id, learning_rate=1e-2).result()["step"] == 1
    # A new API server on the same database joins the cluster: it finds the workers and their runs.
    restarted = Service(pool_settings(data_dir))
    with eztinker.serve(service=restarted) as url2, EZTinkerClient(base_url=url2) as client:
        assert {s.name for s in restarted.backend.workers()} == {s.name for s in first.backend.workers()}
        assert client.get_run(run_id).status == "active"  # not `lost`: its adapter lives on
        client.forward_backward(run_id, input_ids=ids(16), target_ids=ids(16))
        assert client.optim_step(run_id, learning_rate=1e-2).result()["step"] == 2
        assert [m.step for m in client.get_metrics(run_id).history] == [1, 2]
    assert len(first.backend.workers()) == 2  # stopping an API server leaves the detached workers running


def test_a_run_whose_worker_dies_resumes_elsewhere_from_its_last_checkpoint(
    pool_service, tiny_model_dir
) -> None:
    service, url = pool_service
    slow = LossFunctionConfig(loss_type=SLOW_LOSS)
    with EZTinkerClient(base_url=url) as client:
        run_id = client.create_run(str(tiny_model_dir), {"r": 4, "seed": 2})
        for _ in range(3):
            client.forward_backward(run_id, input_ids=ids(16), target_ids=ids(16))
            client.optim_step(run_id, learning_rate=1e-2).result()
        saved = client.save_checkpoint(run_id, name="step3")
        assert saved["step"] == 3
        for _ in range(2):  # two more steps, past the checkpoint: these are what the crash loses
            client.forward_backward(run_id, input_ids=ids(16), target_ids=ids(16))
            client.optim_step(run_id, learning_rate=1e-2).result()
        before = client.get_metrics(run_id).history
        assert [m.step for m in before] == [1, 2, 3, 4, 5]

        dead = service.backend.worker_of(run_id)
        in_flight = client.forward_backward(run_id, input_ids=ids(16), target_ids=ids(16), loss_config=slow)
        queued = client.optim_step(run_id, learning_rate=1e-2)
        wait_until(lambda: client.get_job(in_flight.job_id).status == "running")
        service.backend.kill_worker(dead)

        for future in (in_flight, queued):
            with pytest.raises(Exception, match=f"model worker {dead} died"):
                future.result()
        # The next op waits for the run to be restored, then runs on the other worker.
        resumed = client.forward_backward(run_id, input_ids=ids(16), target_ids=ids(16)).result()
        assert resumed["loss"] > 0
        assert service.backend.worker_of(run_id) not in (None, dead)
        run = client.get_run(run_id)
        assert run.status == "active" and run.step == 3  # back at its checkpoint
        assert client.optim_step(run_id, learning_rate=1e-2).result()["step"] == 4
        after = client.get_metrics(run_id).history
        # The history is intact — steps 4 and 5, lost with the worker, too — and training goes on from 3.
        assert [m.step for m in after] == [1, 2, 3, 4, 4, 5]
        assert all(m in after for m in before)
        assert max(after, key=lambda m: m.time).step == 4


def test_a_run_without_a_checkpoint_is_lost_with_its_worker_and_says_how_to_resume(
    pool_service, tiny_model_dir
) -> None:
    service, url = pool_service
    wait_until(lambda: len(service.backend.workers()) >= 2)  # the replacement for the killed worker is up
    with EZTinkerClient(base_url=url) as client:
        run_id = client.create_run(str(tiny_model_dir), {"r": 4})
        client.forward_backward(run_id, input_ids=ids(16), target_ids=ids(16)).result()
        service.backend.kill_worker(service.backend.worker_of(run_id))
        wait_until(lambda: client.get_run(run_id).status == "lost")
        with pytest.raises(ClientConflictError, match="load"):
            client.forward_backward(run_id, input_ids=ids(16), target_ids=ids(16))
        text = client.sample("hello", max_new_tokens=3, base_model=str(tiny_model_dir))
        assert isinstance(text, str)  # the pool still serves


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


def test_a_server_side_custom_loss_runs_on_a_ray_worker(
    pool_service, tiny_model_dir, tmp_path, monkeypatch
) -> None:
    """The checked graph travels with the op, so a Ray model worker computes the uploaded loss, equal to
    the SDK's client-side path on the same pool."""
    tinker = pytest.importorskip("tinker")
    import dataclasses

    import torch
    from tinker import types

    _, url = pool_service
    monkeypatch.setenv("TINKER_API_KEY", "tml-test")
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("HOME", str(tmp_path))
    service_client = tinker.ServiceClient(base_url=url)
    service_client.get_server_capabilities()
    handle = service_client.create_custom_loss(_ray_custom_loss, {"logprobs": 1, "advantages": 1}).result()
    assert handle.loss_id is not None  # uploaded, not run client-side
    tokens = ids(12)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "advantages": torch.linspace(-1, 1, len(tokens) - 1)},
    )
    on_server, on_client = (
        service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=0)
        .forward_backward_custom([datum], h)
        .result()
        .metrics["loss:sum"]
        for h in (handle, dataclasses.replace(handle, loss_id=None))
    )
    assert abs(on_server - on_client) <= 1e-6 * max(1.0, abs(on_client)), (on_server, on_client)
    service_client.close("success").result()


def _ray_custom_loss(logprobs, advantages):
    loss = -(logprobs * advantages).sum()
    return loss, {}


def test_a_sample_cancelled_before_it_starts_ends_on_its_worker_without_tokens(
    pool_service, tiny_model_dir
) -> None:
    """A cancellable sample without a token stream (Tinker's `cancel_future`) carries its state to its
    worker, whose sampler ends it before its prefill."""
    service, _ = pool_service
    cancelled = threading.Event()
    cancelled.set()
    request = SampleRequest(
        [5, 6, 7], SamplingParams(max_tokens=50, stop=[]), num_samples=2, cancelled=cancelled.is_set
    )
    kept = SampleRequest([5, 6, 7], SamplingParams(max_tokens=5, stop=[], seed=1))

    (stopped,) = service.backend.sample(str(tiny_model_dir), [request]).result(120)
    (sampled,) = service.backend.sample(str(tiny_model_dir), [kept]).result(120)

    assert [s.tokens for s in stopped.sequences] == [[], []]
    assert len(sampled.sequences[0].tokens) == 5


def test_the_cancel_watch_hangs_up_a_call_once_its_caller_cancels() -> None:
    watch = CancelWatch()
    cancelled, hung_up = threading.Event(), threading.Event()
    calls: list[str] = []
    running: concurrent.futures.Future[None] = concurrent.futures.Future()
    finished: concurrent.futures.Future[None] = concurrent.futures.Future()
    finished.set_result(None)
    watch.watch("running", [cancelled.is_set], lambda: (calls.append("running"), hung_up.set()), running)
    watch.watch("finished", [lambda: True], lambda: calls.append("finished"), finished)  # done: not watched

    cancelled.set()

    assert hung_up.wait(30)
    running.set_result(None)
    assert calls == ["running"]


def test_reads_of_a_base_model_right_after_its_worker_dies_are_answered_by_another(
    pool_service, tiny_model_dir
) -> None:
    """A worker that died an instant ago (before the health check noticed) does not fail the server's
    reads of the base models it held — a context length, a request check: a live worker answers."""
    service, _ = pool_service
    backend = service.backend
    wait_until(lambda: len(backend.workers()) >= 2)  # the replacements for earlier kills are up
    expected = backend.max_context_length(str(tiny_model_dir))
    backend.kill_worker(backend._with_model(str(tiny_model_dir)))

    assert backend.max_context_length(str(tiny_model_dir)) == expected
    backend.check_requests(str(tiny_model_dir), [SampleRequest([5, 6], SamplingParams(max_tokens=2))])
