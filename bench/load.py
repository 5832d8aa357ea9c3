"""Load: N concurrent clients × M mixed ops against one server — throughput and latency per op.

Each client (a thread with its own `EZTinkerClient`, over loopback HTTP to an in-process server) creates a
run and does M ops in a loop: `forward_backward` and `optim_step` alternately, a `sample` every 10th op and
a checkpoint `save` every 25th, each waited for (so latency = submit → result, queueing included).
Reported: ops/s over the whole load, p50 / p99 latency per op kind, and that every op completed exactly
once (checked against the server's job records).

Reproduce:

    uv run python bench/load.py                      # 32 clients x 50 ops, tiny qwen2 (H=256, L=4)
    uv run python bench/load.py --workers ray        # the same against 2 Ray model workers
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eztinker
from common import machine_info, resolve_model, write_results
from eztinker import EZTinkerClient
from eztinker.service import Service
from eztinker.settings import Settings

console = Console()


def client_loop(url: str, model: str, index: int, ops: int, latencies: dict, errors: list) -> None:
    try:
        with EZTinkerClient(base_url=url) as client:
            run_id = client.create_run(base_model=model, lora_config={"r": 4, "seed": index})
            tokens = [(index * 31 + 7 * j) % 900 + 3 for j in range(32)]
            for op in range(ops):
                start = time.perf_counter()
                if op % 25 == 24:
                    kind = "save"
                    client.save_checkpoint(run_id, name=f"c{op}")
                elif op % 10 == 9:
                    kind = "sample"
                    client.generate(tokens[:8], run_id=run_id, max_new_tokens=8)
                elif op % 2 == 0:
                    kind = "forward_backward"
                    client.forward_backward(run_id, input_ids=tokens).result()
                else:
                    kind = "optim_step"
                    client.optim_step(run_id, learning_rate=1e-4).result()
                latencies[kind].append(time.perf_counter() - start)
    except BaseException as exc:
        errors.append(exc)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--ops", type=int, default=50)
    parser.add_argument(
        "--workers", choices=["local", "ray"], default="local", help="ray: 2 Ray model workers"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, tag = resolve_model(args.model, Path(tmp))
        pool = {"worker_pool": "ray", "ray_workers": 2} if args.workers == "ray" else {}
        service = Service(
            Settings(data_dir=Path(tmp) / "data", models=[str(model_dir)], device="cpu", **pool)
        )
        latencies: dict[str, list[float]] = collections.defaultdict(list)
        errors: list[BaseException] = []
        with eztinker.serve(service=service) as url:
            threads = [
                threading.Thread(
                    target=client_loop, args=(url, str(model_dir), i, args.ops, latencies, errors)
                )
                for i in range(args.clients)
            ]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.perf_counter() - start
            jobs = collections.Counter((j.op, j.status) for j in service.store.list_jobs(limit=10**7))
    if errors:
        raise errors[0]
    total = sum(len(v) for v in latencies.values())
    assert total == args.clients * args.ops
    lost = {k: v for k, v in jobs.items() if k[1] != "completed"}
    rows = {}
    for kind, values in sorted(latencies.items()):
        values.sort()
        rows[kind] = {
            "count": len(values),
            "p50_ms": 1000 * statistics.median(values),
            "p99_ms": 1000 * values[min(len(values) - 1, int(0.99 * len(values)))],
            "recorded_completed": jobs[(kind, "completed")],
        }
    table = Table(
        "op",
        "count",
        "p50 ms",
        "p99 ms",
        "completed in the job log",
        title=f"{args.clients} clients x {args.ops} ops on {tag} ({args.workers} workers)",
    )
    for kind, row in rows.items():
        table.add_row(
            kind,
            str(row["count"]),
            f"{row['p50_ms']:.0f}",
            f"{row['p99_ms']:.0f}",
            str(row["recorded_completed"]),
        )
    console.print(table)
    console.print(
        f"{total} ops in {seconds:.1f} s: {total / seconds:.1f} ops/s; jobs not completed: {lost or 'none'}"
    )
    path = write_results(
        f"load-{tag}" + ("-ray" if args.workers == "ray" else ""),
        {
            "benchmark": "load",
            "model": tag,
            "machine": machine_info(torch.device("cpu")),
            "workers": args.workers,
            "clients": args.clients,
            "ops_per_client": args.ops,
            "seconds": seconds,
            "ops_per_second": total / seconds,
            "per_op": rows,
            "not_completed": {f"{k[0]}:{k[1]}": v for k, v in lost.items()},
            "command": " ".join(["uv run python bench/load.py", *sys.argv[1:]]),
        },
    )
    console.print(f"results: {path}")


if __name__ == "__main__":
    main()
