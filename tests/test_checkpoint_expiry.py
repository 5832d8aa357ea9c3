"""Checkpoints past their TTL (`expires_at`) are deleted by the service's sweeper, files and records."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

import eztinker
from eztinker import EZTinkerClient
from eztinker.service import Service
from eztinker.settings import Settings


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    service = Service(Settings(data_dir=tmp_path_factory.mktemp("expiry-data"), models=[str(tiny_model_dir)]))
    with eztinker.serve(service=service) as url:
        yield service, url


def _rest_checkpoints(url: str, run_id: str) -> dict[str, dict]:
    answer = httpx.get(f"{url}/api/v1/training_runs/{run_id}/checkpoints")
    answer.raise_for_status()
    return {c["checkpoint_id"]: c for c in answer.json()["checkpoints"]}


def test_sweep_deletes_expired_checkpoints_and_keeps_the_others(served, tiny_model_dir) -> None:
    service, url = served
    with EZTinkerClient(base_url=url) as client:
        run_id = client.create_run(base_model=str(tiny_model_dir), lora_config={"r": 2})
        old = Path(client.save_checkpoint(run_id, "old")["adapter_path"])
        new = Path(client.save_checkpoint(run_id, "new")["adapter_path"])
        kept = Path(client.save_checkpoint(run_id, "kept")["adapter_path"])
        # Set over Tinker REST (the SDK's set_checkpoint_ttl): reported, not yet due.
        ttl = httpx.put(
            f"{url}/api/v1/training_runs/{run_id}/checkpoints/weights/new/ttl", json={"ttl_seconds": 7200}
        )
        assert ttl.status_code == 200, ttl.text
        service.checkpoints.set_expiry(run_id, "old", time.time() - 1, None)  # already past
        listed = _rest_checkpoints(url, run_id)
        assert listed["weights/new"]["expires_at"] is not None and listed["weights/old"]["expires_at"]
        assert listed["weights/kept"]["expires_at"] is None

        assert service.checkpoints.sweep_expired() == [(run_id, "old")]
        assert {c.name for c in client.get_checkpoints(run_id)} == {"new", "kept"}
        assert set(_rest_checkpoints(url, run_id)) == {"weights/new", "weights/kept"}
        assert not old.exists() and new.exists() and kept.exists()
        assert (run_id, "old") not in service.checkpoints.expiries(run_id)

        # Later, `new`'s TTL runs out too; nothing else is touched, and a second sweep finds nothing.
        assert service.checkpoints.sweep_expired(now=time.time() + 7201) == [(run_id, "new")]
        assert not new.exists() and kept.exists()
        assert {c.name for c in client.get_checkpoints(run_id)} == {"kept"}
        assert service.checkpoints.sweep_expired(now=time.time() + 10**9) == []


def test_a_cleared_ttl_is_never_swept(served, tiny_model_dir) -> None:
    service, url = served
    with EZTinkerClient(base_url=url) as client:
        run_id = client.create_run(base_model=str(tiny_model_dir), lora_config={"r": 2})
        client.save_checkpoint(run_id, "c")
        path = f"{url}/api/v1/training_runs/{run_id}/checkpoints/weights/c/ttl"
        httpx.put(path, json={"ttl_seconds": 3600}).raise_for_status()
        httpx.put(path, json={"ttl_seconds": None}).raise_for_status()
        assert service.checkpoints.sweep_expired(now=time.time() + 10**9) == []
        assert [c.name for c in client.get_checkpoints(run_id)] == ["c"]


def test_the_sweeper_thread_runs_with_the_service(tmp_path) -> None:
    service = Service(Settings(data_dir=tmp_path, checkpoint_sweep_seconds=0.01))
    swept = threading.Event()
    sweep = service.checkpoints.sweep_expired

    def noted(now: float | None = None) -> list[tuple[str, str]]:
        swept.set()
        return sweep(now)

    service.checkpoints.sweep_expired = noted  # type: ignore[method-assign]
    service.start()
    try:
        assert swept.wait(timeout=10)
    finally:
        service.stop()
    assert service._sweeper is None
