"""Load: 32 clients × 50 mixed ops against one server — every future resolves, none lost or duplicated."""

from __future__ import annotations

import collections
import threading
from pathlib import Path

import pytest

import eztinker
from eztinker import EZTinkerClient
from eztinker.service import Service
from eztinker.settings import Settings

CLIENTS, OPS = 32, 50


def rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


def client_loop(url: str, model: str, index: int, out: dict, errors: list) -> None:
    """One user's mixed loop: forward_backward + optim_step, with a sample every 10 ops and a save every 25."""
    try:
        with EZTinkerClient(base_url=url) as client:
            run_id = client.create_run(base_model=model, lora_config={"r": 2, "seed": index})
            tokens = [(index * 31 + 7 * j) % 900 + 3 for j in range(16)]
            futures, ops = [], collections.Counter()
            for op in range(OPS):
                if op % 25 == 24:  # these two wait for their answer (and so for the run's earlier ops)
                    assert client.save_checkpoint(run_id, name=f"c{op}")["status"] == "completed"
                    ops["save"] += 1
                elif op % 10 == 9:
                    assert len(client.generate(tokens[:4], run_id=run_id, max_new_tokens=4).samples) == 1
                    ops["sample"] += 1
                elif op % 2 == 0:
                    futures.append(client.forward_backward(run_id, input_ids=tokens))
                    ops["forward_backward"] += 1
                else:
                    futures.append(client.optim_step(run_id, learning_rate=1e-3))
                    ops["optim_step"] += 1
            for future in futures:
                future.result(timeout=600)
            out[run_id] = (ops, client.get_run(run_id).step, [c.name for c in client.get_checkpoints(run_id)])
    except BaseException as exc:  # reported by the test
        errors.append(exc)


@pytest.mark.slow
def test_32_clients_of_mixed_ops_lose_nothing_and_memory_stays_bounded(tmp_path, tiny_model_dir) -> None:
    service = Service(Settings(data_dir=tmp_path, models=[str(tiny_model_dir)]))
    with eztinker.serve(service=service) as url:
        memory = []
        for wave in range(2):
            out: dict = {}
            errors: list = []
            threads = [
                threading.Thread(
                    target=client_loop, args=(url, str(tiny_model_dir), wave * CLIENTS + i, out, errors)
                )
                for i in range(CLIENTS)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(900)
            assert not errors, errors[:3]
            assert len(out) == CLIENTS
            jobs = collections.Counter(
                (job.run_id, job.op, job.status) for job in service.store.list_jobs(limit=10**6)
            )
            for run_id, (ops, step, checkpoints) in out.items():
                assert sum(ops.values()) == OPS
                for op, count in ops.items():  # every op recorded once, and completed
                    assert jobs[(run_id, op, "completed")] == count, (run_id, op)
                assert step == ops["optim_step"]  # every step applied exactly once
                assert checkpoints == ["c24", "c49"]
            assert not any(status != "completed" for _, _, status in jobs)
            memory.append(rss_mib())
    # The second wave (as many new runs and ops again) adds no more than a modest, bounded amount.
    assert memory[1] - memory[0] < 400, memory
