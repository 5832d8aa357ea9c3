"""After `kill -9` and a restart, nothing is lost: runs, checkpoints, metrics and job history remain."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from eztinker import EZTinkerClient
from eztinker.exceptions import ConflictError

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, port: int, model: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "eztinker.cli", "server", "--data-dir", str(data_dir), "--port", str(port),
         "--model", str(model)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read().decode() if process.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise TimeoutError("server did not start")


def test_kill_9_mid_job_then_restart_loses_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port, tiny_model_dir)
    try:
        with EZTinkerClient(base_url=url) as client:
            trained = client.create_run(str(tiny_model_dir), lora_config={"r": 4}, run_id="trained")
            tokens = [(7 + 13 * i) % 900 + 3 for i in range(24)]
            for _ in range(3):
                client.forward_backward(trained, input_ids=tokens)
                client.optim_step(trained, learning_rate=2e-2)
            client.save_checkpoint(trained, "step-3")
            loss_at_3 = client.forward(trained, input_ids=tokens).result()["loss"]
            done = client.forward(trained, input_ids=tokens)
            done.result()
            # A queue of heavy jobs: some are running or queued when the process dies.
            big = [[(s + 5 * i) % 900 + 3 for i in range(256)] for s in range(16)]
            in_flight = [client.forward_backward(trained, input_ids=big) for _ in range(6)]
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(10)

    server = start_server(tmp_path, port, tiny_model_dir)
    try:
        with EZTinkerClient(base_url=url) as client:
            run = client.get_run("trained")
            assert run.status == "lost" and run.step == 3
            assert [c.name for c in client.get_checkpoints("trained")] == ["step-3"]
            assert [m.step for m in client.get_metrics("trained").history] == [1, 2, 3]
            assert client.get_job(done.job_id).status == "completed"
            states = [client.get_job(f.job_id) for f in in_flight]
            assert all(j.status in ("completed", "failed") for j in states)  # never stuck
            failed = [j for j in states if j.status == "failed"]
            assert failed, "the kill came after every job had finished; make the jobs heavier"
            assert all("server stopped" in (j.error or "") for j in failed)
            # A lost run says how to resume, then resumes exactly where its checkpoint was.
            with pytest.raises(ConflictError, match=r"its latest is 'step-3' \(step 3\).*load_checkpoint"):
                client.forward_backward("trained", input_ids=tokens)
            assert client.load_checkpoint("trained", "step-3").status == "active"
            assert client.forward("trained", input_ids=tokens).result()["loss"] == loss_at_3
            client.forward_backward("trained", input_ids=tokens)
            assert client.optim_step("trained", learning_rate=2e-2).result()["step"] == 4
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


SLOW_SAVE_PLUGIN = '''
"""Test plugin: a save of a checkpoint named "slow" stalls after writing its files, before the rename."""
import time
from eztinker.engine.checkpoint import disk as checkpoint  # where the durable writes are

_fsync = checkpoint._fsync


def _stalling_fsync(path):
    _fsync(path)
    if path.name.startswith(".slow"):
        open(path.parent / "STALLED", "w").close()  # tells the test the files are written
        time.sleep(120)


checkpoint._fsync = _stalling_fsync
'''


def test_kill_9_during_a_checkpoint_save_leaves_no_half_written_checkpoint(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "slow_save.py").write_text(SLOW_SAVE_PLUGIN)
    monkeypatch.setenv("PYTHONPATH", str(plugins))
    monkeypatch.setenv("EZTINKER_PLUGINS", "slow_save")
    data_dir, port = tmp_path / "data", free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(data_dir, port, tiny_model_dir)
    try:
        with EZTinkerClient(base_url=url) as client:
            run_id = client.create_run(str(tiny_model_dir), lora_config={"r": 4}, run_id="saving")
            client.forward_backward(run_id, input_ids=[5, 6, 7, 8])
            client.optim_step(run_id, learning_rate=1e-2)
            client.save_checkpoint(run_id, "good")
            response = httpx.post(f"{url}/v1/runs/{run_id}/save", json={"name": "slow"})
            job_id = response.json()["job_id"]
            stalled = data_dir / "checkpoints" / run_id / "STALLED"
            deadline = time.monotonic() + 60
            while not stalled.exists():  # the save's files are on disk, its rename not done
                assert time.monotonic() < deadline, "the save never reached its rename"
                time.sleep(0.05)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(10)
    leftovers = [
        p.name for p in (data_dir / "checkpoints" / "saving").iterdir() if p.name.startswith(".slow")
    ]
    assert leftovers, "the kill should have left the save's temporary directory behind"

    monkeypatch.delenv("EZTINKER_PLUGINS")
    server = start_server(data_dir, port, tiny_model_dir)
    try:
        with EZTinkerClient(base_url=url) as client:
            assert [c.name for c in client.get_checkpoints("saving")] == ["good"]  # no half-written "slow"
            job = client.get_job(job_id)
            assert job.status == "failed" and "server stopped" in (job.error or "")
            remaining = {p.name for p in (data_dir / "checkpoints" / "saving").iterdir()}
            assert not any(name.startswith(".slow") for name in remaining)  # the restart cleaned it up
            assert client.load_checkpoint("saving", "good").status == "active"  # the good one still loads
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
