"""Adapter paging: many runs over a budget that holds a few, against no budget, side by side.

Two measurements on the tiny model (`eztinker.testing.make_tiny_model`, qwen2, H=64, L=2):

* **throughput** — `--runs` runs (default 200) through one in-process `Service` (scheduler, prefetch,
  engine), `--clients` client threads each cycling over its share of the runs (`forward_backward` on one
  64-token sequence, then `optim_step`, waiting for each), with `--adapter-memory` sized for `--fit` runs
  (default 20), vs the same service without a budget. Rounds interleave the two (A B, B A, ...); the best
  round of each is compared. Reported: aggregate training tokens/s, the page-in latency an op waited for
  (p50/p99) and that of prefetches, and how many page-ins were prefetched.
* **the issue's target** — 120 rank-64 runs under `adapter_memory=24MB`, each in a fresh process (round
  robin, `--rss-steps` steps of forward_backward + optim_step per run): the process's peak RSS growth over
  its size once the model is loaded must be at most 1.5 × budget + 64 MiB, and every loss must equal, bit
  for bit, those of an unbudgeted engine doing the same.

Reproduce (a few minutes on 2 CPU cores):

    uv run python bench/paging.py
    uv run python bench/paging.py --runs 60 --fit 6 --steps 2 --rounds 1     # quicker
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_results
from eztinker.engine import AdamParams, Datum
from eztinker.models import api
from eztinker.service import Service
from eztinker.settings import Settings, parse_size

console = Console()
SEQ_LEN = 64
RSS_RUNS, RSS_RANK, RSS_BUDGET = 120, 64, "24MB"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def data_for(i: int, step: int, vocab: int) -> list[Datum]:
    g = torch.Generator().manual_seed(1000 * i + step)
    return [Datum.from_labels(torch.randint(3, vocab, (SEQ_LEN,), generator=g).tolist())]


# --- throughput ------------------------------------------------------------------------------------------


def one_run_bytes(model_dir: Path, rank: int) -> int:
    """Bytes of one run's whole state (weights, gradients, AdamW's two moments) on the tiny model."""
    from eztinker.engine import Engine, EngineConfig
    from eztinker.engine.run_state import state_bytes

    engine = Engine(EngineConfig(device="cpu"))
    engine.create_run(str(model_dir), {"r": rank, "seed": 0}, run_id="probe")
    data = data_for(0, 0, engine.base_model(str(model_dir)).vocab_size)
    engine.forward_backward("probe", data)
    engine.optim_step("probe")
    engine.forward_backward("probe", data)
    return state_bytes(engine._runs["probe"])


def train(service: Service, run_ids: list[str], clients: int, steps: int, vocab: int) -> float:
    """Wall seconds for `clients` threads, each cycling over its share of the runs, to do `steps` each."""
    shares = [run_ids[c::clients] for c in range(clients)]
    start_line = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def loop(share: list[str]) -> None:
        start_line.wait()
        try:
            for step in range(steps):
                for run_id in share:
                    fb = service.forward_backward(
                        run_id, data_for(run_ids.index(run_id), step, vocab), None, None
                    )
                    fb.wait_sync(300)
                    opt = service.optim_step(run_id, AdamParams(learning_rate=1e-4), None)
                    opt.wait_sync(300)
                    for job in (fb, opt):
                        if job.status != "completed":
                            raise RuntimeError(f"{job.op} failed: {job.error}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    start_line.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def throughput(args: argparse.Namespace, model_dir: Path, tmp: Path, progress: Progress, task) -> dict:
    size = one_run_bytes(model_dir, args.rank)
    budget = args.fit * size
    services = {}
    for mode, memory in (("paged", str(budget)), ("unbudgeted", None)):
        settings = Settings(
            data_dir=tmp / mode, models=[str(model_dir)], device="cpu", adapter_memory=memory, workers=1
        )
        service = Service(settings)
        service.start()
        run_ids = [
            service.create_run(
                api.CreateRunRequest(base_model=str(model_dir), lora_config={"r": args.rank, "seed": i}), None
            ).run_id
            for i in range(args.runs)
        ]
        services[mode] = (service, run_ids)
    vocab = services["paged"][0].backend.engine.base_model(str(model_dir)).vocab_size
    tokens = args.runs * args.steps * SEQ_LEN
    rates: dict[str, list[float]] = {mode: [] for mode in services}
    pager = services["paged"][0].backend.engine.paging
    for service, run_ids in services.values():  # warm-up: every run's state exists, pages written
        train(service, run_ids, args.clients, 1, vocab)
    pager.recent.clear()
    before = pager.stats()
    for r in range(args.rounds):
        order = list(services) if r % 2 == 0 else list(reversed(services))
        for mode in order:
            service, run_ids = services[mode]
            rates[mode].append(tokens / train(service, run_ids, args.clients, args.steps, vocab))
            progress.advance(task)
    after = pager.stats()
    waited = [s for prefetched, s in pager.recent if not prefetched]
    prefetched = [s for prefetched, s in pager.recent if prefetched]
    ops = args.rounds * args.runs * args.steps * 2
    for service, _ in services.values():
        service.stop()
    best = {mode: max(v) for mode, v in rates.items()}
    return {
        "runs": args.runs,
        "rank": args.rank,
        "clients": args.clients,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "run_state_bytes": size,
        "adapter_memory_bytes": budget,
        "runs_that_fit": args.fit,
        "tokens_per_s": {mode: {"best": best[mode], "rounds": v} for mode, v in rates.items()},
        "paged_over_unbudgeted": best["paged"] / best["unbudgeted"],
        "median_round_ratio": statistics.median(
            p / u for p, u in zip(rates["paged"], rates["unbudgeted"], strict=True)
        ),
        "ops": ops,
        "page_ins_waited": after.page_ins - before.page_ins,
        "prefetches": after.prefetches - before.prefetches,
        "page_outs": after.page_outs - before.page_outs,
        "page_in_waited_s": {
            "p50": percentile(waited, 0.5),
            "p99": percentile(waited, 0.99),
            "n": len(waited),
        },
        "prefetch_s": {
            "p50": percentile(prefetched, 0.5),
            "p99": percentile(prefetched, 0.99),
            "n": len(prefetched),
        },
        "final_tiers": {"device": after.resident_runs, "host": after.host_runs, "disk": after.disk_runs},
    }


# --- the target: RSS and identical losses, each in a fresh process --------------------------------

_CHILD = r"""
import json, resource, sys, torch
from eztinker.engine import AdamParams, Datum, Engine, EngineConfig
from eztinker.settings import parse_size

