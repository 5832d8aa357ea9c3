"""Tinker sessions end when their client stops heartbeating: a session with no heartbeat for
`session_timeout_seconds` expires, and its sampling snapshots are freed as `finish` frees them, while a
session that keeps heartbeating is untouched. The facade's clock is moved by hand, so nothing here waits."""

from __future__ import annotations

import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from eztinker.api import create_app
from eztinker.service import Service
from eztinker.settings import Settings

KEY, OTHER_KEY = "tml-sessions", "tml-sessions-other"
HEADERS = {"X-API-Key": KEY}
TIMEOUT = 600.0


@pytest.fixture
def world(tmp_path, tiny_model_dir):
    settings = Settings(
        data_dir=tmp_path,
        models=[str(tiny_model_dir)],
        api_keys=[KEY, OTHER_KEY],
        session_timeout_seconds=TIMEOUT,
    )
    service = Service(settings)
    with TestClient(create_app(service=service)) as http:
        yield http, service, str(tiny_model_dir)


def _post(http: TestClient, path: str, body: dict[str, Any]) -> Any:
    response = http.post(f"/api/v1{path}", json=body, headers=HEADERS)
    assert response.status_code == 200, response.text
    answer = response.json()
    if "request_id" not in answer:
        return answer
    while (settled := _post(http, "/retrieve_future", {"request_id": answer["request_id"]})).get(
        "type"
    ) == "try_again":
        pass
    assert "error" not in settled, settled
    return settled


def _session_with_a_snapshot(http: TestClient, model: str) -> tuple[str, str]:
    """(session id, the sampling session id of an ephemeral snapshot of its model)."""
    session = _post(http, "/create_session", {"tags": []})["session_id"]
    model_id = _post(
        http,
        "/create_model",
        {"session_id": session, "model_seq_id": 0, "base_model": model, "lora_config": {"rank": 2}},
    )["model_id"]
    saved = _post(http, "/save_weights_for_sampler", {"model_id": model_id, "sampling_session_seq_id": 0})
    return session, saved["sampling_session_id"]


def _snapshots(service: Service) -> set[str]:
    return {info.sampler_id for info in service.backend.list_samplers()}


def _freed(service: Service, sampler_id: str) -> bool:
    deadline = time.monotonic() + 30  # freed by the sampling service once no sample uses it
    while sampler_id in _snapshots(service):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_session_without_heartbeats_expires_and_frees_its_snapshots(world) -> None:
    http, service, model = world
    idle, idle_snapshot = _session_with_a_snapshot(http, model)
    state = http.app.state.tinker  # made by the first Tinker request
    now = [time.time()]
    state.clock = lambda: now[0]
    alive, alive_snapshot = _session_with_a_snapshot(http, model)
    assert {idle_snapshot, alive_snapshot} <= _snapshots(service)

    for _ in range(3):  # `alive` heartbeats on past the timeout; `idle`'s client has gone
        now[0] += TIMEOUT / 2
        _post(http, "/session_heartbeat", {"session_id": alive})

    assert _freed(service, idle_snapshot)
    assert alive_snapshot in _snapshots(service)
    assert state.durable.get("session", idle).value["status"] == "expired"
    assert state.durable.get("session", alive).value["status"] == "active"
    late = http.post("/api/v1/session_heartbeat", json={"session_id": idle}, headers=HEADERS)
    assert late.status_code == 410 and "create a new ServiceClient" in late.text  # the SDK stops on 410
    # the expired session's training run is the caller's as before: only the snapshot went
    assert http.get("/api/v1/training_runs", headers=HEADERS).json()["training_runs"]


def test_heartbeats_reach_only_the_callers_sessions(world) -> None:
    http, _, _ = world
    session = _post(http, "/create_session", {"tags": []})["session_id"]
    state = http.app.state.tinker
    before = state.heartbeats[session]
    other = http.post(
        "/api/v1/session_heartbeat", json={"session_id": session}, headers={"X-API-Key": OTHER_KEY}
    )
    assert other.status_code == 404 and state.heartbeats[session] == before  # answered as missing
    assert http.post("/api/v1/session_heartbeat", headers=HEADERS).status_code == 200  # no body: fine


