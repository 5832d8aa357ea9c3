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
    assert late.status_code == 404 and "create a new ServiceClient" in late.text
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