model, budget, runs, rank, steps, page_dir = sys.argv[1:7]
budget = None if budget == "none" else parse_size(budget)

def rss():
    with open("/proc/self/status") as f:
        return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f if l.startswith(("VmRSS", "VmHWM"))}

engine = Engine(EngineConfig(device="cpu", adapter_memory=budget, page_dir=page_dir))
vocab = engine.base_model(model).vocab_size
def data(i, step):
    g = torch.Generator().manual_seed(1000 * i + step)
    return [Datum.from_labels(torch.randint(3, vocab, (64,), generator=g).tolist())]
engine.create_run(model, {"r": 8, "seed": 0}, run_id="warm")  # warm every code path once
engine.forward_backward("warm", data(0, 0)); engine.optim_step("warm"); engine.delete_run("warm")
base = rss()["VmRSS"]
peak, losses = base, []
for i in range(int(runs)):
    engine.create_run(model, {"r": int(rank), "seed": i}, run_id=f"run{i}")
    peak = max(peak, rss()["VmRSS"])
for step in range(int(steps)):
    for i in range(int(runs)):
        losses.append(engine.forward_backward(f"run{i}", data(i, step)).loss)
        engine.optim_step(f"run{i}", AdamParams(learning_rate=1e-3))
        peak = max(peak, rss()["VmRSS"])
engine.paging.settle()
stats = engine.paging.stats()
print(json.dumps({"base_rss": base, "peak_rss": peak, "growth": peak - base, "losses": [repr(x) for x in losses],
                  "tiers": [stats.resident_runs, stats.host_runs, stats.disk_runs],
                  "page_ins": stats.page_ins, "page_in_seconds": stats.page_in_seconds}))