def test_a_session_from_before_a_restart_expires_from_the_first_check(world) -> None:
    """The server restarted: a session its store says is active, that this process has never heard from,
    counts from the first check and expires a timeout later unless its client heartbeats; sessions that
    ended before the restart stay as they ended."""
    http, _, _ = world
    _post(http, "/session_heartbeat", {})  # the facade's state is made by the first Tinker request
    state = http.app.state.tinker
    state.durable.put("session", "sess-before-restart", {"tags": [], "status": "active"}, owner=KEY)
    state.durable.put("session", "sess-finished-before", {"tags": [], "status": "finished"}, owner=KEY)
    now = [time.time()]
    state.clock, state.sessions_checked_at = (lambda: now[0]), 0.0  # as a fresh process

    _post(http, "/session_heartbeat", {})  # the first check: the stored active session counts from now
    assert state.heartbeats["sess-before-restart"] == now[0]
    assert "sess-finished-before" not in state.heartbeats
    now[0] += TIMEOUT + 1
    _post(http, "/session_heartbeat", {})

    assert state.durable.get("session", "sess-before-restart").value["status"] == "expired"
    assert state.durable.get("session", "sess-finished-before").value["status"] == "finished"
    assert "sess-before-restart" not in state.heartbeats


def test_a_finished_sessions_heartbeat_is_gone_so_the_sdk_stops_heartbeating(world) -> None:
    """The SDK's heartbeat loop ends only on a 410 (`internal_client_holder._session_heartbeat`); on any
    other error it heartbeats on every 10 s and warns of an unreliable connection, e.g. in the unpickled
    `SamplingClient` of a worker process whose parent closed its `ServiceClient`."""
    http, _, _ = world
    session = _post(http, "/create_session", {"tags": []})["session_id"]
    _post(http, f"/sessions/{session}/finish", {"reason": {"type": "success"}})

    late = http.post("/api/v1/session_heartbeat", json={"session_id": session}, headers=HEADERS)

    assert late.status_code == 410
    assert late.json() == {
        "error": f"session {session!r} has ended (success): create a new ServiceClient to continue",
        "category": "user",
    }


def test_nothing_new_is_made_in_an_ended_session(world) -> None:
    """What an ended session held was freed when it ended, and nothing would free what is made in it
    later (a checkpoint's sampling snapshot, a model's): each is refused, naming the session. Its
    existing models still train."""
    http, service, model = world
    session = _post(http, "/create_session", {"tags": []})["session_id"]
    model_id = _post(
        http,
        "/create_model",
        {"session_id": session, "model_seq_id": 0, "base_model": model, "lora_config": {"rank": 2}},
    )["model_id"]
    path = _post(http, "/save_weights_for_sampler", {"model_id": model_id, "path": "w", "seq_id": 1})["path"]
    _post(http, f"/sessions/{session}/finish", {"reason": {"type": "success"}})
    held = _snapshots(service)

    new_model = {"session_id": session, "model_seq_id": 1, "base_model": model, "lora_config": {"rank": 2}}
    on_checkpoint = {"session_id": session, "sampling_session_seq_id": 5, "model_path": path}
    from_state = {"session_id": session, "model_seq_id": 2, "path": path, "optimizer": False}
    for route, body in [
        ("/create_model", new_model),
        ("/create_sampling_session", on_checkpoint),
        ("/load_weights", from_state),
    ]:
        refused = http.post(f"/api/v1{route}", json=body, headers=HEADERS)
        assert refused.status_code == 404, (route, refused.text)
        assert "has ended (success): create a new ServiceClient" in refused.text
    snapshot = http.post(
        "/api/v1/save_weights_for_sampler",
        json={"model_id": model_id, "sampling_session_seq_id": 6, "seq_id": 2},
        headers=HEADERS,
    ).json()
    failed = _post_raw(http, "/retrieve_future", {"request_id": snapshot["request_id"]})
    assert "has ended (success)" in failed["error"] and failed["category"] == "user"

    assert _snapshots(service) == held  # no snapshot made that nothing would free
    trained = _post(
        http, "/optim_step", {"model_id": model_id, "seq_id": 3, "adam_params": {"learning_rate": 0.1}}
    )
    assert "metrics" in trained


def _post_raw(http: TestClient, path: str, body: dict[str, Any]) -> Any:
    """A retrieve_future's settled answer, a failure included."""
    while (answer := http.post(f"/api/v1{path}", json=body, headers=HEADERS).json()).get(
        "type"
    ) == "try_again":
        pass
    return answer
