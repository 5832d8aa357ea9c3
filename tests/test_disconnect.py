"""A client that disconnects mid-request leaves no orphaned state (issue 8).

Clients hang up: a laptop sleeps, a script is interrupted, an HTTP timeout fires. Against a live server,
on every route where a hang-up could orphan something:

- an abandoned long-poll (`GET /v1/jobs/{id}?wait=`, `POST /api/v1/retrieve_future`) ends with its
  client, not when the job finishes or the wait runs out: the server keeps no task per abandoned poll.
  The job it waited for still completes, is recorded, and its result can be fetched afterwards;
- a POST whose client hangs up (before or while the server handles it) is all or nothing: the run or
  job either exists whole and completes, or never existed; no run record without its adapter, no job
  left queued or running;
- a stream (`stream: true`) abandoned after two chunks frees its sampling rows: the generation ends (at
  its token limit at the latest), its job is recorded as finished, and the next request is served; a
  non-streamed completion whose client hangs up stops waiting at once, and its job still completes.

Hang-ups are made with raw sockets (a FIN, or a RST as from a crashed client), so the test controls
exactly when the connection goes. A request's handler is a task on the server's event loop: the test
watches the tasks a request starts, to know that the server is handling it and, later, that it is done.
One request sent after a hang-up is a barrier: the server's loop has read the hang-up before answering.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import eztinker
from eztinker import EZTinkerClient
from eztinker.engine import Engine
from eztinker.service import Service
from eztinker.settings import Settings

TOKENS = [(7 + 13 * i) % 900 + 3 for i in range(12)]
ABANDONED_POLLS = 50
FINISHED = ("completed", "failed")

Tasks = set[asyncio.Task[Any]]


class LoopService(Service):
    """The service, remembering the server's event loop so a test can see the tasks on it."""

    loop: asyncio.AbstractEventLoop

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()  # called from the app's lifespan, on the server's loop
        super().start()

    def tasks(self) -> Tasks:
        """The tasks on the server's loop now: request handlers, and what they wait on."""

        async def current() -> Tasks:
            return {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}

        return asyncio.run_coroutine_threadsafe(current(), self.loop).result(10)

    def started_since(self, before: Tasks, count: int) -> Tasks:
        """Wait until at least `count` tasks not in `before` run (requests being handled); return them."""
        eventually(lambda: len(self.tasks() - before) >= count, f"the server handles {count} requests")
        return self.tasks() - before

    def ended(self, tasks: Tasks) -> bool:
        return not tasks & self.tasks()


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> str:
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, model: str) -> Iterator[tuple[str, LoopService]]:
    service = LoopService(Settings(data_dir=tmp_path_factory.mktemp("disconnect"), models=[model]))
    with eztinker.serve(service=service) as url:
        yield url, service


# --- helpers ------------------------------------------------------------------------------------------


def eventually(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.005)


class RawRequest:
    """An HTTP/1.1 request sent on a socket of its own, whose client then hangs up without reading."""

    def __init__(self, url: str, method: str, path: str, body: Any = None) -> None:
        parts = urllib.parse.urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
        payload = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + payload)

    def hang_up(self, *, reset: bool = False) -> None:
        """Close the connection: a FIN (an interrupted client), or a RST (`reset`: a crashed one)."""
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def healthy(url: str) -> None:
    """`/health` answers 200: the event loop is not stuck on the abandoned requests (no timing: a loaded
    machine may answer slowly). Also a barrier: the server has read earlier hang-ups."""
    response = httpx.get(f"{url}/health", timeout=60)
    assert response.status_code == 200


def hold(service: Service) -> threading.Event:
    """Occupy the server's one worker until the returned event is set: jobs submitted now stay queued."""
    release = threading.Event()
    job = service.submit("hold", None, lambda: {"held": release.wait(30)}, None)
    eventually(lambda: job.status == "running", "the holding job starts")
    return release


def recorded_status(service: Service, job_id: str) -> str | None:
    """The job's status in the store (None: never recorded)."""
    record = service.store.get_job(job_id)
    return None if record is None else record.status