"""


def rss_target(args: argparse.Namespace, model_dir: Path, tmp: Path, progress: Progress, task) -> dict:
    out = {}
    for mode, budget in (("paged", RSS_BUDGET), ("unbudgeted", "none")):
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _CHILD,
                str(model_dir),
                budget,
                str(RSS_RUNS),
                str(RSS_RANK),
                str(args.rss_steps),
                str(tmp / f"pages-{mode}"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        progress.advance(task)
    budget = parse_size(RSS_BUDGET)
    limit = 1.5 * budget + 64 * 2**20
    identical = out["paged"]["losses"] == out["unbudgeted"]["losses"]
    return {
        "runs": RSS_RUNS,
        "rank": RSS_RANK,
        "steps_per_run": args.rss_steps,
        "adapter_memory": RSS_BUDGET,
        "limit_bytes": limit,
        "growth_bytes": {mode: r["growth"] for mode, r in out.items()},
        "within_limit": out["paged"]["growth"] <= limit,
        "losses_identical": identical,
        "losses": len(out["paged"]["losses"]),
        "final_tiers_paged": out["paged"]["tiers"],
        "page_ins": out["paged"]["page_ins"],
        "page_in_mean_s": out["paged"]["page_in_seconds"] / max(1, out["paged"]["page_ins"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--fit", type=int, default=20, help="runs the budget holds")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="steps per run per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rss-steps", type=int, default=3)
    parser.add_argument("--no-rss", action="store_true")
    args = parser.parse_args()
    from eztinker.testing import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = make_tiny_model(tmp / "tiny-qwen2", "qwen2")
        with Progress(console=console) as progress:
            task = progress.add_task("benchmarking", total=2 * args.rounds + (0 if args.no_rss else 2))
            results = {"throughput": throughput(args, model_dir, tmp, progress, task)}
            if not args.no_rss:
                results["rss_target"] = rss_target(args, model_dir, tmp, progress, task)
    t = results["throughput"]
    table = Table(
        title=f"adapter paging: {t['runs']} runs, budget for {t['runs_that_fit']} (tiny qwen2, CPU)"
    )
    for column in ("", "paged", "unbudgeted"):
        table.add_column(column, justify="right")
    rates = t["tokens_per_s"]
    table.add_row(
        "tokens/s (best round)", f"{rates['paged']['best']:.0f}", f"{rates['unbudgeted']['best']:.0f}"
    )
    table.add_row(
        "ratio (best / median round)",
        f"{t['paged_over_unbudgeted']:.2f} / {t['median_round_ratio']:.2f}",
        "1",
    )
    ms = lambda v: "-" if v is None else f"{1000 * v:.2f} ms"  # noqa: E731
    table.add_row(
        "page-in waited p50 / p99",
        f"{ms(t['page_in_waited_s']['p50'])} / {ms(t['page_in_waited_s']['p99'])}",
        "-",
    )
    table.add_row("prefetch p50 / p99", f"{ms(t['prefetch_s']['p50'])} / {ms(t['prefetch_s']['p99'])}", "-")
    table.add_row(
        "page-ins waited / prefetched / ops", f"{t['page_ins_waited']} / {t['prefetches']} / {t['ops']}", "-"
    )
    console.print(table)
    if "rss_target" in results:
        r = results["rss_target"]
        console.print(
            f"{r['runs']} rank-{r['rank']} runs under {r['adapter_memory']}: RSS grew "
            f"{r['growth_bytes']['paged'] / 2**20:.1f} MiB (limit {r['limit_bytes'] / 2**20:.1f} MiB; unbudgeted "
            f"{r['growth_bytes']['unbudgeted'] / 2**20:.1f} MiB); within: {r['within_limit']}; "
            f"{r['losses']} losses identical: {r['losses_identical']}"
        )
    results["machine"] = machine_info(torch.device("cpu"))
    results["command"] = "uv run python bench/paging.py " + " ".join(sys.argv[1:])
    console.print(f"written to {write_results('paging-cpu', results)}")


if __name__ == "__main__":
    main()
