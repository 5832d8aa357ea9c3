"""Many samples in flight through the official `tinker` SDK: one completion queue per client vs one long-poll
per sample, side by side.

Against one real `eztinker server` subprocess on 127.0.0.1 (SQLite, CPU), two `ServiceClient`s sample the
same base model. One uses the server's `sample_use_retrieve_futures` (the SDK's session completion queue:
one `/api/v1/retrieve_futures` long-poll tells it which samples ended, then one `retrieve_future` each
fetches the result); the other is told the flag is off (as against a server without the queue), so each
sample in flight holds its own `retrieve_future` long-poll until it ends. A round submits `--samples`
`sample` calls at once (an RL step's rollouts) and waits for all; rounds alternate between the clients so
machine noise hits both. Reported: poll requests per sample, the most polls open at once (connections the
server holds for the client), and samples/s, queue ÷ per-sample.

Reproduce:

    OMP_NUM_THREADS=1 uv run python bench/sdk_sampling_polls.py                     # tiny qwen2, 256 × 16 tokens
    OMP_NUM_THREADS=1 uv run python bench/sdk_sampling_polls.py --model smollm2 --samples 64 --tokens 32
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client_vs_engine import start_server
from common import machine_info, resolve_model, summary, write_results

console = Console()
POLLS: Counter[str] = Counter()  # poll requests the SDK sent, by route
OPEN: Counter[str] = Counter()  # polls open now, and the most open at once (all on the SDK's one event loop)


def count_polls() -> None:
    """Count the SDK's `retrieve_future` and `retrieve_futures` calls (every poll goes through one of them)."""
    import tinker.resources.futures as futures

    for name, route in (("retrieve", "retrieve_future"), ("retrieve_multi", "retrieve_futures")):
        real = getattr(futures.AsyncFuturesResource, name)

        async def counted(
            self: Any, *args: Any, _real: Any = real, _route: str = route, **kwargs: Any
        ) -> Any:
            POLLS[_route] += 1
            OPEN["now"] += 1
            OPEN["peak"] = max(OPEN["peak"], OPEN["now"])
            try:
                return await _real(self, *args, **kwargs)
            finally:
                OPEN["now"] -= 1

        setattr(futures.AsyncFuturesResource, name, counted)


def client_without_the_queue(url: str) -> Any:
    """A ServiceClient told that the server has no completion queue (what an older server says)."""
    import tinker
    from tinker.lib.internal_client_holder import InternalClientHolder

    real = InternalClientHolder._fetch_client_config

    async def flags_off(self: Any, *args: Any, **kwargs: Any) -> Any:
        config = await real(self, *args, **kwargs)
        return config.model_copy(
            update={"sample_use_retrieve_futures": False, "sample_join_sampling_session": False}
        )

    InternalClientHolder._fetch_client_config = flags_off  # type: ignore[method-assign]
    try:
        return tinker.ServiceClient(base_url=url)
    finally:
        InternalClientHolder._fetch_client_config = real  # type: ignore[method-assign]


def sample_round(sampling: Any, samples: int, tokens: int, seed: int) -> tuple[float, int, int]:
    """Submit `samples` samples at once, wait for all; (seconds, poll requests sent, most polls open at once)."""
    from tinker import types

    prompt = types.ModelInput.from_ints([5, 6, 7, 8])
    params = [
        types.SamplingParams(max_tokens=tokens, seed=seed * samples + i, stop=[]) for i in range(samples)
    ]
    before = sum(POLLS.values())
    OPEN["peak"] = 0
    start = time.perf_counter()
    futures = [sampling.sample(prompt, 1, p) for p in params]
    for future in futures:
        assert len(future.result(timeout=600).sequences[0].tokens) == tokens
    return time.perf_counter() - start, sum(POLLS.values()) - before, OPEN["peak"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 | a model directory")
    parser.add_argument("--samples", type=int, default=256, help="samples in flight per round")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per sample")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per client, interleaved")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="eztinker-bench-"))
    os.environ.update(TINKER_API_KEY="tml-bench", TINKER_TELEMETRY="0", HOME=str(workdir))
    import tinker

    count_polls()
    model_dir, tag = resolve_model(args.model, workdir)
    server, url = start_server(model_dir, workdir / "server")
    times: dict[str, list[float]] = {"queue": [], "per_sample": []}
    polls: dict[str, list[int]] = {"queue": [], "per_sample": []}
    peaks: dict[str, list[int]] = {"queue": [], "per_sample": []}
    try:
        queue_client, plain_client = tinker.ServiceClient(base_url=url), client_without_the_queue(url)
        samplers = {
            "queue": queue_client.create_sampling_client(base_model=str(model_dir)).result(),
            "per_sample": plain_client.create_sampling_client(base_model=str(model_dir)).result(),
        }
        for sampling in samplers.values():  # warm-up: the model loads, the SDK's pools open
            sample_round(sampling, 8, args.tokens, seed=10_000)
        with Progress(console=console) as progress:
            task = progress.add_task("rounds (queue, per-sample)", total=args.rounds)
            for r in range(args.rounds):
                for mode, sampling in samplers.items():
                    seconds, sent, peak = sample_round(sampling, args.samples, args.tokens, seed=r)
                    times[mode].append(seconds)
                    polls[mode].append(sent)
                    peaks[mode].append(peak)
                progress.advance(task)
        queue_client.close("success").result()
        plain_client.close("success").result()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)

    rate = {mode: [args.samples / t for t in ts] for mode, ts in times.items()}
    per_sample = {mode: sum(p) / (len(p) * args.samples) for mode, p in polls.items()}
    ratio = summary(rate["queue"])["median"] / summary(rate["per_sample"])["median"]
    table = Table(title=f"{args.samples} samples × {args.tokens} tokens in flight, {tag}")
    for column in (
        "client",
        "polls per sample",
        "most polls open at once",
        "samples/s (median)",
        "per round",
    ):
        table.add_column(column)
    for mode in ("queue", "per_sample"):
        rounds = ", ".join(f"{x:.1f}" for x in rate[mode])
        median = f"{summary(rate[mode])['median']:.1f}"
        table.add_row(mode, f"{per_sample[mode]:.2f}", str(max(peaks[mode])), median, rounds)
    console.print(table)
    console.print(f"samples/s, queue ÷ per-sample: [bold]{ratio:.2f}×[/bold]")
    command = "uv run python bench/sdk_sampling_polls.py " + " ".join(sys.argv[1:])
    path = write_results(
        "sdk_sampling_polls",
        {
            "benchmark": "sdk_sampling_polls",
            "command": command.strip(),
            "machine": machine_info(torch.device("cpu")),
            "model": tag,
            "samples": args.samples,
            "tokens": args.tokens,
            "polls_per_sample": per_sample,
            "most_polls_open_at_once": {mode: max(p) for mode, p in peaks.items()},
            "samples_per_second": {mode: summary(r) for mode, r in rate.items()},
            "queue_vs_per_sample": ratio,
        },
    )
    console.print(f"results: {path}")


if __name__ == "__main__":
    main()