def settled_jobs(service: Service, run_id: str) -> list[Any]:
    """The run's recorded jobs, once none of them is queued or running any more."""
    eventually(
        lambda: all(j.status in FINISHED for j in service.store.list_jobs(run_id, limit=1000)),
        f"every job of {run_id} finishes",
    )
    return service.store.list_jobs(run_id, limit=1000)


def assert_nothing_queued(url: str, run_id: str) -> None:
    queue = httpx.get(f"{url}/v1/queue", timeout=10).json()
    assert [j for j in queue["jobs"] if j.get("run_id") == run_id] == []


def gate(monkeypatch: pytest.MonkeyPatch, target: Any, name: str) -> tuple[threading.Event, threading.Event]:
    """Make `target.name` stop on entry until released: (entered, release)."""
    entered, release = threading.Event(), threading.Event()
    original = getattr(target, name)

    def gated(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert release.wait(10)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, gated)
    return entered, release


# --- native API -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_abandoned_long_polls_end_with_their_clients_and_the_job_still_completes(
    live: tuple[str, LoopService], model: str, reset: bool
) -> None:
    url, service = live
    with EZTinkerClient(base_url=url) as client:
        run_id = client.create_run(base_model=model, lora_config={"r": 2})
        release = hold(service)
        try:
            job_id = client.forward_backward(run_id, input_ids=TOKENS)["job_id"]  # queued behind the hold
            before = service.tasks()
            polls = [RawRequest(url, "GET", f"/v1/jobs/{job_id}?wait=60") for _ in range(ABANDONED_POLLS)]
            waiting = service.started_since(before, ABANDONED_POLLS)
            for poll in polls:
                poll.hang_up(reset=reset)
            # Every poll ends with its client while the job is still queued: not when the job finishes,
            # nor when its 60 s wait runs out.
            eventually(lambda: service.ended(waiting), "the abandoned long-polls end", timeout=10)
            assert recorded_status(service, job_id) == "queued"
            healthy(url)
        finally:
            release.set()
        # The job the polls waited for completes, is recorded, and a new long-poll returns its result.
        answer = httpx.get(f"{url}/v1/jobs/{job_id}", params={"wait": 30}, timeout=40).json()
        assert answer["status"] == "completed" and answer["result"]["loss"] > 0
        eventually(lambda: recorded_status(service, job_id) == "completed", "the job is recorded")
        assert not service.tasks() - before


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_create_run_hung_up_while_the_server_builds_it_is_whole_or_absent(
    live: tuple[str, LoopService], model: str, reset: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, service = live
    entered, release = gate(monkeypatch, service.backend.engine, "create_run")
    run_id = f"hung-up-create-{'rst' if reset else 'fin'}"
    before = service.tasks()
    body = {"base_model": model, "lora_config": {"r": 2}, "run_id": run_id}
    request = RawRequest(url, "POST", "/v1/runs", body)
    assert entered.wait(10), "the server starts building the run"
    handler = service.started_since(before, 1)
    request.hang_up(reset=reset)
    healthy(url)  # the server has seen the hang-up while it builds the run
    release.set()
    eventually(lambda: service.ended(handler), "the create_run request ends")
    monkeypatch.undo()

    in_store = run_id in {r.run_id for r in service.views.list_runs(None)}
    assert isinstance(service.backend.engine, Engine)  # the in-process engine, whose adapters we can list
    in_engine = run_id in {r.run_id for r in service.backend.engine.list_runs()}
    assert in_store == in_engine, "a run record without its adapter, or an adapter without its record"
    if in_store:  # whole: listed once, and it trains
        with EZTinkerClient(base_url=url) as client:
            assert [r.run_id for r in client.get_runs()].count(run_id) == 1
            assert client.forward_backward(run_id, input_ids=TOKENS).result(timeout=30)["loss"] > 0
            assert client.optim_step(run_id, learning_rate=1e-3).result(timeout=30)["step"] == 1


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_forward_backward_hung_up_while_submitted_is_recorded_once_and_completes(
    live: tuple[str, LoopService], model: str, reset: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, service = live
    with EZTinkerClient(base_url=url) as client:
        run_id = client.create_run(base_model=model, lora_config={"r": 2})
    entered, release = gate(monkeypatch, service, "forward_backward")
    before = service.tasks()
    body = {"data": [{"input_ids": TOKENS}]}
    request = RawRequest(url, "POST", f"/v1/runs/{run_id}/forward_backward", body)
    assert entered.wait(10), "the server starts submitting the op"
    handler = service.started_since(before, 1)
    request.hang_up(reset=reset)
    healthy(url)
    release.set()
    eventually(lambda: service.ended(handler), "the forward_backward request ends")
    monkeypatch.undo()

    (job,) = settled_jobs(service, run_id)
    assert job.op == "forward_backward" and job.status == "completed"
    assert_nothing_queued(url, run_id)


def test_posts_hung_up_at_once_either_complete_or_never_existed(
    live: tuple[str, LoopService], model: str
) -> None:
    url, service = live
    with EZTinkerClient(base_url=url) as client:
        run_id = client.create_run(base_model=model, lora_config={"r": 2})
        release = hold(service)  # what is accepted stays queued while its clients hang up
        try:
            before = service.tasks()
            for i in range(20):
                fb = {"data": [{"input_ids": TOKENS}]}
                RawRequest(url, "POST", f"/v1/runs/{run_id}/forward_backward", fb).hang_up(reset=i % 2 == 1)
                step = {"learning_rate": 1e-3}
                RawRequest(url, "POST", f"/v1/runs/{run_id}/optim_step", step).hang_up(reset=i % 2 == 0)
            healthy(url)  # every hang-up has been read: each request was handled or dropped
            eventually(lambda: not service.tasks() - before, "every hung-up request ends")
        finally:
            release.set()
        jobs = settled_jobs(service, run_id)
        assert len(jobs) <= 40
        assert all(j.status == "completed" for j in jobs), [(j.op, j.status, j.error) for j in jobs]
        assert_nothing_queued(url, run_id)
        # The run agrees with exactly the ops that exist: one step per recorded optim_step, and it trains on.
        steps = sum(1 for j in jobs if j.op == "optim_step")
        assert client.get_run(run_id).step == steps
        assert client.optim_step(run_id, learning_rate=1e-3).result(timeout=30)["step"] == steps + 1


# --- OpenAI streaming -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/completions", {"prompt": "go on and on", "max_tokens": 400, "temperature": 1.0, "seed": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "talk"}], "temperature": 1.0}),
    ],
    ids=["completions", "chat-without-max-tokens"],
)
def test_a_stream_abandoned_after_two_chunks_frees_its_rows(
    live: tuple[str, LoopService], model: str, route: str, body: dict[str, Any]
) -> None:
    url, service = live
    sampling = service.backend.sampling
    assert sampling is not None
    jobs_before = {j.job_id for j in service.store.list_jobs(limit=1000)}
    before = service.tasks()
    stream = {**body, "model": model, "stream": True}
    with httpx.stream("POST", f"{url}{route}", json=stream, timeout=30) as response:
        assert response.status_code == 200
        events = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line)
                if len(events) == 2:
                    break
        assert "data: [DONE]" not in events  # abandoned mid-generation
    # Leaving the block closed the connection. The generation stops and leaves no rows behind, the stream's task ends, and the sample job is recorded as finished.
    eventually(
        lambda: sampling.running_rows == 0 and sampling.waiting_rows == 0,
        "the abandoned generation leaves the sampling engine",
    )
    eventually(lambda: not service.tasks() - before, "the abandoned stream's task ends")
    (job,) = [j for j in service.store.list_jobs(limit=1000) if j.job_id not in jobs_before]
    assert job.op == "sample"
    eventually(lambda: recorded_status(service, job.job_id) == "completed", "the sample job completes")
    record = service.store.get_job(job.job_id)
    generated = sum(len(s["tokens"]) for r in record.result["results"] for s in r["sequences"])
    assert generated < 100  # decoding stopped soon after the client left, long before its limit
    healthy(url)
    # The server serves the next stream in full.
    with httpx.stream("POST", f"{url}{route}", json={**stream, "max_tokens": 8}, timeout=30) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert len(lines) >= 2 and lines[-1] == "data: [DONE]"
    assert sampling.running_rows == 0


