"""Sampling on vLLM vs the engine's sampler: 32 concurrent requests x 64 new tokens, side by side.

Three sides, each on the same prompts, interleaved in rounds (medians reported):

* **engine** — the engine's continuous batcher in this process (`sampler.sample_batch` with all 32
  requests at once, as the server's batcher gets them when they arrive together).
* **vLLM backend** — the same engine `SampleRequest`s through `eztinker.backend.vllm.VllmSampler` (our hop:
  request mapping, one asyncio loop, httpx, answer parsing) to a vLLM server that `VllmServer` started.
* **vLLM direct** — the same completions sent straight to that vLLM server with httpx (32 concurrent
  POSTs, token-id prompts): what vLLM serves without us, so `direct / backend` is the cost of our hop.

Three workloads: the bare base model, one adapter (all 32 on one snapshot), and 8 adapters (4 requests
each; vLLM started with --max-loras 8). Every request samples exactly 64 tokens at temperature 1 (no stop),
so every side does the same work. vLLM's CPU build binds its model thread to one core; the engine side runs
with one thread (OMP_NUM_THREADS=1) for the same footing.

Reproduce (needs the vLLM environment: `bash scripts/vllm_env.sh`):

    OMP_NUM_THREADS=1 uv run python bench/vllm_sampling.py                  # tiny qwen2 (H 256, L 4)
    OMP_NUM_THREADS=1 uv run python bench/vllm_sampling.py --model smollm2 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, resolve_model, summary, write_results
from eztinker.backend.vllm import (
    VllmOptions,
    VllmSampler,
    VllmServer,
    completion_body,
    find_vllm_python,
    write_snapshot,
)
from eztinker.engine import AdamParams, Datum, Engine, SamplingParams
from eztinker.engine.sampler import SampleRequest, sample_batch

console = Console()
SIDES = ("engine", "vllm_backend", "vllm_direct")
WORKLOADS = ("base", "1_adapter", "8_adapters")


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, vocab, (int(torch.randint(8, 33, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def requests_for(
    prompts: list[list[int]], adapters: list[str | None], new_tokens: int, seed: int
) -> list[SampleRequest]:
    return [
        SampleRequest(
            prompt,
            SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=seed + i, stop=[]),
            adapter=adapters[i % len(adapters)],
        )
        for i, prompt in enumerate(prompts)
    ]


async def direct(url: str, bodies: list[dict]) -> int:
    """All bodies POSTed at once to vLLM; the tokens it returned."""
    async with httpx.AsyncClient(timeout=600.0, limits=httpx.Limits(max_connections=None)) as client:
        responses = await asyncio.gather(*(client.post(f"{url}/v1/completions", json=b) for b in bodies))
    total = 0
    for response in responses:
        response.raise_for_status()
        total += sum(len(c["token_ids"]) for c in response.json()["choices"])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vllm-python", default=find_vllm_python())
    args = parser.parse_args()
    if not args.vllm_python:
        raise SystemExit("no vLLM environment: run `bash scripts/vllm_env.sh` or pass --vllm-python")

    workdir = Path(tempfile.mkdtemp(prefix="eztinker-bench-vllm-"))
    model_dir, tag = resolve_model(args.model, workdir)
    name = str(model_dir)
    engine = Engine()
    base = engine.base_model(name)
    snapshots: list[str] = []
    for i in range(args.adapters):  # one training step each: distinct, non-zero adapters
        run = engine.create_run(name, {"r": 8, "seed": i}).run_id
        engine.forward_backward(run, [Datum.from_labels(list(range(5, 40)))])
        engine.optim_step(run, AdamParams(learning_rate=1e-3))
        sampler_id = f"bench-snap-{i}"
        engine.save_sampler(run, sampler_id)
        write_snapshot(engine, run, workdir / "snapshots", sampler_id)
        snapshots.append(sampler_id)

    options = VllmOptions(
        python=args.vllm_python,
        dtype="float32",
        max_loras=args.adapters,
        max_lora_rank=8,
        log_path=str(workdir / "vllm.log"),
    )
    console.print(f"starting vLLM on {tag} (log: {workdir / 'vllm.log'})...")
    t0 = time.perf_counter()
    server = VllmServer(name, options)
    server.start()
    startup = time.perf_counter() - t0
    console.print(f"vLLM ready in {startup:.0f} s")
    client = VllmSampler.for_options(server, options, base.eos_token_ids)
    for sampler_id in snapshots:
        problem = client.add_adapter(sampler_id, workdir / "snapshots" / sampler_id)
        assert problem is None, problem

    prompts = make_prompts(args.requests, base.vocab_size)
    tokens = args.requests * args.new_tokens
    adapters = {"base": [None], "1_adapter": snapshots[:1], "8_adapters": list(snapshots)}

    def run_side(side: str, workload: str, seed: int) -> float:
        requests = requests_for(prompts, adapters[workload], args.new_tokens, seed)
        t = time.perf_counter()
        if side == "engine":
            results = sample_batch(base, requests)
            got = sum(len(s.tokens) for r in results for s in r.sequences)
        elif side == "vllm_backend":
            results = client.sample_sync(requests)
            got = sum(len(s.tokens) for r in results for s in r.sequences)
        else:
            bodies = [
                completion_body(r, model=r.adapter or server.served_name, eos_token_ids=base.eos_token_ids)
                for r in requests
            ]
            got = asyncio.run(direct(server.url, bodies))
        seconds = time.perf_counter() - t
        assert got == tokens, (side, workload, got)
        return seconds

    console.print(f"warm-up ({args.requests} requests x {args.new_tokens} tokens)...")
    for workload in WORKLOADS:
        for side in SIDES:
            run_side(side, workload, 0)

    rates: dict[str, dict[str, list[float]]] = {w: {s: [] for s in SIDES} for w in WORKLOADS}
    for r in range(args.rounds):
        for workload in WORKLOADS:
            order = list(SIDES) if r % 2 == 0 else list(reversed(SIDES))
            for side in order:
                seconds = run_side(side, workload, 1000 * (r + 1))
                rates[workload][side].append(tokens / seconds)
                console.print(f"round {r + 1}: {workload:10s} {side:12s} {tokens / seconds:8.1f} tokens/s")
    client.close()
    server.stop()

    def ratio(workload: str, a: str, b: str) -> dict[str, object]:
        per_round = [x / y for x, y in zip(rates[workload][a], rates[workload][b], strict=True)]
        return {"median": statistics.median(per_round), "per_round": per_round}

    result = {
        "model": tag,
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "adapters": args.adapters,
        "rounds": args.rounds,
        "vllm_startup_seconds": startup,
        "tokens_per_second": {w: {s: summary(v) for s, v in sides.items()} for w, sides in rates.items()},
        "vllm_backend_vs_engine": {w: ratio(w, "vllm_backend", "engine") for w in WORKLOADS},
        "vllm_direct_vs_engine": {w: ratio(w, "vllm_direct", "engine") for w in WORKLOADS},
        "hop_cost_direct_vs_backend": {w: ratio(w, "vllm_direct", "vllm_backend") for w in WORKLOADS},
        "raw": rates,
        "machine": machine_info(torch.device("cpu")),
        "vllm": {"python": args.vllm_python, **vars(server.info)},
        "command": " ".join(sys.argv),
    }
    path = write_results(f"vllm_sampling-{tag}-cpu", result)

    table = Table(
        title=f"sampling: {args.requests} concurrent x {args.new_tokens} tokens on {tag} (tokens/s, median)"
    )
    table.add_column("workload")
    for side in SIDES:
        table.add_column(side)
    table.add_column("backend / engine")
    table.add_column("direct / backend (hop)")
    for workload in WORKLOADS:
        med = {s: statistics.median(rates[workload][s]) for s in SIDES}
        table.add_row(
            workload,
            *(f"{med[s]:.0f}" for s in SIDES),
            f"{result['vllm_backend_vs_engine'][workload]['median']:.2f}x",
            f"{result['hop_cost_direct_vs_backend'][workload]['median']:.3f}x",
        )
    console.print(table)
    console.print(f"results: {path}")


if __name__ == "__main__":
    main()
