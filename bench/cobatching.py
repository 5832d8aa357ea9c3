"""Co-batching: aggregate training tokens/s of N concurrent runs, co-batched vs time-multiplexed.

Each run is a user's loop in a thread of its own — `forward_backward` on `--seqs` sequences of 64 tokens,
then `optim_step`, waiting for each result — against one in-process `Service` (the server's scheduler,
engine and store, without HTTP). This is the small-batch regime of RL and interactive SFT, where one
run alone leaves the hardware idle. Two modes on the same service, same runs, interleaved in rounds:

* **co-batched** — the scheduler gathers waiting ops of different runs into one pass (`max_pass_jobs=64`);
* **time-multiplexed** — one run's op at a time (`max_pass_jobs=1`), what other open servers do.

Each mode's best round is compared (the round least disturbed by other load on a shared machine, as
timeit does); the median of per-round ratios is reported beside it. Also measured side by side: the ceiling (a plain PEFT + AdamW loop at batch 8x64 vs 1x64, tokens/s) and
the scheduling delay on an idle server (service call → job start, p50/p99). A sweep over 1-16 runs at 1
and 4 sequences per op is plotted to docs/cobatching.png.

Reproduce:

    uv run python bench/cobatching.py                       # headline (8 runs x 20 steps) + sweep + plot
    uv run python bench/cobatching.py --no-sweep            # headline, ceiling and delay only
    uv run python bench/cobatching.py --model <dir> --device cuda --no-sweep   # on a GPU (bf16)
    uv run python bench/cobatching.py --no-sweep --pipelined   # clients submit optim_step without waiting
                                                                # for forward_backward (the cookbook's loop)
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
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, pick_device, pick_dtype, resolve_model, summary, sync, write_results
from eztinker.engine import AdamParams, Datum
from eztinker.models import api
from eztinker.service import Service
from eztinker.settings import Settings

console = Console()
SEQ_LEN = 64
MODES = {"co-batched": 64, "time-multiplexed": 1}  # max_pass_jobs


def make_data(seqs: int, vocab: int, seed: int) -> list[Datum]:
    g = torch.Generator().manual_seed(seed)
    return [Datum.from_labels(torch.randint(3, vocab, (SEQ_LEN,), generator=g).tolist()) for _ in range(seqs)]


def train_concurrently(
    service: Service, run_ids: list[str], steps: int, seqs: int, vocab: int, pipelined: bool = False
) -> float:
    """Wall seconds for every run to do `steps` (forward_backward + optim_step) from its own thread.

    `pipelined`: each step submits both ops, then waits for both (tinker-cookbook's loop); otherwise it
    waits for `forward_backward` before sending `optim_step`."""
    start_line = threading.Barrier(len(run_ids) + 1)
    errors: list[BaseException] = []

    def loop(i: int, run_id: str) -> None:
        data = make_data(seqs, vocab, seed=i)
        start_line.wait()
        try:
            for _ in range(steps):
                fb = service.forward_backward(run_id, data, None, None)
                if not pipelined:
                    fb.wait_sync(300)
                step = service.optim_step(run_id, AdamParams(learning_rate=1e-4), None)
                fb.wait_sync(300)
                step.wait_sync(300)
                for job in (fb, step):
                    if job.status != "completed":
                        raise RuntimeError(f"{job.op} failed: {job.error}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(i, r)) for i, r in enumerate(run_ids)]
    for thread in threads:
        thread.start()
    start_line.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return seconds


def compare(
    service: Service,
    run_ids: list[str],
    steps: int,
    seqs: int,
    vocab: int,
    rounds: int,
    progress,
    task,
    pipelined: bool = False,
):
    """tokens/s per mode over interleaved rounds (A B, B A, A B …), and the co-batched / multiplexed ratio."""
    tokens = len(run_ids) * steps * seqs * SEQ_LEN
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    pass_sizes: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(rounds):
        order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
        for mode in order:
            service.scheduler.max_pass_jobs = MODES[mode]
            passes, jobs = service.scheduler.passes, service.scheduler.jobs_in_passes
            seconds = train_concurrently(service, run_ids, steps, seqs, vocab, pipelined)
            rates[mode].append(tokens / seconds)
            pass_sizes[mode].append(
                (service.scheduler.jobs_in_passes - jobs) / (service.scheduler.passes - passes)
            )
            progress.advance(task)
    per_round = [a / b for a, b in zip(rates["co-batched"], rates["time-multiplexed"], strict=True)]
    return {
        "runs": len(run_ids),
        "seqs_per_op": seqs,
        "steps": steps,
        "tokens_per_round": tokens,
        "tokens_per_second": {m: summary(v) for m, v in rates.items()},
        # Best round of each mode: the least disturbed by other load on a shared machine (timeit's rule).
        "ratio": max(rates["co-batched"]) / max(rates["time-multiplexed"]),
        "ratio_median_of_rounds": statistics.median(per_round),
        "ratios_per_round": per_round,
        "mean_jobs_per_pass": {m: statistics.mean(v) for m, v in pass_sizes.items()},
    }


def peft_ceiling(
    model_dir: Path, steps: int, rounds: int, progress, task, device: torch.device, dtype: torch.dtype
) -> dict:
    """tokens/s of a plain PEFT + AdamW loop at batch 8x64 over 1x64: what batching can give at best."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    rates: dict[int, list[float]] = {1: [], 8: []}
    for r in range(rounds):
        for batch in (1, 8) if r % 2 == 0 else (8, 1):
            ids = torch.randint(3, vocab, (batch, SEQ_LEN), device=device)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            sync(device)
            rates[batch].append(batch * SEQ_LEN * steps / (time.perf_counter() - t0))
            progress.advance(task)
    return {
        "tokens_per_second": {f"{b}x{SEQ_LEN}": summary(v) for b, v in rates.items()},
        "ratio_8_over_1": max(rates[8]) / max(rates[1]),
    }


def scheduling_delay(service: Service, run_id: str, samples: int, vocab: int) -> dict:
    """Milliseconds from the service call to the job's start, for ops on an idle server."""
    service.scheduler.max_pass_jobs = MODES["co-batched"]
    data = make_data(1, vocab, seed=99)
    delays = []
    for _ in range(samples):
        time.sleep(0.005)  # idle: nothing queued or running
        called = time.time()
        job = service.forward_backward(run_id, data, None, None, backward=False)
        job.wait_sync(60)
        assert job.started_at is not None
        delays.append((job.started_at - called) * 1000)
    delays.sort()
    return {
        "p50_ms": statistics.median(delays),
        "p99_ms": delays[min(len(delays) - 1, int(0.99 * len(delays)))],
        "max_ms": delays[-1],
        "samples": samples,
    }


def plot(sweep: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seq_options = sorted({row["seqs_per_op"] for row in sweep})
    fig, axes = plt.subplots(1, len(seq_options), figsize=(5.5 * len(seq_options), 4), squeeze=False)
    for ax, seqs in zip(axes[0], seq_options, strict=True):
        rows = [row for row in sweep if row["seqs_per_op"] == seqs]
        runs = [row["runs"] for row in rows]
        for mode, style in zip(MODES, ("o-", "s--"), strict=True):
            ax.plot(runs, [row["tokens_per_second"][mode]["max"] for row in rows], style, label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xticks(runs, [str(r) for r in runs])
        ax.set_xlabel("concurrent runs")
        ax.set_ylabel("aggregate training tokens/s (best round)")
        ax.set_title(f"{seqs} x {SEQ_LEN}-token sequence{'s' if seqs > 1 else ''} per op")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("EZTinker co-batching vs one adapter at a time (2-core CPU, qwen2 H=256 L=4)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny (qwen2 H=256 L=4), smollm2, or a model dir")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    parser.add_argument(
        "--dtype", default=None, help="float32, bfloat16 (default: bf16 on CUDA, fp32 on CPU)"
    )
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument(
        "--pipelined",
        action="store_true",
        help="clients send optim_step without waiting for forward_backward",
    )
    parser.add_argument("--sweep-steps", type=int, default=8)
    parser.add_argument(
        "--plot", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "cobatching.png"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, tag = resolve_model(args.model, Path(tmp))
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        settings = Settings(
            data_dir=Path(tmp) / "data",
            models=[str(model_dir)],
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
        )
        service = Service(settings)
        service.start()
        vocab = service.backend.engine.base_model(str(model_dir)).vocab_size
        sweep_points = [] if args.no_sweep else [(n, s) for s in (1, 4) for n in (1, 2, 4, 8, 16)]
        max_runs = max([args.runs, *(n for n, _ in sweep_points)])
        run_ids = [
            service.create_run(
                api.CreateRunRequest(base_model=str(model_dir), lora_config={"r": 8, "seed": i}), None
            ).run_id
            for i in range(max_runs)
        ]
        total = 2 * args.rounds * (2 + len(sweep_points))
        with Progress(console=console) as progress:
            task = progress.add_task("benchmarking", total=total)
            train_concurrently(service, run_ids[: args.runs], 2, 1, vocab)  # warm-up
            headline = compare(
                service,
                run_ids[: args.runs],
                args.steps,
                1,
                vocab,
                args.rounds,
                progress,
                task,
                args.pipelined,
            )
            sweep = [
                compare(
                    service,
                    run_ids[:n],
                    args.sweep_steps,
                    s,
                    vocab,
                    args.rounds,
                    progress,
                    task,
                    args.pipelined,
                )
                for n, s in sweep_points
            ]
            delay = scheduling_delay(service, run_ids[0], 200, vocab)
            # Last: torch used from a second thread (this one) leaves small ops on the worker measurably
            # slower for the rest of the process (two OpenMP teams), which would skew the modes above.
            ceiling = peft_ceiling(model_dir, args.steps, args.rounds, progress, task, device, dtype)
        service.stop()

    table = Table(title=f"co-batching on {tag}, {SEQ_LEN}-token sequences (best of {args.rounds} rounds)")
    for column in ("runs", "seqs/op", "co-batched tok/s", "multiplexed tok/s", "ratio", "median ratio"):
        table.add_column(column, justify="right")
    for row in [headline, *sweep]:
        table.add_row(
            str(row["runs"]),
            str(row["seqs_per_op"]),
            f"{row['tokens_per_second']['co-batched']['max']:.0f}",
            f"{row['tokens_per_second']['time-multiplexed']['max']:.0f}",
            f"{row['ratio']:.2f}x",
            f"{row['ratio_median_of_rounds']:.2f}x",
        )
    console.print(table)
    console.print(
        f"mean jobs per pass, co-batched (headline): {headline['mean_jobs_per_pass']['co-batched']:.2f}"
    )
    console.print(f"PEFT ceiling (8x{SEQ_LEN} over 1x{SEQ_LEN} tokens/s): {ceiling['ratio_8_over_1']:.2f}x")
    console.print(
        f"scheduling delay on an idle server: p50 {delay['p50_ms']:.2f} ms, p99 {delay['p99_ms']:.2f} ms"
    )
    if sweep:
        plot(sweep, args.plot)
        console.print(f"plot: {args.plot}")
    path = write_results(
        f"cobatching-{tag}" + ("-pipelined" if args.pipelined else ""),
        {
            "benchmark": "cobatching",
            "model": tag,
            "machine": machine_info(device),
            "pipelined": args.pipelined,
            "headline": headline,
            "peft_ceiling": ceiling,
            "scheduling_delay": delay,
            "sweep": sweep,
            "command": " ".join(["uv run python bench/cobatching.py", *sys.argv[1:]]),
        },
    )
    console.print(f"results: {path}")


if __name__ == "__main__":
    main()
