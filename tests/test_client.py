"""The clients, tested without a server: an in-memory fake of the REST API behind `httpx.MockTransport`.

`FakeServer` implements every route the client uses, records each request, and answers jobs after a
configurable number of polls, so tests can check both what the client sends and how it reads answers.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import httpx
import pytest

import eztinker.client as client_module
from eztinker.client import (
    AsyncEZTinkerClient,
    AsyncJobFuture,
    EZTinkerClient,
    JobFuture,
    LossFunctionConfig,
)
from eztinker.exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ClientClosedError,
    ConflictError,
    EZTinkerError,
    JobFailedError,
    JobTimeoutError,
    NotFoundError,
    RateLimitError,
    ServerError,
    ValidationError,
    retry_after_seconds,
)
from eztinker.models.api import Checkpoint, Health, Job, Run, RunMetrics, SampleOutput

LOGPROB = -1.5  # every token's logprob in the fake's forward passes


class FakeServer:
    """The native REST API in memory. `polls_before_done`: how many job polls answer `running` first."""

    def __init__(self, *, polls_before_done: int = 0) -> None:
        self.requests: list[httpx.Request] = []
        self.runs: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.checkpoints: dict[tuple[str, str], dict[str, Any]] = {}
        self.steps: Counter[str] = Counter()  # optimizer steps per run id
        self.polls_before_done = polls_before_done
        self.fail_jobs_with: str | None = None  # the next jobs fail with this message
        self._ids = itertools.count(1)

    # --- what the tests read ---

    def bodies(self, method: str, path: str) -> list[Any]:
        return [
            json.loads(r.content) if r.content else None
            for r in self.requests
            if r.method == method and r.url.path == path
        ]

    def body(self, method: str, path: str) -> Any:
        (body,) = self.bodies(method, path)
        return body

    def routes(self) -> list[tuple[str, str]]:
        return [(r.method, r.url.path) for r in self.requests]

    # --- the API ---

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        method, parts = request.method, request.url.path.strip("/").split("/")
        body: dict[str, Any] = json.loads(request.content) if request.content else {}
        match method, parts:
            case "GET", ["health"]:
                return httpx.Response(
                    200,
                    json={"version": "0.1.0", "device": "cpu", "loaded_models": ["gpt2"], "queue_depth": 0},
                )
            case "POST", ["v1", "runs"]:
                run_id = body.get("run_id") or f"run-{next(self._ids)}"
                run = {
                    "run_id": run_id,
                    "base_model": body["base_model"],
                    "lora_config": body.get("lora_config", {}),
                    "loss_config": body.get("loss_config", {}),
                    "step": 0,
                    "status": "active",
                    "created_at": 1.0,
                }
                self.runs[run_id] = run
                return httpx.Response(201, json=run)
            case "GET", ["v1", "runs"]:
                return httpx.Response(200, json=list(self.runs.values()))
            case "GET", ["v1", "runs", run_id]:
                if run_id not in self.runs:
                    return _error(404, f"no run {run_id!r}", "run_id")
                return httpx.Response(200, json=self.runs[run_id])
            case "DELETE", ["v1", "runs", run_id]:
                self.runs.pop(run_id)
                return httpx.Response(204)
            case "POST", ["v1", "runs", run_id, op]:
                return self._job(op, run_id, self._result(op, run_id, body))
            case "POST", ["v1", "sample"]:
                return self._job("sample", None, self._result("sample", None, body))
            case "GET", ["v1", "runs", run_id, "checkpoints"]:
                return httpx.Response(200, json=[c for (r, _), c in self.checkpoints.items() if r == run_id])
            case "DELETE", ["v1", "runs", run_id, "checkpoints", name]:
                self.checkpoints.pop((run_id, name))
                return httpx.Response(204)
            case "GET", ["v1", "runs", run_id, "metrics"]:
                history = [
                    {
                        "step": 1,
                        "loss": 2.0,
                        "learning_rate": 1e-4,
                        "grad_norm": 0.5,
                        "num_tokens": 5,
                        "time": 1.0,
                    }
                ]
                return httpx.Response(200, json={"run_id": run_id, "history": history})
            case "GET", ["v1", "jobs", job_id]:
                job = self.jobs[job_id]
                if job["status"] != "failed":
                    job["status"] = "completed" if job["polls"] >= self.polls_before_done else "running"
                job["polls"] += 1
                view = {k: v for k, v in job.items() if k != "polls"}
                if view["status"] not in ("completed", "failed"):
                    view["result"] = None  # no result before the job is done
                return httpx.Response(200, json=view)
        return _error(404, f"no route {method} {request.url.path}")

    def _job(self, op: str, run_id: str | None, result: dict[str, Any]) -> httpx.Response:
        job_id = f"job-{next(self._ids)}"
        failed = self.fail_jobs_with is not None
        self.jobs[job_id] = {
            "job_id": job_id,
            "status": "failed" if failed else "queued",
            "run_id": run_id,
            "op": op,
            "result": None if failed else result,
            "error": self.fail_jobs_with,
            "error_category": "user" if failed else None,
            "created_at": time.time(),
            "polls": 0,
        }
        return httpx.Response(202, json={"job_id": job_id, "status": "queued", "run_id": run_id, "op": op})

    def _result(self, op: str, run_id: str | None, body: dict[str, Any]) -> dict[str, Any]:
        if op in ("forward_backward", "forward"):
            seqs = [d.get("tokens") or d.get("input_ids") for d in body["data"]]
            logprobs = [[LOGPROB] * len(s) for s in seqs]
            weights = [
                d.get("loss_inputs", {}).get("weights", [1.0] * len(s)) for d, s in zip(body["data"], seqs)
            ]
            loss = sum(-w * lp for ws, lps in zip(weights, logprobs) for w, lp in zip(ws, lps))
            return {
                "loss": loss,
                "logprobs": logprobs,
                "metrics": {"num_tokens:sum": float(sum(map(len, seqs)))},
            }
        if op == "optim_step":
            assert run_id is not None
            self.steps[run_id] += 1
            return {
                "step": self.steps[run_id],
                "grad_norm": 0.5,
                "learning_rate": body["learning_rate"],
            }
        if op == "sample":
            samples = [
                {"text": f"sample {i}", "tokens": [7, 8], "logprobs": [-0.1, -0.2], "stop_reason": "length"}
                for i in range(body.get("n", 1))
            ]
            return {"samples": samples, "prompt_tokens": body.get("prompt_tokens", [1, 2, 3])}
        if op == "save":
            assert run_id is not None
            path = f"checkpoints/{run_id}/{body['name']}"
            checkpoint = {
                "run_id": run_id,
                "name": body["name"],
                "kind": body.get("kind", "state"),
                "step": 0,
                "adapter_path": f"{path}/adapter",
                "optimizer_path": f"{path}/optimizer.pt",
                "size_bytes": 10,
                "created_at": 1.0,
            }
            self.checkpoints[(run_id, body["name"])] = checkpoint
            return {k: checkpoint[k] for k in ("name", "step", "adapter_path", "optimizer_path")}
        if op == "load":
            assert run_id is not None
            return self.runs[run_id]
        raise AssertionError(op)


def _error(
    status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    category = "server" if status >= 500 else "user"
    return httpx.Response(
        status, json={"error": message, "field": field, "category": category}, headers=headers
    )


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
def client(server: FakeServer) -> EZTinkerClient:
    return EZTinkerClient(transport=httpx.MockTransport(server))


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Retry waits are recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr(client_module, "_sleep", recorded.append)

    async def fake_async_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(client_module, "_async_sleep", fake_async_sleep)
    return recorded


# --- the seed's examples ---------------------------------------------------------------------------------


def test_seed_quick_start_sends_lora_and_focal_loss_fields(
    client: EZTinkerClient, server: FakeServer
) -> None:
    with client:
        health = client.health()
        run_a = client.create_run(
            base_model="Qwen/Qwen2-0.5B-Instruct", lora_config={"r": 1, "lora_alpha": 2, "lora_dropout": 0.05}
        )
        run_b = client.create_run(
            base_model="gpt2",
            lora_config={"r": 8},
            loss_config=LossFunctionConfig(loss_type="focal_loss", focal_alpha=0.3, focal_gamma=2.5),
        )
        text = client.sample("Hello world", max_new_tokens=50, temperature=0.8)
        runs = client.get_runs()

    assert isinstance(health, Health) and health.loaded_models == ["gpt2"]
    assert isinstance(run_a, str) and isinstance(run_b, str) and run_a != run_b
    first, second = server.bodies("POST", "/v1/runs")
    assert first == {
        "base_model": "Qwen/Qwen2-0.5B-Instruct",
        "lora_config": {"r": 1, "lora_alpha": 2.0, "lora_dropout": 0.05},
    }  # no loss_config: the server's default (cross_entropy)
    assert second == {
        "base_model": "gpt2",
        "lora_config": {"r": 8},
        "loss_config": {"loss_type": "focal_loss", "focal_alpha": 0.3, "focal_gamma": 2.5},
    }
    assert text == "sample 0"
    sampled = {"prompt": "Hello world", "max_new_tokens": 50, "temperature": 0.8, "top_p": 1.0, "top_k": -1}
    assert server.body("POST", "/v1/sample") == sampled | {"n": 1, "prompt_logprobs": False}
    assert [r.run_id for r in runs] == [run_a, run_b] and all(isinstance(r, Run) for r in runs)


def test_seed_training_loop_reads_job_id_and_status(client: EZTinkerClient, server: FakeServer) -> None:
    run_id = client.create_run(base_model="gpt2")
    input_ids = [464, 318, 257, 3047, 1672]
    for step in range(3):
        fb_response = client.forward_backward(run_id, input_ids=input_ids, target_ids=input_ids)
        job_id = fb_response["job_id"]
        optim_response = client.optim_step(run_id, learning_rate=2e-4, weight_decay=0.01)
        assert job_id.startswith("job-") and optim_response["status"] == "queued", step
        assert f"Status: {optim_response['status']}" == "Status: queued"

    assert server.bodies("POST", f"/v1/runs/{run_id}/forward_backward")[0] == {
        "data": [{"input_ids": input_ids, "target_ids": input_ids}]
    }
    assert server.bodies("POST", f"/v1/runs/{run_id}/optim_step")[0] == {
        "learning_rate": 2e-4,
        "weight_decay": 0.01,
        "beta1": 0.9,
        "beta2": 0.95,
        "eps": 1e-12,
        "grad_clip_norm": 0.0,
    }
    assert optim_response.result() == {"step": 3, "grad_norm": 0.5, "learning_rate": 2e-4}


def test_seed_save_checkpoint_returns_status_and_paths(client: EZTinkerClient, server: FakeServer) -> None:
    run_id = client.create_run(base_model="gpt2")
    save_response = client.save_checkpoint(run_id, name="checkpoint_v1")
    assert save_response == {
        "status": "completed",
        "name": "checkpoint_v1",
        "step": 0,
        "adapter_path": f"checkpoints/{run_id}/checkpoint_v1/adapter",
        "optimizer_path": f"checkpoints/{run_id}/checkpoint_v1/optimizer.pt",
    }
    assert server.body("POST", f"/v1/runs/{run_id}/save") == {"name": "checkpoint_v1", "kind": "state"}


# --- every method's request --------------------------------------------------------------------------------


def test_run_methods_send_their_routes(client: EZTinkerClient, server: FakeServer) -> None:
    run_id = client.create_run("gpt2", run_id="mine", from_checkpoint={"run_id": "old", "name": "v1"})
    assert run_id == "mine"
    assert server.body("POST", "/v1/runs") == {
        "base_model": "gpt2",
        "run_id": "mine",
        "from_checkpoint": {"run_id": "old", "name": "v1"},
    }
    run = client.get_run("mine")
    assert isinstance(run, Run) and run.base_model == "gpt2"
    assert client.delete_run("mine") is None
    assert server.routes()[-2:] == [("GET", "/v1/runs/mine"), ("DELETE", "/v1/runs/mine")]


def test_create_run_allows_a_long_read_for_model_loading(client: EZTinkerClient, server: FakeServer) -> None:
    client.create_run("gpt2")
    client.get_runs()
    create, listing = server.requests
    assert create.extensions["timeout"]["read"] == client_module.DEFAULT_CREATE_RUN_TIMEOUT
    assert listing.extensions["timeout"]["read"] == client_module.DEFAULT_TIMEOUT.read


def test_forward_backward_takes_a_batch_with_weights(client: EZTinkerClient, server: FakeServer) -> None:
    future = client.forward_backward("r", [[1, 2, 3], [4, 5]], weights=[[1.0, 1.0, 0.0], [0.5, 0.5]])
    assert server.body("POST", "/v1/runs/r/forward_backward") == {
        "data": [
            {"input_ids": [1, 2, 3], "target_ids": [1, 2, 3], "weights": [1.0, 1.0, 0.0]},
            {"input_ids": [4, 5], "target_ids": [4, 5], "weights": [0.5, 0.5]},
        ]
    }
    result = future.result()
    assert result["logprobs"] == [[LOGPROB] * 3, [LOGPROB] * 2]


def test_training_data_may_be_tuples_or_arrays(client: EZTinkerClient, server: FakeServer) -> None:
    np = pytest.importorskip("numpy")
    client.forward_backward("r", np.array([[1, 2], [3, 4]]), target_ids=((1, -100), (3, -100)))
    client.forward("r", [np.int64(5), np.int64(6)])
    assert server.body("POST", "/v1/runs/r/forward_backward")["data"] == [
        {"input_ids": [1, 2], "target_ids": [1, -100]},
        {"input_ids": [3, 4], "target_ids": [3, -100]},
    ]
    assert server.body("POST", "/v1/runs/r/forward")["data"] == [{"input_ids": [5, 6], "target_ids": [5, 6]}]
    with pytest.raises(ValueError, match="mixes"):
        client.forward("r", [1, [2, 3]])  # ty: ignore[invalid-argument-type]


def test_forward_takes_prebuilt_token_data_and_a_tinker_loss(
    client: EZTinkerClient, server: FakeServer
) -> None:
    data = [{"tokens": [1, 2], "loss_inputs": {"target_tokens": [2, 3], "advantages": [1.0, 1.0]}}]
    client.forward("r", data=data, loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.8})
    assert server.body("POST", "/v1/runs/r/forward") == {
        "data": data,
        "loss_fn": "ppo",
        "loss_fn_config": {"clip_low_threshold": 0.8},
    }


def test_forward_backward_native_loss_override(client: EZTinkerClient, server: FakeServer) -> None:
    client.forward_backward("r", [1, 2], [1, -100], loss_config={"loss_type": "smooth_l1", "beta": 0.5})
    assert server.body("POST", "/v1/runs/r/forward_backward") == {
        "data": [{"input_ids": [1, 2], "target_ids": [1, -100]}],
        "loss_config": {"loss_type": "smooth_l1", "beta": 0.5},
    }


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({}, TypeError),  # neither input_ids nor data
        ({"input_ids": [1], "data": [{"input_ids": [1]}]}, TypeError),  # both
        ({"input_ids": []}, ValueError),
        ({"input_ids": [[1, 2]], "target_ids": [[1, 2], [3]]}, ValueError),  # batch sizes differ
        (
            {"data": [{"tokens": [1], "loss_inputs": {"target_tokens": [2]}}]},
            ValueError,
        ),  # token data, no loss_fn
    ],
)
def test_bad_training_arguments_fail_before_sending(
    client: EZTinkerClient, server: FakeServer, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        client.forward_backward("r", **kwargs)
    assert server.requests == []


def test_generate_sends_tokens_to_a_run_and_returns_every_sample(
    client: EZTinkerClient, server: FakeServer
) -> None:
    output = client.generate([1, 2, 3], 8, 0.0, run_id="r", n=2, prompt_logprobs=True, stop=["\n"], seed=7)
    assert isinstance(output, SampleOutput)
    assert [s.text for s in output.samples] == ["sample 0", "sample 1"]
    assert output.samples[0].tokens == [7, 8] and output.samples[0].logprobs == [-0.1, -0.2]
    assert server.body("POST", "/v1/runs/r/sample") == {
        "prompt_tokens": [1, 2, 3],
        "max_new_tokens": 8,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": -1,
        "stop": ["\n"],
        "seed": 7,
        "n": 2,
        "prompt_logprobs": True,
    }


def test_sample_from_a_named_base_model(client: EZTinkerClient, server: FakeServer) -> None:
    assert client.sample("Hi", base_model="gpt2", top_k=5) == "sample 0"
    body = server.body("POST", "/v1/sample")
    assert body["base_model"] == "gpt2" and body["top_k"] == 5 and body["prompt"] == "Hi"


def test_a_chat_is_sent_as_messages_and_shaping_only_when_set(
    client: EZTinkerClient, server: FakeServer
) -> None:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    client.sample(chat, run_id="r", presence_penalty=0.5, logit_bias={7: -100})
    body = server.bodies("POST", "/v1/runs/r/sample")[-1]
    assert body["messages"] == chat and "prompt" not in body and "prompt_tokens" not in body
    assert body["presence_penalty"] == 0.5 and body["logit_bias"] == {"7": -100.0}
    assert "frequency_penalty" not in body  # unset: a server from before the penalties takes the request
    client.sample("Hi", run_id="r")
    plain = server.bodies("POST", "/v1/runs/r/sample")[-1]
    assert not {"frequency_penalty", "presence_penalty", "logit_bias"} & set(plain)


def test_checkpoint_methods(client: EZTinkerClient, server: FakeServer) -> None:
    run_id = client.create_run("gpt2")
    client.save_checkpoint(run_id, "w1", kind="weights")
    (checkpoint,) = client.get_checkpoints(run_id)
    assert isinstance(checkpoint, Checkpoint) and checkpoint.kind == "weights"
    run = client.load_checkpoint(run_id, "w1", source_run_id="other", with_optimizer=False)
    assert isinstance(run, Run) and run.run_id == run_id
    assert server.body("POST", f"/v1/runs/{run_id}/load") == {
        "name": "w1",
        "source_run_id": "other",
        "with_optimizer": False,
    }
    client.delete_checkpoint(run_id, "w1")
    assert server.routes()[-1] == ("DELETE", f"/v1/runs/{run_id}/checkpoints/w1")
    assert client.get_checkpoints(run_id) == []


def test_metrics_and_jobs(client: EZTinkerClient, server: FakeServer) -> None:
    metrics = client.get_metrics("r")
    assert isinstance(metrics, RunMetrics) and metrics.history[0].grad_norm == 0.5
    future = client.optim_step("r")
    job = client.get_job(future.job_id, wait=5)
    assert isinstance(job, Job) and job.status == "completed"
    last = server.requests[-1]
    assert last.url.path == f"/v1/jobs/{future.job_id}" and last.url.params["wait"] == "5"
    assert last.extensions["timeout"]["read"] == client_module.DEFAULT_TIMEOUT.read  # 60 s > 5 s + margin
    with pytest.raises(ValueError, match="wait"):
        client.get_job(future.job_id, wait=61)


def test_path_segments_are_quoted(client: EZTinkerClient, server: FakeServer) -> None:
    with pytest.raises(NotFoundError):
        client.get_run("a/../b")
    assert server.requests[-1].url.raw_path == b"/v1/runs/a%2F..%2Fb"


def test_a_dot_segment_name_cannot_climb_to_another_route(client: EZTinkerClient, server: FakeServer) -> None:
    """httpx resolves `.` and `..`: unquoted, deleting checkpoint `..` would send DELETE /v1/runs/r."""
    run_id = client.create_run("m")
    for name in ("..", "."):
        server.checkpoints[(run_id, name)] = {}  # (what the fake deletes: a server has none so named)
        client.delete_checkpoint(run_id, name)
    sent = [r.url.raw_path for r in server.requests if r.method == "DELETE"]
    assert sent == [
        f"/v1/runs/{run_id}/checkpoints/%2E%2E".encode(),
        f"/v1/runs/{run_id}/checkpoints/%2E".encode(),
    ]
    assert client.get_run(run_id).run_id == run_id  # the run is still there
    with pytest.raises(NotFoundError):
        client.get_run("..")
    assert server.requests[-1].url.raw_path == b"/v1/runs/%2E%2E"


# --- futures -----------------------------------------------------------------------------------------------


def test_future_is_a_readable_mapping_over_its_job_ref(client: EZTinkerClient) -> None:
    future = client.forward_backward("r", [1, 2])
    assert isinstance(future, JobFuture)
    assert dict(future) == {
        "job_id": future.job_id,
        "status": "queued",
        "run_id": "r",
        "op": "forward_backward",
    }
    assert future["status"] == future.status == "queued" and future.op == "forward_backward"
    assert (
        repr(future)
        == f"JobFuture(job_id={future.job_id!r}, status='queued', run_id='r', op='forward_backward')"
    )
    assert str(future) == repr(future)
    with pytest.raises(KeyError):
        future["result"]


def test_result_long_polls_until_completed(client: EZTinkerClient) -> None:
    server = FakeServer(polls_before_done=3)
    client = EZTinkerClient(transport=httpx.MockTransport(server), poll_wait=20)
    future = client.forward_backward("r", [1, 2, 3])
    assert future.done() is False and future["status"] == "running"
    result = future.result()
    assert result == {"loss": 4.5, "logprobs": [[LOGPROB] * 3], "metrics": {"num_tokens:sum": 3.0}}
    polls = [r for r in server.requests if r.url.path.startswith("/v1/jobs/")]
    assert len(polls) == 4  # done() once, then result() until the fourth poll answers completed
    assert [p.url.params["wait"] for p in polls] == ["0", "20", "20", "20"]
    assert polls[-1].extensions["timeout"]["read"] == 60.0  # the client's read timeout, above 20 + margin
    assert future.status == "completed" and future.done() and future.job is not None
    assert future.result() is result and len(server.requests) == 5  # cached: no more polls


def test_result_timeout_raises_and_the_job_goes_on(client: EZTinkerClient) -> None:
    server = FakeServer(polls_before_done=100)
    client = EZTinkerClient(transport=httpx.MockTransport(server))
    future = client.optim_step("r")
    with pytest.raises(JobTimeoutError, match="still running") as caught:
        future.result(timeout=0)
    assert isinstance(caught.value, TimeoutError)
    assert server.requests[-1].url.params["wait"] == "0"


def test_failed_job_raises_job_failed_error_with_its_message(
    client: EZTinkerClient, server: FakeServer
) -> None:
    server.fail_jobs_with = "data[0].target_ids: length 3 does not match input_ids length 2"
    future = client.forward_backward("r", [1, 2], [1, 2, 3])
    with pytest.raises(JobFailedError, match="does not match") as caught:
        future.result()
    error = caught.value
    assert error.message == server.fail_jobs_with and error.category == "user"
    assert error.job.status == "failed" and error.job_id == future.job_id
    assert str(error) == f"job {future.job_id} (forward_backward) failed: {server.fail_jobs_with}"
    assert future.status == "failed" and future.done()
    with pytest.raises(JobFailedError):  # every later call says the same
        future.result()


def test_waiting_methods_raise_job_failed_error(client: EZTinkerClient, server: FakeServer) -> None:
    server.fail_jobs_with = "run 'r' already has a checkpoint named 'v1'"
    with pytest.raises(JobFailedError, match="already has"):
        client.save_checkpoint("r", "v1")
    with pytest.raises(JobFailedError):
        client.sample("Hello")


# --- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, AuthenticationError),
        (404, NotFoundError),
        (409, ConflictError),
        (422, ValidationError),
        (429, RateLimitError),
        (500, ServerError),
        (503, ServerError),
        (418, APIStatusError),
    ],
)
def test_each_status_maps_to_its_exception_with_the_servers_message(
    status: int, error_class: type[APIStatusError], sleeps: list[float]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return _error(status, "lora_config.r must be at most 1024", "lora_config.r")

    client = EZTinkerClient(transport=httpx.MockTransport(handler), max_retries=0)
    with pytest.raises(error_class) as caught:
        client.create_run("gpt2", lora_config={"r": 8})
    error = caught.value
    assert type(error) is error_class and isinstance(error, EZTinkerError)
    assert error.status_code == status and error.response is not None and error.response.status_code == status
    assert error.message == "lora_config.r must be at most 1024" and error.field == "lora_config.r"
    assert error.category == ("server" if status >= 500 else "user")
    assert str(error).startswith(f"{status} ") and str(error).endswith(
        "lora_config.r must be at most 1024 (field: lora_config.r)"
    )


def test_stdlib_bases_let_callers_catch_broadly() -> None:
    assert issubclass(NotFoundError, LookupError) and issubclass(ValidationError, ValueError)
    assert issubclass(APITimeoutError, APIConnectionError) and issubclass(APITimeoutError, TimeoutError)
    assert issubclass(ClientClosedError, RuntimeError)


def test_fastapi_default_and_non_json_error_bodies_are_readable() -> None:
    answers = iter(
        [
            httpx.Response(
                422, json={"detail": [{"loc": ["body", "lora_config", "r"], "msg": "too big", "type": "x"}]}
            ),
            httpx.Response(502, text="<html>Bad Gateway</html>"),
        ]
    )
    client = EZTinkerClient(transport=httpx.MockTransport(lambda request: next(answers)), max_retries=0)
    with pytest.raises(ValidationError) as caught:
        client.get_runs()
    assert caught.value.message == "too big" and caught.value.field == "lora_config.r"
    assert caught.value.detail is not None
    with pytest.raises(ServerError, match="Bad Gateway"):
        client.get_runs()


def test_retry_after_may_be_seconds_or_an_http_date() -> None:
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    assert retry_after_seconds(httpx.Response(429, headers={"Retry-After": "7"})) == 7.0
    assert 100 < (retry_after_seconds(httpx.Response(429, headers={"Retry-After": later})) or 0) <= 120
    assert retry_after_seconds(httpx.Response(429, headers={"Retry-After": "soon"})) is None
    assert retry_after_seconds(httpx.Response(429)) is None


def test_429_is_retried_after_retry_after(sleeps: list[float]) -> None:
    answers = [_error(429, "queue full", headers={"Retry-After": "2"})] * 2
    server = FakeServer()

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop() if answers else server(request)

    client = EZTinkerClient(transport=httpx.MockTransport(handler), max_retries=3)
    future = client.forward_backward("r", [1])
    assert future.status == "queued" and sleeps == [2.0, 2.0]
    assert len(server.requests) == 1  # one job submitted, not three


def test_429_gives_up_after_max_retries(sleeps: list[float]) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return _error(429, "queue full: 10000 jobs waiting", headers={"Retry-After": "1.5"})

    client = EZTinkerClient(transport=httpx.MockTransport(handler), max_retries=2)
    with pytest.raises(RateLimitError, match="queue full") as caught:
        client.optim_step("r")
    assert caught.value.retry_after == 1.5 and caught.value.status_code == 429
    assert len(calls) == 3 and sleeps == [1.5, 1.5]


def test_429_without_retry_after_backs_off_exponentially(sleeps: list[float]) -> None:
    client = EZTinkerClient(transport=httpx.MockTransport(lambda r: _error(429, "busy")), max_retries=3)
    with pytest.raises(RateLimitError):
        client.health()
    assert len(sleeps) == 3
    for attempt, slept in enumerate(sleeps):
        assert 0.75 * 0.5 * 2**attempt <= slept <= 0.5 * 2**attempt


def test_connect_errors_are_retried_then_raise_api_connection_error(sleeps: list[float]) -> None:
    failures = [httpx.ConnectError("connection refused")] * 2
    server = FakeServer()

    def handler(request: httpx.Request) -> httpx.Response:
        if failures:
            raise failures.pop()
        return server(request)

    client = EZTinkerClient(transport=httpx.MockTransport(handler))
    assert client.optim_step("r")["status"] == "queued" and len(sleeps) == 2

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    client = EZTinkerClient(
        base_url="http://gpu-box:8000", transport=httpx.MockTransport(refuse), max_retries=1
    )
    with pytest.raises(
        APIConnectionError, match="could not reach the EZTinker server at http://gpu-box:8000"
    ):
        client.health()


def test_a_post_that_may_have_arrived_is_never_resent(sleeps: list[float]) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ReadTimeout("timed out")

    client = EZTinkerClient(transport=httpx.MockTransport(handler), max_retries=3)
    with pytest.raises(APITimeoutError):
        client.forward_backward("r", [1, 2])
    assert len(calls) == 1 and sleeps == []
    with pytest.raises(APITimeoutError):  # a GET may be asked again
        client.get_runs()
    assert len(calls) == 5


# --- auth and life cycle -----------------------------------------------------------------------------------


def test_api_key_header_is_sent(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EZTINKER_API_KEY", raising=False)
    EZTinkerClient(transport=httpx.MockTransport(server), api_key="sk-test").health()
    assert server.requests[-1].headers["X-API-Key"] == "sk-test"
    monkeypatch.setenv("EZTINKER_API_KEY", "sk-from-env")
    EZTinkerClient(transport=httpx.MockTransport(server)).get_runs()
    assert server.requests[-1].headers["X-API-Key"] == "sk-from-env"
    monkeypatch.delenv("EZTINKER_API_KEY")
    EZTinkerClient(transport=httpx.MockTransport(server)).get_runs()
    assert "X-API-Key" not in server.requests[-1].headers
    assert server.requests[-1].headers["User-Agent"].startswith("eztinker-python/")


@pytest.mark.parametrize(
    ("base_url", "suggested"),
    [
        ("localhost:8000", "http://localhost:8000"),  # no scheme: httpx reads `localhost` as one
        ("127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("ftp://example.com", "http://localhost:8000"),
        ("", "http://localhost:8000"),
    ],
)
def test_a_base_url_that_is_not_http_is_refused_saying_what_to_give(base_url: str, suggested: str) -> None:
    """Not a connection error (`is it running?`) on every request: the URL is wrong, and it says so."""
    for client_class in (EZTinkerClient, AsyncEZTinkerClient):
        with pytest.raises(ValueError, match=f"give one such as {suggested}$"):
            client_class(base_url=base_url)


def test_use_after_close_raises_client_closed_error(client: EZTinkerClient, server: FakeServer) -> None:
    with client:
        future = client.forward_backward("r", [1])
    assert client.is_closed
    with pytest.raises(ClientClosedError, match=r"^This client has been closed; create a new EZTinkerClient"):
        client.health()
    with pytest.raises(ClientClosedError):
        future.result()  # futures go through their client
    with pytest.raises(ClientClosedError), client:
        pass
    client.close()  # closing twice is fine
    assert len(server.requests) == 1


def test_client_module_imports_without_torch() -> None:
    code = "import sys, eztinker.client; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names_are_sorted_and_exist() -> None:
    import eztinker.exceptions as exceptions_module

    for module in (client_module, exceptions_module):
        assert module.__all__ == sorted(module.__all__, key=lambda n: (not n.isupper(), n))
        assert all(hasattr(module, name) for name in module.__all__)


# --- forward_backward_custom -------------------------------------------------------------------------------


def squares_loss(data: list[Any], logprobs: list[Any]) -> tuple[Any, dict[str, float]]:
    """C = Σ lp²: dC/dlp = 2·lp, so with lp = −1.5 the weights must be −2·(−1.5) = 3."""
    loss = sum((lp**2).sum() for lp in logprobs)
    return loss, {"custom_metric": 7.0}


def test_forward_backward_custom_sends_minus_the_loss_gradient_as_weights(
    client: EZTinkerClient, server: FakeServer
) -> None:
    pytest.importorskip("torch")
    data = [
        {"tokens": [1, 2, 3], "loss_inputs": {"target_tokens": [2, 3, 4], "advantages": [0.1, 0.2, 0.3]}},
        {"tokens": [5, 6], "loss_inputs": {"target_tokens": [6, 7]}},
    ]
    future = client.forward_backward_custom("r", data, squares_loss)

    assert server.body("POST", "/v1/runs/r/forward") == {
        "data": [
            {"tokens": [1, 2, 3], "loss_inputs": {"target_tokens": [2, 3, 4]}},
            {"tokens": [5, 6], "loss_inputs": {"target_tokens": [6, 7]}},
        ],
        "loss_fn": "cross_entropy",
    }
    assert server.body("POST", "/v1/runs/r/forward_backward") == {
        "data": [
            {"tokens": [1, 2, 3], "loss_inputs": {"target_tokens": [2, 3, 4], "weights": [3.0, 3.0, 3.0]}},
            {"tokens": [5, 6], "loss_inputs": {"target_tokens": [6, 7], "weights": [3.0, 3.0]}},
        ],
        "loss_fn": "cross_entropy",
    }
    result = future.result()
    assert result["loss"] == pytest.approx(5 * 1.5**2)  # the user's loss, not the surrogate's
    assert result["metrics"]["custom_metric"] == 7.0 and result["metrics"]["num_tokens:sum"] == 5.0


def test_forward_backward_custom_rejects_a_loss_without_gradient(client: EZTinkerClient) -> None:
    torch = pytest.importorskip("torch")
    data = [{"tokens": [1], "loss_inputs": {"target_tokens": [2]}}]
    with pytest.raises(ValueError, match="scalar tensor"):
        client.forward_backward_custom("r", data, lambda d, lps: (torch.tensor(1.0), {}))
    with pytest.raises(ValueError, match="token datum"):
        client.forward_backward_custom("r", [{"input_ids": [1]}], squares_loss)


def test_forward_backward_custom_names_a_loss_functions_mistake_and_sends_nothing(
    client: EZTinkerClient, server: FakeServer
) -> None:
    torch = pytest.importorskip("torch")
    data = [{"tokens": [1, 2], "loss_inputs": {"target_tokens": [2, 3]}}]
    mistakes = [
        (lambda d, lps: lps[0].sum(), "must return \\(loss, metrics\\)"),  # the loss alone, no tuple
        (lambda d, lps: (lps[0].sum(), None), "metrics a dict, not NoneType"),
        (lambda d, lps: (lps[0].sum(), {"kl": "high"}), "metric 'kl' is 'high', not a number"),
        (lambda d, lps: (lps[0].sum() * float("nan"), {}), "loss is nan; nothing was sent"),
        (lambda d, lps: (torch.sqrt(lps[0] * 0).sum(), {}), "gradient has NaN or infinity"),  # d√x at 0
    ]
    for loss_fn, message in mistakes:
        with pytest.raises(ValueError, match=message):
            client.forward_backward_custom("r", data, loss_fn)
    assert not server.bodies("POST", "/v1/runs/r/forward_backward")  # only the forward passes were sent


# --- the async client ----------------------------------------------------------------------------------


def test_async_client_mirrors_the_sync_one() -> None:
    server = FakeServer(polls_before_done=1)

    async def main() -> None:
        async with AsyncEZTinkerClient(transport=httpx.MockTransport(server)) as client:
            assert (await client.health()).device == "cpu"
            run_id = await client.create_run(
                "gpt2",
                loss_config=LossFunctionConfig(loss_type="focal_loss", focal_alpha=0.3, focal_gamma=2.5),
            )
            futures = [await client.forward_backward(run_id, [1, 2, 3]) for _ in range(2)]
            optim = await client.optim_step(run_id, learning_rate=2e-4)
            assert isinstance(optim, AsyncJobFuture) and optim["status"] == "queued"
            results = await asyncio.gather(*(f.result() for f in futures))
            assert [r["loss"] for r in results] == [4.5, 4.5]
            assert (await optim)["step"] == 1
            assert await client.sample("Hi", run_id=run_id) == "sample 0"
            saved = await client.save_checkpoint(run_id, "v1")
            assert saved["status"] == "completed" and saved["adapter_path"].endswith("v1/adapter")
            assert [c.name for c in await client.get_checkpoints(run_id)] == ["v1"]
            assert (await client.load_checkpoint(run_id, "v1")).run_id == run_id
            assert (await client.get_metrics(run_id)).run_id == run_id
            assert [r.run_id for r in await client.get_runs()] == [run_id]
            await client.delete_checkpoint(run_id, "v1")
            await client.delete_run(run_id)
        with pytest.raises(ClientClosedError, match="create a new AsyncEZTinkerClient"):
            await client.get_runs()

    asyncio.run(main())
    assert server.body("POST", "/v1/runs")["loss_config"] == {
        "loss_type": "focal_loss",
        "focal_alpha": 0.3,
        "focal_gamma": 2.5,
    }


def test_async_errors_retries_and_failed_jobs(sleeps: list[float]) -> None:
    answers = [_error(429, "busy", headers={"Retry-After": "3"})]
    server = FakeServer()

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop() if answers else server(request)

    async def main() -> None:
        client = AsyncEZTinkerClient(transport=httpx.MockTransport(handler), api_key="sk-async")
        future = await client.forward_backward("r", [1])
        assert sleeps == [3.0] and server.requests[-1].headers["X-API-Key"] == "sk-async"
        with pytest.raises(NotFoundError, match="no run 'missing'") as caught:
            await client.get_run("missing")
        assert caught.value.field == "run_id"
        server.fail_jobs_with = "loss became NaN; the run was rolled back"
        failing = await client.optim_step("r")
        with pytest.raises(JobFailedError, match="NaN"):
            await failing.result()
        assert (await future.result())["loss"] == 1.5
        assert await future.done() is True
        await client.close()

    asyncio.run(main())


def test_async_forward_backward_custom() -> None:
    pytest.importorskip("torch")
    server = FakeServer()

    async def main() -> dict[str, Any]:
        async with AsyncEZTinkerClient(transport=httpx.MockTransport(server)) as client:
            data = [{"tokens": [1, 2], "loss_inputs": {"target_tokens": [2, 3]}}]
            return await (await client.forward_backward_custom("r", data, squares_loss)).result()

    result = asyncio.run(main())
    weights = server.body("POST", "/v1/runs/r/forward_backward")["data"][0]["loss_inputs"]["weights"]
    assert weights == [3.0, 3.0] and result["loss"] == pytest.approx(4.5)