def test_a_completion_whose_client_hangs_up_still_runs_and_is_recorded(
    live: tuple[str, LoopService], model: str
) -> None:
    url, service = live
    sampling = service.backend.sampling
    assert sampling is not None
    release = hold(service)
    try:
        jobs_before = {j.job_id for j in service.store.list_jobs(limit=1000)}
        before = service.tasks()
        body = {"model": model, "prompt": "hello", "max_tokens": 50, "temperature": 0}
        request = RawRequest(url, "POST", "/v1/completions", body)
        eventually(
            lambda: any(j.job_id not in jobs_before for j in service.store.list_jobs(limit=1000)),
            "the completion's job is submitted",
        )
        waiting = service.started_since(before, 1)
        request.hang_up()
        # Its handler stops waiting at once, while the job is still queued behind the hold.
        eventually(lambda: service.ended(waiting), "the abandoned completion's handler ends", timeout=10)
        (job,) = [j for j in service.store.list_jobs(limit=1000) if j.job_id not in jobs_before]
        assert recorded_status(service, job.job_id) == "queued"
    finally:
        release.set()
    eventually(lambda: recorded_status(service, job.job_id) == "completed", "the sample job completes")
    eventually(lambda: sampling.running_rows == 0 and sampling.waiting_rows == 0, "no rows are left")
    assert not service.tasks() - before


