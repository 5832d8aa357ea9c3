"""Ray worker pool: 8 runs over 2 CPU model workers vs the same runs on one embedded worker, side by side.

Two servers run at once, each an `eztinker server` process as in production — the embedded default (one
in-process worker, torch on all `--threads` cores) and `--workers ray` (a local Ray cluster of `--workers`
model workers, each an actor with `threads / workers` cores) — and the rounds alternate between them, so
both see the same machine. The clients run in this process.

- **Throughput**: `--runs` clients (threads, each with its own `EZTinkerClient` over loopback HTTP) each
  train their own run for `--steps` steps of `forward_backward` (`--seqs` × `--tokens` tokens) +
  `optim_step`; aggregate training tokens/s.
- **Ray hop**: one client's `forward` of 8 tokens, waited for, one at a time: the latency difference
  between the modes is what the hop (API server → actor → API server) adds per op.

Reproduce:

    uv run python bench/ray_pool.py --rounds 3          # tiny qwen2 (H=256, L=4), 8 runs x 20 steps x 1x64
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, resolve_model, write_results
from eztinker import EZTinkerClient

console = Console()


@contextlib.contextmanager
def server(data_dir: Path, threads: int, *flags: str) -> Iterator[str]:
    """An `eztinker server` subprocess with `flags`; yields its URL once /health answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-c", "from eztinker.cli import main; main()", "server"]
    command += ["--port", str(port), "--data-dir", str(data_dir), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server {' '.join(flags) or '(embedded)'} did not start")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(60)


def train(url: str, model: str, runs: int, steps: int, seqs: int, tokens: int) -> float:
    """Aggregate training tokens/s of `runs` concurrent clients (runs created before the clock starts)."""
    with EZTinkerClient(base_url=url) as setup:
        run_ids = [setup.create_run(model, {"r": 8, "seed": i}) for i in range(runs)]
    barrier = threading.Barrier(runs + 1)
    errors: list[BaseException] = []

    def loop(index: int) -> None:
        try:
            batch = [[(index * 31 + 7 * j + s) % 900 + 3 for j in range(tokens)] for s in range(seqs)]
            with EZTinkerClient(base_url=url) as client:
                barrier.wait()
                for _ in range(steps):
                    client.forward_backward(run_ids[index], input_ids=batch)
                    client.optim_step(run_ids[index], learning_rate=1e-4).result()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(runs)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    with EZTinkerClient(base_url=url) as cleanup:
        for run_id in run_ids:
            cleanup.delete_run(run_id)
    return runs * steps * seqs * tokens / seconds


def hop(url: str, model: str, ops: int) -> list[float]:
    """Latencies (s) of `ops` lone 8-token `forward`s, each waited for."""
    with EZTinkerClient(base_url=url) as client:
        run_id = client.create_run(model, {"r": 8})
        tokens = list(range(3, 11))
        latencies = []
        for _ in range(ops):
            start = time.perf_counter()
            client.forward(run_id, input_ids=tokens).result()
            latencies.append(time.perf_counter() - start)
        client.delete_run(run_id)
    return latencies[ops // 10 :]  # the first ops warm caches up


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seqs", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="Ray model workers")
    parser.add_argument("--threads", type=int, default=2, help="cores in all (split among Ray workers)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hop-ops", type=int, default=200)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="eztinker-bench-ray-"))
    model_dir, tag = resolve_model(args.model, workdir)
    model = str(model_dir)
    ray_flags = ["--workers", "ray", "--ray-workers", str(args.workers)]
    ray_flags += ["--ray-cpus-per-worker", str(args.threads / args.workers)]
    results: dict[str, list] = {"embedded": [], "ray": [], "hop_embedded": [], "hop_ray": []}
    with (
        server(workdir / "embedded", args.threads) as url_embedded,
        server(workdir / "ray", args.threads, *ray_flags) as url_ray,
    ):
        urls = {"embedded": url_embedded, "ray": url_ray}
        for url in urls.values():  # load the model everywhere and warm up
            train(url, model, args.workers, 2, args.seqs, args.tokens)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("rounds", total=args.rounds * 2)
            for _ in range(args.rounds):
                for mode, url in urls.items():
                    results[mode].append(train(url, model, args.runs, args.steps, args.seqs, args.tokens))
                    results[f"hop_{mode}"].extend(hop(url, model, args.hop_ops // args.rounds))
                    progress.advance(task)

    ratios = [r / e for r, e in zip(results["ray"], results["embedded"], strict=True)]
    p50 = {mode: statistics.median(results[f"hop_{mode}"]) for mode in urls}
    p99 = {mode: sorted(results[f"hop_{mode}"])[int(0.99 * len(results[f"hop_{mode}"]))] for mode in urls}
    table = Table(title=f"{args.runs} runs x {args.steps} steps x {args.seqs}x{args.tokens} tokens, {tag}")
    for column in ("mode", "tokens/s (median)", "rounds", "forward p50 ms", "forward p99 ms"):
        table.add_column(column)
    for mode in urls:
        table.add_row(
            mode,
            f"{statistics.median(results[mode]):.0f}",
            ", ".join(f"{x:.0f}" for x in results[mode]),
            f"{1000 * p50[mode]:.1f}",
            f"{1000 * p99[mode]:.1f}",
        )
    console.print(table)
    console.print(
        f"ray / embedded: median of rounds {statistics.median(ratios):.2f}x (rounds: "
        f"{', '.join(f'{r:.2f}' for r in ratios)}); Ray hop adds {1000 * (p50['ray'] - p50['embedded']):.1f} ms "
        f"per op at p50"
    )
    path = write_results(
        f"ray_pool-{tag}-{args.seqs}x{args.tokens}",
        {
            "args": vars(args),
            "machine": machine_info(torch.device("cpu")),
            "tokens_per_second": {mode: results[mode] for mode in urls},
            "ratio_rounds": ratios,
            "hop_seconds": {mode: {"p50": p50[mode], "p99": p99[mode]} for mode in urls},
        },
    )
    console.print(f"results: {path}")


if __name__ == "__main__":
    main()
