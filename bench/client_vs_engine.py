"""What HTTP costs: per-op overhead over loopback, and an SFT loop through the client vs in-process.

Two measurements, both against a real `eztinker server` subprocess on 127.0.0.1:

1. **Per-op overhead** — a tiny `forward_backward` (+ result) many times in a row; overhead = what the
   client observes minus what the job spent executing on the server (`started_at` → `finished_at`).
   Reported as p50 / p99.
2. **SFT throughput** — the same loop (`forward_backward` + `optim_step` per step, same model, batch and
   learning rate) through `EZTinkerClient` and on an in-process `Engine`, interleaved in rounds
   (A B A B …) so that machine noise hits both; ratio of tokens/s (target >= 0.9).

Reproduce:

    uv run python bench/client_vs_engine.py                  # tiny qwen2 (H=256, L=4), batch 4x64
    uv run python bench/client_vs_engine.py --model smollm2 --batch 2 --seq-len 128 --steps 40
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, resolve_model, summary, write_results
from eztinker import EZTinkerClient
from eztinker.engine import AdamParams, Datum, Engine, EngineConfig

console = Console()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, data_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "eztinker.cli", "server", "--port", str(port), "--data-dir", str(data_dir),
         "--model", str(model_dir), "--device", "cpu"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start")


def batch_ids(batch: int, seq_len: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (batch, seq_len), generator=g).tolist()


def per_op_overhead(client: EZTinkerClient, run_id: str, ops: int, progress: Progress) -> dict:
    """Client-observed latency minus server execution time, for a 1 x 16-token forward_backward."""
    ids = list(range(5, 21))
    task = progress.add_task("per-op overhead", total=ops)
    latencies, overheads = [], []
    for i in range(ops + 20):
        start = time.perf_counter()
        future = client.forward_backward(run_id, input_ids=ids)
        future.result()
        latency = time.perf_counter() - start
        job = future.job
        assert job is not None and job.started_at is not None and job.finished_at is not None
        if i >= 20:  # warm-up
            latencies.append(latency)
            overheads.append(latency - (job.finished_at - job.started_at))
            progress.advance(task)
    overheads.sort()
    return {
        "ops": ops,
        "latency_s": summary(latencies),
        "overhead_s": summary(overheads),
        "overhead_p50_ms": 1e3 * overheads[len(overheads) // 2],
        "overhead_p99_ms": 1e3 * overheads[min(len(overheads) - 1, int(0.99 * len(overheads)))],
    }


def client_steps(client: EZTinkerClient, run_id: str, ids: list[list[int]], steps: int, lr: float) -> float:
    """`steps` SFT steps through the client; seconds.

    The loop a Tinker-style client writes: submit step k's ops, then read step k-1's loss — one step in
    flight, so the worker always has the next op queued while the client waits.
    """
    start = time.perf_counter()
    previous = None
    for _ in range(steps):
        fb = client.forward_backward(run_id, input_ids=ids)
        optim = client.optim_step(run_id, learning_rate=lr)
        if previous is not None:
            previous.result()
        previous = fb
    optim.result()
    return time.perf_counter() - start


def engine_steps(engine: Engine, run_id: str, ids: list[list[int]], steps: int, lr: float) -> float:
    data = [Datum.from_labels(x) for x in ids]
    start = time.perf_counter()
    for _ in range(steps):
        engine.forward_backward(run_id, data)
        engine.optim_step(run_id, AdamParams(learning_rate=lr))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 | a model directory")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100, help="SFT steps per side")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds the steps are split into")
    parser.add_argument("--ops", type=int, default=300, help="ops for the per-op overhead")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="eztinker-bench-"))
    model_dir, tag = resolve_model(args.model, workdir)
    server, url = start_server(model_dir, workdir / "server")
    lora = {"r": args.rank, "lora_alpha": 2 * args.rank, "seed": 0}
    lr = 1e-4
    try:
        engine = Engine(EngineConfig(device="cpu"))
        engine_run = engine.create_run(str(model_dir), lora).run_id
        ids = batch_ids(args.batch, args.seq_len, engine.base_model(str(model_dir)).vocab_size)
        with EZTinkerClient(base_url=url) as client, Progress(console=console) as progress:
            client_run = client.create_run(str(model_dir), lora_config=lora)
            overhead = per_op_overhead(
                client, client.create_run(str(model_dir), lora_config=lora), args.ops, progress
            )
            client_steps(client, client_run, ids, 3, lr)  # warm-up both sides
            engine_steps(engine, engine_run, ids, 3, lr)
            per_round = args.steps // args.rounds
            task = progress.add_task("SFT rounds (client, engine)", total=args.rounds)
            client_times, engine_times = [], []
            for _ in range(args.rounds):
                client_times.append(client_steps(client, client_run, ids, per_round, lr))
                engine_times.append(engine_steps(engine, engine_run, ids, per_round, lr))
                progress.advance(task)
            client_loss = client.get_metrics(client_run).history[-1].loss
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)

    tokens = args.batch * args.seq_len * per_round
    client_tps = [tokens / t for t in client_times]
    engine_tps = [tokens / t for t in engine_times]
    ratios = [c / e for c, e in zip(client_tps, engine_tps, strict=True)]
    ratio = summary(client_tps)["median"] / summary(engine_tps)["median"]
    command = "uv run python bench/client_vs_engine.py " + " ".join(sys.argv[1:])
    payload = {
        "benchmark": "client_vs_engine",
        "command": command.strip(),
        "machine": machine_info(torch.device("cpu")),
        "config": {"model": tag, "batch": args.batch, "seq_len": args.seq_len, "steps": per_round * args.rounds,
                   "rounds": args.rounds, "rank": args.rank},
        "per_op_overhead": overhead,
        "sft": {"client_tokens_per_s": summary(client_tps), "engine_tokens_per_s": summary(engine_tps),
                "ratio_of_medians": ratio, "per_round_ratios": ratios, "client_last_loss": client_loss,
                "target_ratio": 0.9, "meets_target": ratio >= 0.9},
    }  # fmt: skip
    path = write_results(f"client_vs_engine-{tag}-cpu", payload)

    table = Table("measurement", "value")
    table.add_row("per-op overhead p50", f"{overhead['overhead_p50_ms']:.2f} ms")
    table.add_row("per-op overhead p99", f"{overhead['overhead_p99_ms']:.2f} ms")
    table.add_row("client tokens/s (median)", f"{summary(client_tps)['median']:.0f}")
    table.add_row("engine tokens/s (median)", f"{summary(engine_tps)['median']:.0f}")
    table.add_row("client / engine", f"{ratio:.3f}  (rounds: {', '.join(f'{r:.3f}' for r in ratios)})")
    console.print(table)
    console.print(f"results: {path}")


if __name__ == "__main__":
    main()
