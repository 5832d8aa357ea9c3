"""Sampling throughput: 32 concurrent requests x 64 new tokens through EZTinker's continuous batcher.

Three measurements, each side by side in the same process, interleaved in rounds (medians reported):

* **EZTinker vs Hugging Face `generate`** — 32 requests submitted at once from 32 threads to an in-process
  `Service` (the server's scheduler, sampling engine and store, without HTTP), all on one run's adapter,
  against `model.generate` on the bare model, one request at a time (same prompts, 64 new tokens, sampling
  at temperature 1). Output tokens/s.
* **8 adapters vs 1** — the same 32 requests spread over 8 runs' adapters (4 each) vs all on one run's.
* **Time to first token** — per request, from submission to its first token (`on_token`), p50 / p99,
  under the 8-adapter load.

Every request samples exactly 64 tokens (no stop), so both sides do the same work.

Reproduce:

    OMP_NUM_THREADS=1 uv run python bench/sampling_throughput.py            # tiny qwen2 (H 256, L 4)
    OMP_NUM_THREADS=1 uv run python bench/sampling_throughput.py --rounds 5
"""

from __future__ import annotations

import argparse
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
from common import machine_info, resolve_model, summary, write_results
from eztinker.engine import SamplingParams
from eztinker.engine.sampler import SampleRequest
from eztinker.models import api
from eztinker.service import ModelTarget, SampleSpec, Service
from eztinker.settings import Settings

console = Console()


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, vocab, (int(torch.randint(8, 33, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def eztinker_round(
    service: Service, base: str, runs: list[str], prompts: list[list[int]], new_tokens: int, seed: int
) -> tuple[float, list[float]]:
    """(wall seconds, time to first token of each request) for all prompts submitted at once."""
    start_line = threading.Barrier(len(prompts) + 1)
    first: list[float | None] = [None] * len(prompts)
    submitted = [0.0] * len(prompts)
    jobs: list = [None] * len(prompts)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        def on_token(sample: int, token: int, logprob: float, topk, done: bool) -> None:
            if first[i] is None:
                first[i] = time.perf_counter() - submitted[i]

        run_id = runs[i % len(runs)] if runs else None
        request = SampleRequest(
            prompts[i],
            SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=seed + i, stop=[]),
            on_token=on_token,
        )
        start_line.wait()
        try:
            submitted[i] = time.perf_counter()
            jobs[i] = service.sampling.sample(
                SampleSpec(ModelTarget(base, run_id, run_id), [request], check_now=True), None
            )
            jobs[i].wait_sync(600)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    start_line.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    for job in jobs:
        assert job.status == "completed", job.error
        assert all(len(s.tokens) == new_tokens for r in job.result.results for s in r.sequences)
    return seconds, [f for f in first if f is not None]


def hf_round(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, seed: int) -> float:
    """Wall seconds for `generate` on each prompt, one request at a time."""
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        torch.manual_seed(seed + i)
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=0,
        )
        assert out.shape[1] == len(prompt) + new_tokens
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    workdir = Path(tempfile.mkdtemp(prefix="eztinker-bench-sampling-"))
    model_dir, tag = resolve_model(args.model, workdir)
    service = Service(Settings(data_dir=workdir / "data", models=[str(model_dir)], device="cpu"))
    service.start()
    base = str(model_dir)
    runs = [
        service.create_run(
            api.CreateRunRequest(base_model=base, lora_config={"r": 8, "seed": i}), None
        ).run_id
        for i in range(args.adapters)
    ]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = make_prompts(args.requests, service.backend.engine.base_model(base).vocab_size)
    tokens = args.requests * args.new_tokens

    console.print(f"warm-up on {tag} ({args.requests} requests x {args.new_tokens} tokens)...")
    eztinker_round(service, base, runs[:1], prompts, args.new_tokens, 0)
    with torch.inference_mode():
        hf_round(hf, prompts[:2], args.new_tokens, 0)

    rates: dict[str, list[float]] = {
        "eztinker_base": [],
        "hf_generate": [],
        "eztinker_1_adapter": [],
        "eztinker_8_adapters": [],
    }
    ttft: list[float] = []
    for r in range(args.rounds):
        order = list(rates)
        if r % 2:
            order.reverse()
        for side in order:
            if side == "hf_generate":
                with torch.inference_mode():
                    seconds = hf_round(hf, prompts, args.new_tokens, 1000 * r)
            else:
                chosen = {"eztinker_base": [], "eztinker_1_adapter": runs[:1]}.get(side, runs)
                seconds, first = eztinker_round(service, base, chosen, prompts, args.new_tokens, 1000 * r)
                if side == "eztinker_8_adapters":
                    ttft += first
            rates[side].append(tokens / seconds)
            console.print(f"round {r + 1}: {side:22s} {tokens / seconds:8.1f} tokens/s")
    service.stop()

    per_round_speedup = [e / h for e, h in zip(rates["eztinker_base"], rates["hf_generate"], strict=True)]
    per_round_multi = [
        m / s for m, s in zip(rates["eztinker_8_adapters"], rates["eztinker_1_adapter"], strict=True)
    ]
    ttft_sorted = sorted(ttft)
    p99 = ttft_sorted[min(len(ttft_sorted) - 1, round(0.99 * (len(ttft_sorted) - 1)))]
    result = {
        "model": tag,
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "adapters": args.adapters,
        "rounds": args.rounds,
        "tokens_per_second": {k: summary(v) for k, v in rates.items()},
        "speedup_vs_hf_generate": {
            "median": statistics.median(per_round_speedup),
            "per_round": per_round_speedup,
        },
        "multi_vs_single_adapter": {
            "median": statistics.median(per_round_multi),
            "per_round": per_round_multi,
        },
        "ttft_seconds": {"p50": statistics.median(ttft), "p99": p99, "n": len(ttft)},
        "raw": rates,
        "machine": machine_info(torch.device("cpu")),
        "command": " ".join(sys.argv),
    }
    path = write_results(f"sampling_throughput-{tag}-cpu", result)

    table = Table(title=f"sampling: {args.requests} concurrent x {args.new_tokens} tokens on {tag}")
    table.add_column("measure")
    table.add_column("median")
    table.add_column("per round")
    table.add_row(
        "EZTinker (base) / HF generate (1 at a time)",
        f"{result['speedup_vs_hf_generate']['median']:.1f}x",
        ", ".join(f"{x:.1f}" for x in per_round_speedup),
    )
    table.add_row(
        f"{args.adapters} adapters / 1 adapter",
        f"{result['multi_vs_single_adapter']['median']:.2f}x",
        ", ".join(f"{x:.2f}" for x in per_round_multi),
    )
    for k, v in rates.items():
        table.add_row(f"{k} tokens/s", f"{v and statistics.median(v):.0f}", ", ".join(f"{x:.0f}" for x in v))
    table.add_row(
        "TTFT p50 / p99 (8 adapters)", f"{result['ttft_seconds']['p50'] * 1000:.0f} / {p99 * 1000:.0f} ms", ""
    )
    console.print(table)
    console.print(f"results: {path}")


if __name__ == "__main__":
    main()