# --- Tinker wire --------------------------------------------------------------------------------------------


def retrieve(http: httpx.Client, request_id: str) -> dict[str, Any]:
    """The future's answer, long-polling through `try_again`."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = http.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()
        if answer.get("type") != "try_again":
            return answer
    pytest.fail(f"{request_id} never finished")


def test_abandoned_retrieve_future_polls_end_and_the_futures_keep_their_results(
    live: tuple[str, LoopService], model: str
) -> None:
    url, service = live
    with httpx.Client(base_url=url, timeout=40) as http:
        create = {
            "session_id": "sess-hang-up",
            "model_seq_id": 0,
            "base_model": model,
            "lora_config": {"rank": 2},
        }
        created = http.post("/api/v1/create_model", json=create).json()
        model_id = retrieve(http, created["request_id"])["model_id"]

        def optim_step(seq_id: int) -> str:
            body = {"model_id": model_id, "seq_id": seq_id, "adam_params": {"learning_rate": 1e-3}}
            response = http.post("/api/v1/optim_step", json=body)
            assert response.status_code == 200, response.text
            return response.json()["request_id"]

        def abandon_polls(request_id: str, reset: bool) -> None:
            before = service.tasks()
            body = {"request_id": request_id}
            polls = [RawRequest(url, "POST", "/api/v1/retrieve_future", body) for _ in range(5)]
            waiting = service.started_since(before, len(polls))
            for poll in polls:
                poll.hang_up(reset=reset)
            eventually(lambda: service.ended(waiting), f"the abandoned polls of {request_id} end", timeout=10)

        release = hold(service)
        try:
            first = optim_step(1)  # submitted, queued behind the hold: its polls wait for the job
            abandon_polls(first, reset=False)
            third = optim_step(3)  # early: held until seq 2 arrives; its polls wait for its submission
            abandon_polls(third, reset=True)
            second = optim_step(2)  # fills the gap: the held op is submitted now
        finally:
            release.set()
        answers = [retrieve(http, request_id) for request_id in (first, second, third)]
    # In seq_id order, unless seq 2 came after the bounded wait for it (then seq 3 went first).
    assert [a["metrics"]["step:max"] for a in answers] in ([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    steps = [j for j in settled_jobs(service, model_id) if j.op == "optim_step"]
    assert [j.status for j in steps] == ["completed"] * 3
    assert service.views.get_run(model_id, None).step == 3
