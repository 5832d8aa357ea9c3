"""The SDK's opt-in sampling paths, which this server turns on: one completion queue per sampling client
(`retrieve_futures`), clone numbers for unpickled clients (`join_sampling_session`), and cancelling an
abandoned sample (`cancel_future`). Each is checked through the wire, and the queue and the cancel through
the official SDK too; samples that must stay in flight are held at the backend (`HeldSamples`), so
nothing here races the sampler."""

from __future__ import annotations

import asyncio
import concurrent.futures
import pickle
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import eztinker
from eztinker.api import create_app
from eztinker.service import Service
from eztinker.settings import Settings

KEY, OTHER_KEY = "tml-sampling-alice", "tml-sampling-bob"
PROMPT = {"chunks": [{"type": "encoded_text", "tokens": [5, 6, 7]}]}


class HeldSamples:
    """The backend's `sample`, held: each call waits until `release()`, then samples for real."""

    def __init__(self, service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
        self.requests: list[list[Any]] = []  # each held call's engine requests
        self._real = service.backend.sample
        self._held: list[tuple[str, list[Any], concurrent.futures.Future[Any]]] = []
        monkeypatch.setattr(service.backend, "sample", self._sample)

    def _sample(self, base_model: str, requests: list[Any]) -> concurrent.futures.Future[Any]:
        out: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.requests.append(requests)
        self._held.append((base_model, requests, out))
        return out

    def release(self) -> None:
        held, self._held = self._held, []
        for base_model, requests, out in held:
            real = self._real(base_model, requests)
            real.add_done_callback(lambda done, out=out: _copy(done, out))


def _copy(done: concurrent.futures.Future[Any], out: concurrent.futures.Future[Any]) -> None:
    if done.exception() is not None:
        out.set_exception(done.exception())
    else:
        out.set_result(done.result())


def _settings(data_dir: Path, model: Path, **extra: Any) -> Settings:
    return Settings(data_dir=data_dir, models=[str(model)], api_keys=[KEY, OTHER_KEY], **extra)


@pytest.fixture
def world(tmp_path, tiny_model_dir):
    service = Service(_settings(tmp_path, tiny_model_dir))
    with TestClient(create_app(service=service)) as http:
        yield http, service, str(tiny_model_dir)


def _post(http: TestClient, path: str, body: dict[str, Any], key: str = KEY) -> Any:
    response = http.post(f"/api/v1{path}", json=body, headers={"X-API-Key": key})
    assert response.status_code == 200, response.text
    return response.json()


def _settle(http: TestClient, request_id: str, key: str = KEY) -> dict[str, Any]:
    while (answer := _post(http, "/retrieve_future", {"request_id": request_id}, key)).get(
        "type"
    ) == "try_again":
        pass
    return answer


def _sampling_session(http: TestClient, model: str, key: str = KEY) -> str:
    session = _post(http, "/create_session", {"tags": []}, key)["session_id"]
    made = _post(http, "/create_sampling_session", {"session_id": session, "base_model": model}, key)
    return made["sampling_session_id"]


def _asample(http: TestClient, sampler: str, seq_id: int, max_tokens: int = 4, key: str = KEY) -> str:
    body = {
        "sampling_session_id": sampler,
        "seq_id": seq_id,
        "num_samples": 1,
        "prompt": PROMPT,
        "sampling_params": {"max_tokens": max_tokens, "seed": seq_id, "stop": []},
    }
    return _post(http, "/asample", body, key)["request_id"]


def _poll(
    http: TestClient, sampler: str, cursor: int, *, timeout: float | None = None, clone: int = 0, **extra
):
    target = {"type": "sampling_session", "sampling_session_id": sampler, "cloned_sampler_id": clone}
    return _post(
        http, "/retrieve_futures", {"target": target, "prev_cursor": cursor, "timeout": timeout, **extra}
    )


def _ended(http: TestClient, sampler: str, want: int, clone: int = 0) -> tuple[dict[str, str], int]:
    """Long-poll until `want` requests are reported; (request id -> state, the last cursor)."""
    seen: dict[str, str] = {}
    cursor = 0
    for _ in range(want + 3):  # each poll returns as soon as something ended
        answer = _poll(http, sampler, cursor, clone=clone)
        seen |= {c["request_id"]: c["state"] for c in answer["completions"]}
        cursor = answer["cursor"]
        if len(seen) >= want:
            return seen, cursor
    raise AssertionError(f"only {seen} reported")


# --- the completion queue ---------------------------------------------------------------------------------


def test_the_server_turns_the_sdks_sampling_paths_on(world) -> None:
    http, _, _ = world
    config = _post(http, "/client/config", {})
    assert config["sample_use_retrieve_futures"] and config["sample_join_sampling_session"]
    assert _post(http, "/client/dynamic_config", {})["sample_cancel_enabled"] is True


def test_a_poll_reports_ended_requests_once_and_an_acknowledged_cursor_drops_them(world) -> None:
    http, _, model = world
    sampler = _sampling_session(http, model)
    first, second = _asample(http, sampler, 1), _asample(http, sampler, 2)

    seen, cursor = _ended(http, sampler, 2)

    assert seen == {first: "finished", second: "finished"}
    again = _poll(http, sampler, cursor, timeout=0)  # acknowledges both: nothing is reported twice
    assert again == {"completions": [], "cursor": cursor}
    assert all(len(_settle(http, r)["sequences"]) == 1 for r in (first, second))
    assert _poll(http, sampler, 0, timeout=0)["completions"] == []  # delivered: gone from the queue


def test_a_finished_event_gives_the_size_of_its_protobuf_payload(world) -> None:
    """As hosted Tinker does (`FutureFinished.response_payload_uncompressed_size`): the SDK reserves that
    much of its in-flight response budget before it fetches the payload. A failed event has no payload."""
    http, _, model = world
    sampler = _sampling_session(http, model)
    request = _asample(http, sampler, 1)
    refused = _post(
        http,
        "/asample",
        {"sampling_session_id": sampler, "seq_id": 2, "prompt": PROMPT, "sampling_params": {"max_tokens": 0}},
    )["request_id"]
    events: dict[str, dict[str, Any]] = {}
    cursor = 0
    while len(events) < 2:
        answer = _poll(http, sampler, cursor)
        events |= {c["request_id"]: c for c in answer["completions"]}
        cursor = answer["cursor"]

    payload = http.post(
        "/api/v1/retrieve_future",
        json={"request_id": request, "allow_metadata_only": False},
        headers={"X-API-Key": KEY, "Accept": "application/x-protobuf"},
    )
    assert payload.headers["content-type"] == "application/x-protobuf"
    assert events[request] == {
        "state": "finished",
        "request_id": request,
        "response_payload_uncompressed_size": len(payload.content),
    }
    assert events[refused] == {"state": "failed", "request_id": refused}


def test_an_ack_only_poll_answers_at_once_while_samples_run(world, monkeypatch) -> None:
    http, service, model = world
    held = HeldSamples(service, monkeypatch)
    sampler = _sampling_session(http, model)
    request = _asample(http, sampler, 1)

    assert _poll(http, sampler, 0, timeout=0)["completions"] == []  # held: not ended, and no waiting

    held.release()
    seen, _ = _ended(http, sampler, 1)
    assert seen == {request: "finished"}


def test_a_refused_sample_is_reported_failed_with_its_reason(world) -> None:
    http, _, model = world
    sampler = _sampling_session(http, model)
    body = {
        "sampling_session_id": sampler,
        "seq_id": 1,
        "prompt": PROMPT,
        "sampling_params": {"max_tokens": 10**6},
    }
    request = _post(http, "/asample", body)["request_id"]

    seen, _ = _ended(http, sampler, 1)

    assert seen == {request: "failed"}
    assert "max tokens (1000000)" in _settle(http, request)["error"]


def test_each_clone_has_its_own_queue(world) -> None:
    http, _, model = world
    sampler = _sampling_session(http, model)
    clone = _post(http, "/join_sampling_session", {"sampling_session_id": sampler})["client_counter"]
    original, copied = _asample(http, sampler, 1), _asample(http, sampler, clone * 1_000_000_000)

    assert _ended(http, sampler, 1, clone=clone)[0] == {copied: "finished"}
    assert _ended(http, sampler, 1, clone=0)[0] == {original: "finished"}


def test_after_a_restart_a_sample_that_was_in_flight_is_reported_failed(
    tmp_path, tiny_model_dir, monkeypatch
):
    """Its client long-polls the new process with the old cursor and hears that the sample failed, with
    the restart's reason, instead of waiting for it forever."""
    settings = _settings(tmp_path, tiny_model_dir)
    service = Service(settings)
    with TestClient(create_app(service=service)) as http:
        HeldSamples(service, monkeypatch)  # never released: in flight when the server stops
        sampler = _sampling_session(http, str(tiny_model_dir))
        delivered = _asample(http, sampler, 1)
        cursor = _poll(http, sampler, 0, timeout=0)["cursor"]
        lost = _asample(http, sampler, 2)
        http.app.state.tinker.completions.leave([delivered])  # as if retrieved before the restart

    with TestClient(create_app(service=Service(settings))) as http:
        answer = _poll(http, sampler, cursor)

        assert [(c["request_id"], c["state"]) for c in answer["completions"]] == [(lost, "failed")]
        assert answer["cursor"] > cursor  # cursors only grow, across processes too
        assert "error" in _settle(http, lost)


def test_samples_of_a_finished_session_are_still_reported(world, monkeypatch) -> None:
    """A client closed its session while samples ran: a copy of it in another process may still wait on
    them (it shares the session), so they are reported as they end."""
    http, service, model = world
    held = HeldSamples(service, monkeypatch)
    session = _post(http, "/create_session", {"tags": []})["session_id"]
    sampler = _post(http, "/create_sampling_session", {"session_id": session, "base_model": model})[
        "sampling_session_id"
    ]
    requests = {_asample(http, sampler, seq) for seq in (1, 2)}
    http.post(f"/api/v1/sessions/{session}/finish", json={}, headers={"X-API-Key": KEY})

    held.release()

    assert set(_ended(http, sampler, 2)[0]) == requests


def test_a_sample_refused_for_an_unknown_sampling_session_makes_no_queue(world) -> None:
    http, _, _ = world
    state_before = len(http.app.state.tinker.completions._queues) if hasattr(http.app.state, "tinker") else 0
    for i in range(20):
        body = {"sampling_session_id": f"no-such-{i}", "seq_id": 1, "prompt": PROMPT}
        assert "error" in _settle(http, _post(http, "/asample", body)["request_id"])

    assert len(http.app.state.tinker.completions._queues) == state_before  # nothing that nobody could poll


# --- clone numbers ----------------------------------------------------------------------------------------


def test_clone_numbers_are_unique_in_a_sampling_session_and_survive_a_restart(
    tmp_path, tiny_model_dir
) -> None:
    settings = _settings(tmp_path, tiny_model_dir)
    with TestClient(create_app(service=Service(settings))) as http:
        sampler = _sampling_session(http, str(tiny_model_dir))
        other = _sampling_session(http, str(tiny_model_dir))
        join = {"sampling_session_id": sampler}
        counters = [_post(http, "/join_sampling_session", join)["client_counter"] for _ in range(2)]
        assert _post(http, "/join_sampling_session", {"sampling_session_id": other})["client_counter"] == 1
    with TestClient(create_app(service=Service(settings))) as http:
        counters.append(_post(http, "/join_sampling_session", join)["client_counter"])

    assert counters == [1, 2, 3]  # 0 is the original client's


# --- cancelling -------------------------------------------------------------------------------------------


def test_a_cancelled_running_sample_stops_fails_and_is_never_reported(world, monkeypatch) -> None:
    http, service, model = world
    held = HeldSamples(service, monkeypatch)
    sampler = _sampling_session(http, model)
    cancelled, kept = _asample(http, sampler, 1, max_tokens=64), _asample(http, sampler, 2)
    (rows,) = [r for r in held.requests if r[0].params.seed == 1]

    assert _post(http, "/cancel_future", {"request_id": cancelled})["cancelled"] is True
    assert rows[0].cancelled()  # the sampler stops its rows at the next token
    held.release()

    assert _ended(http, sampler, 1)[0] == {kept: "finished"}  # only the request someone waits for
    assert "cancelled by its client" in _settle(http, cancelled)["error"]


def test_cancelling_a_finished_sample_changes_nothing(world) -> None:
    http, _, model = world
    sampler = _sampling_session(http, model)
    request = _asample(http, sampler, 1)
    first = _settle(http, request)

    assert _post(http, "/cancel_future", {"request_id": request})["cancelled"] is False
    assert _settle(http, request) == first


def test_only_samples_can_be_cancelled(world) -> None:
    http, _, model = world
    session = _post(http, "/create_session", {"tags": []})["session_id"]
    body = {"session_id": session, "model_seq_id": 0, "base_model": model, "lora_config": {"rank": 2}}
    request = _post(http, "/create_model", body)["request_id"]
    _settle(http, request)

    refused = http.post("/api/v1/cancel_future", json={"request_id": request}, headers={"X-API-Key": KEY})

    assert refused.status_code == 422 and "only sampling requests" in refused.text


def test_an_expired_session_cancels_its_running_samples(tmp_path, tiny_model_dir, monkeypatch) -> None:
    """The SDK's fallback when no cancel came: a session whose client stopped heartbeating."""
    timeout = 600.0
    service = Service(_settings(tmp_path, tiny_model_dir, session_timeout_seconds=timeout))
    with TestClient(create_app(service=service)) as http:
        held = HeldSamples(service, monkeypatch)
        sampler = _sampling_session(http, str(tiny_model_dir))
        request = _asample(http, sampler, 1, max_tokens=64)
        state = http.app.state.tinker
        now = [state.clock() + 2 * timeout]
        state.clock, state.sessions_checked_at = (lambda: now[0]), 0.0

        _post(http, "/create_session", {"tags": []})  # a new client: idle sessions are looked for

        assert held.requests[0][0].cancelled()
        held.release()
        assert "cancelled by its client" in _settle(http, request)["error"]


# --- isolation --------------------------------------------------------------------------------------------


def test_another_key_reaches_none_of_it(world, monkeypatch) -> None:
    http, service, model = world
    held = HeldSamples(service, monkeypatch)
    sampler = _sampling_session(http, model)
    request = _asample(http, sampler, 1)
    bob = {"X-API-Key": OTHER_KEY}
    target = {"sampling_session_id": sampler, "cloned_sampler_id": 0}

    poll = http.post("/api/v1/retrieve_futures", json={"target": target, "timeout": 0}, headers=bob)
    join = http.post("/api/v1/join_sampling_session", json={"sampling_session_id": sampler}, headers=bob)
    cancel = http.post("/api/v1/cancel_future", json={"request_id": request}, headers=bob)
    missing = http.post("/api/v1/cancel_future", json={"request_id": "req-none"}, headers=bob)

    assert poll.status_code == join.status_code == cancel.status_code == 404
    assert cancel.json()["error"].replace(request, "req-none") == missing.json()["error"]
    bobs = _sampling_session(http, model, OTHER_KEY)  # Bob acknowledges Alice's request in his own poll
    acked = {"target": {"sampling_session_id": bobs}, "timeout": 0, "retrieved_request_ids": [request]}
    assert http.post("/api/v1/retrieve_futures", json=acked, headers=bob).status_code == 200
    assert not held.requests[0][0].cancelled()
    held.release()
    assert _ended(http, sampler, 1)[0] == {request: "finished"}  # Alice's sample, as if Bob never came
    assert _post(http, "/join_sampling_session", {"sampling_session_id": sampler})["client_counter"] == 1


# --- through the SDK --------------------------------------------------------------------------------------

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402


@pytest.fixture
def sdk(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", KEY)
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    service = Service(_settings(tmp_path / "data", tiny_model_dir))
    with eztinker.serve(service=service) as url:
        client = tinker.ServiceClient(base_url=url)
        yield client, service, str(tiny_model_dir)
        client.close("success").result()


def test_the_sdk_samples_through_one_queue_per_client(sdk, monkeypatch) -> None:
    import tinker.resources.futures as futures

    client, _, model = sdk
    polls: Counter[str] = Counter()
    real = futures.AsyncFuturesResource.retrieve_multi

    async def counted(self, *args, **kwargs):
        answer = await real(self, *args, **kwargs)
        polls["polls"] += 1
        polls["reported"] += len(answer.completions)
        return answer

    monkeypatch.setattr(futures.AsyncFuturesResource, "retrieve_multi", counted)
    sampling = client.create_sampling_client(base_model=model)
    prompt = types.ModelInput.from_ints([5, 6, 7])
    pending = [sampling.sample(prompt, 2, types.SamplingParams(max_tokens=4, seed=i)) for i in range(4)]
    results = [f.result(timeout=120) for f in pending]
    copy = pickle.loads(pickle.dumps(sampling))
    copied = copy.sample(prompt, 2, types.SamplingParams(max_tokens=4, seed=0)).result(timeout=120)
    copy.holder.close()  # an unpickled client heartbeats its session on its own until closed

    assert [len(r.sequences) for r in results] == [2, 2, 2, 2]
    assert polls["reported"] == 5  # every sample, the copy's included, was heard of through a queue
    assert copy._cloned_sampler_id == 1
    assert [s.tokens for s in copied.sequences] == [s.tokens for s in results[0].sequences]  # same seed


def test_an_sdk_future_abandoned_on_timeout_is_cancelled_on_the_server(sdk, monkeypatch) -> None:
    client, service, model = sdk
    held = HeldSamples(service, monkeypatch)
    cancels: list[str] = []
    arrived = threading.Event()
    real_cancel = service.sampling.cancel

    def cancel(job_id: str) -> bool:
        cancels.append(job_id)
        arrived.set()
        return real_cancel(job_id)

    monkeypatch.setattr(service.sampling, "cancel", cancel)
    sampling = client.create_sampling_client(base_model=model)
    future = sampling.sample(types.ModelInput.from_ints([5, 6, 7]), 1, types.SamplingParams(max_tokens=64))

    async def abandon() -> None:
        with pytest.raises((asyncio.TimeoutError, TimeoutError)):
            await future.result_async(timeout=0.5)  # held: it cannot finish in time

    asyncio.run(abandon())

    assert arrived.wait(60)  # the SDK sends the cancel from its own loop
    (cancelled,) = cancels
    assert service.scheduler.get(cancelled).op == "sample" and held.requests[0][0].cancelled()
    held.release()
