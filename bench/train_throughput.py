"""Training-step throughput: the engine vs a hand-written PEFT + AdamW loop, side by side.

Both sides train the same LoRA (same rank, alpha, dropout 0, target modules and initial A/B — the engine's
initial adapter is copied into the PEFT model) on the same base model, batch, dtype and device, with the
same AdamW hyper-parameters. One step is:

* engine:   `Engine.forward_backward(run_id, [Datum.from_labels(row) ...])` (native cross_entropy)
            + `Engine.optim_step(run_id, AdamParams(...))`
* baseline: `out = model(input_ids, attention_mask, labels=labels, use_cache=False)`;
            `out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)` with
            `model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(dir), LoraConfig(...))`
            and `opt = torch.optim.AdamW(trainable params)`.

Measurement: a few warm-up steps per side, then `--steps` rounds; each round times one step of each side,
alternating the order (engine first in even rounds, baseline first in odd ones), so drift and noise on this
shared machine hit both sides alike. Reported: per-side median step time and tokens/s with IQR, the ratio
of medians (engine tokens/s ÷ baseline tokens/s; target ≥ 0.95), the median of per-round ratios (robust to
bursts of load that span a round), and the ratio of the fastest steps (load from elsewhere only ever adds
time, so the minimum is the least disturbed estimate of each side's own cost).
Correctness: both sides must report the same loss at step 0 (same base, B = 0) and, since they start from
the same adapter and apply the same updates, the same loss at every later step (to float tolerance).

Reproduce (results in BENCHMARKS.md):

    uv run python bench/train_throughput.py --model smollm2 --batch 2 --seq-len 128 --steps 24 --profile 10
    uv run python bench/train_throughput.py --model smollm2 --batch 8 --seq-len 128 --steps 10 \
        --name train_throughput-smollm2-135m-cpu-8x128
    uv run python bench/train_throughput.py --model tiny --batch 8 --seq-len 128 --steps 60 --warmup 3 --profile 20

`--profile N` additionally profiles N steps of each side with torch.profiler and prints the top operators.
Results go to bench/results/train_throughput-<model>-<device>.json (or `--name`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common import machine_info, pick_device, pick_dtype, resolve_model, summary, sync, write_results

console = Console()


@dataclass
class Side:
    """One contender: a step function, and what it measured."""

    name: str
    times: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)  # every step's loss, warm-up included


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="'smollm2' (default), 'tiny' or a model directory")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 × rank)")
    p.add_argument(
        "--steps", type=int, default=10, help="measured rounds, one step per side each (default 10)"
    )
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per side, not measured (default 2)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="base model dtype"
    )
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="also profile N steps of each side")
    p.add_argument(
        "--name", default=None, help="results file name (default train_throughput-<model>-<device>)"
    )
    return p.parse_args(argv)


def build(args: argparse.Namespace, model_dir: Path, device: torch.device, dtype: torch.dtype):
    """The engine with one run, the PEFT model (same initial adapter), its optimizer, and the batch."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from eztinker.engine import Engine, EngineConfig
    from eztinker.engine.types import Datum
    from eztinker.models import LoRAConfig

    alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
    engine = Engine(EngineConfig(device=str(device), dtype=dtype))
    info = engine.create_run(
        str(model_dir), LoRAConfig(r=args.rank, lora_alpha=alpha, lora_dropout=0.0, seed=args.seed)
    )
    base = engine.base_model(str(model_dir))

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa")
    model.to(device)
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.rank,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=list(info.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_weights(info.run_id, Path(tmp) / "adapter")
        state = load_file(str(Path(tmp) / "adapter" / "adapter_model.safetensors"))
    loaded = set_peft_model_state_dict(model, state)
    if loaded.unexpected_keys:
        raise RuntimeError(f"the engine's adapter did not fit the PEFT model: {loaded.unexpected_keys[:3]}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_engine, n_peft = info.num_parameters, sum(p.numel() for p in trainable)
    if n_engine != n_peft:
        raise RuntimeError(f"adapter sizes differ: engine {n_engine} vs PEFT {n_peft} parameters")
    opt = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)

    gen = torch.Generator().manual_seed(args.seed)
    vocab = min(base.vocab_size, len(base.tokenizer))
    input_ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen)
    data = [Datum.from_labels(row.tolist()) for row in input_ids]
    batch = {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": input_ids.to(device),
    }
    return engine, info, model, opt, data, batch, alpha


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)

    from eztinker.engine.types import AdamParams

    with tempfile.TemporaryDirectory() as workdir:
        model_dir, tag = resolve_model(args.model, Path(workdir))
        console.print(
            f"[bold]train_throughput[/]: {tag} on {device} ({dtype}), batch {args.batch}×{args.seq_len}"
        )
        engine, info, model, opt, data, batch, alpha = build(args, model_dir, device, dtype)
    run_id = info.run_id
    adam = AdamParams(learning_rate=args.lr, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.0)
    tokens = args.batch * args.seq_len

    engine_side, base_side = Side("engine"), Side("baseline (PEFT)")

    def engine_step() -> None:
        sync(device)
        t0 = time.perf_counter()
        result = engine.forward_backward(run_id, data)
        sync(device)
        t1 = time.perf_counter()
        engine.optim_step(run_id, adam)
        sync(device)
        t2 = time.perf_counter()
        engine_side.times.append(t2 - t0)
        engine_side.phases.setdefault("forward_backward", []).append(t1 - t0)
        engine_side.phases.setdefault("optim_step", []).append(t2 - t1)
        engine_side.losses.append(result.loss)

    def baseline_step() -> None:
        sync(device)
        t0 = time.perf_counter()
        out = model(**batch, use_cache=False)
        sync(device)
        t1 = time.perf_counter()
        out.loss.backward()
        sync(device)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        t3 = time.perf_counter()
        base_side.times.append(t3 - t0)
        base_side.phases.setdefault("forward", []).append(t1 - t0)
        base_side.phases.setdefault("backward", []).append(t2 - t1)
        base_side.phases.setdefault("optim_step", []).append(t3 - t2)
        base_side.losses.append(float(out.loss.detach()))

    model.train()  # dropout is 0 everywhere; PEFT's training mode only matters for dropout
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        warm = progress.add_task("warm-up", total=args.warmup)
        for _ in range(args.warmup):
            engine_step()
            baseline_step()
            progress.advance(warm)
        for side in (engine_side, base_side):  # warm-up steps are not measured (their losses are kept)
            side.times.clear()
            side.phases = {k: [] for k in side.phases}
        task = progress.add_task("measuring (engine/baseline interleaved)", total=args.steps)
        for i in range(args.steps):
            if i % 2 == 0:
                engine_step()
                baseline_step()
            else:
                baseline_step()
                engine_step()
            progress.advance(task)

    loss_diffs = [abs(a - b) for a, b in zip(engine_side.losses, base_side.losses, strict=True)]
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    step0_ok = loss_diffs[0] <= tolerance * max(1.0, abs(base_side.losses[0]))

    results: dict[str, dict] = {}
    for side in (engine_side, base_side):
        tps = [tokens / t for t in side.times]
        results[side.name] = {
            "step_s": summary(side.times),
            "tokens_per_s": summary(tps),
            "phases_s": {k: summary(v) for k, v in side.phases.items()},
            "loss_step0": side.losses[0],
            "loss_last": side.losses[-1],
        }
    e_tps = results["engine"]["tokens_per_s"]["median"]
    b_tps = results["baseline (PEFT)"]["tokens_per_s"]["median"]
    ratio = e_tps / b_tps
    paired = [b / e for e, b in zip(engine_side.times, base_side.times, strict=True)]
    paired_summary = summary(paired)
    ratio_min = min(base_side.times) / min(
        engine_side.times
    )  # best case: additive load from elsewhere cancels

    table = Table(title=f"Training step: {tag}, {args.batch}×{args.seq_len} tokens, {dtype}, {device}")
    for col in ("side", "median step (s)", "IQR (s)", "tokens/s (median)", "tokens/s IQR", "loss @ step 0"):
        table.add_column(col, justify="right" if col != "side" else "left")
    for side in (engine_side, base_side):
        r = results[side.name]
        table.add_row(
            side.name,
            f"{r['step_s']['median']:.4f}",
            f"{r['step_s']['iqr']:.4f}",
            f"{r['tokens_per_s']['median']:.1f}",
            f"{r['tokens_per_s']['iqr']:.1f}",
            f"{r['loss_step0']:.6f}",
        )
    console.print(table)
    phases = Table(title="Per-phase medians (s)")
    phases.add_column("side")
    phases.add_column("phase")
    phases.add_column("median", justify="right")
    phases.add_column("IQR", justify="right")
    for side in (engine_side, base_side):
        for phase, s in results[side.name]["phases_s"].items():
            phases.add_row(side.name, phase, f"{s['median']:.4f}", f"{s['iqr']:.4f}")
    console.print(phases)
    verdict = "[green]meets[/]" if ratio >= 0.95 else "[red]misses[/]"
    console.print(
        f"ratio of medians (engine/baseline tokens/s): [bold]{ratio:.3f}[/] ({verdict} the 0.95 target); "
        f"median per-round ratio {paired_summary['median']:.3f} (IQR {paired_summary['iqr']:.3f}); "
        f"ratio of fastest steps {ratio_min:.3f}"
    )
    console.print(
        f"loss at step 0: engine {engine_side.losses[0]:.6f}, baseline {base_side.losses[0]:.6f} "
        f"(|diff| {loss_diffs[0]:.2e}, {'same' if step0_ok else 'DIFFERENT'}); "
        f"max |diff| over all {len(loss_diffs)} steps {max(loss_diffs):.2e}"
    )

    profile = None
    if args.profile:
        profile = run_profile(args.profile, engine_step, baseline_step, device)

    payload = {
        "benchmark": "train_throughput",
        "command": "uv run python bench/train_throughput.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(device),
        "config": {
            "model": tag,
            "model_dir": str(model_dir),
            "batch": args.batch,
            "seq_len": args.seq_len,
            "tokens_per_step": tokens,
            "rank": args.rank,
            "alpha": alpha,
            "target_modules": list(info.target_modules),
            "adapter_parameters": info.num_parameters,
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "warmup": args.warmup,
            "steps": args.steps,
            "lr": args.lr,
        },
        "results": results,
        "ratio_of_medians": ratio,
        "paired_ratio": paired_summary,
        "ratio_of_minimums": ratio_min,
        "target_ratio": 0.95,
        "meets_target": ratio >= 0.95,
        "loss_check": {
            "step0_engine": engine_side.losses[0],
            "step0_baseline": base_side.losses[0],
            "step0_abs_diff": loss_diffs[0],
            "step0_same": step0_ok,
            "max_abs_diff_all_steps": max(loss_diffs),
        },
        "raw": {
            "engine_step_s": engine_side.times,
            "baseline_step_s": base_side.times,
            "engine_losses": engine_side.losses,
            "baseline_losses": base_side.losses,
        },
    }
    if profile is not None:
        payload["profile"] = profile
    name = args.name or f"train_throughput-{tag}-{device.type}"
    path = write_results(name, payload)
    console.print(f"results: {path}")
    return 0 if step0_ok else 1


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ side logs every start and stop there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def run_profile(steps: int, engine_step, baseline_step, device: torch.device) -> dict:
    """Profile `steps` steps of each side, interleaved (one profiled step per side per round, alternating
    the order), and compare the per-operator self CPU time: the median over steps, per side.

    Medians over single-step profiles, not sums, so that a burst of load from elsewhere on the machine
    during one step does not decide the comparison.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    per_step: dict[str, list[dict[str, float]]] = {"engine": [], "baseline": []}
    calls: dict[str, dict[str, int]] = {"engine": {}, "baseline": {}}
    sides = [("engine", engine_step), ("baseline", baseline_step)]
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console
    ) as bar:
        task = bar.add_task("profiling (interleaved)", total=steps)
        for i in range(steps):
            for name, step in sides if i % 2 == 0 else sides[::-1]:
                with quiet_stderr(), profile(activities=activities) as prof:
                    step()
                times: dict[str, float] = {}
                for event in prof.key_averages():
                    times[event.key] = event.self_cpu_time_total / 1000  # ms
                    calls[name][event.key] = event.count
                per_step[name].append(times)
            bar.advance(task)

    def median_ms(name: str, op: str) -> float:
        return statistics.median(t.get(op, 0.0) for t in per_step[name])

    ops = set().union(*per_step["engine"], *per_step["baseline"])
    rows = []
    for op in ops:
        e, b = median_ms("engine", op), median_ms("baseline", op)
        rows.append({"op": op, "engine_ms": e, "baseline_ms": b, "diff_ms": e - b,
                     "engine_calls": calls["engine"].get(op, 0), "baseline_calls": calls["baseline"].get(op, 0)})  # fmt: skip
    rows.sort(key=lambda r: abs(r["diff_ms"]), reverse=True)
    totals = {name: statistics.median(sum(t.values()) for t in per_step[name]) for name in per_step}

    table = Table(title=f"Self CPU time per step by operator, median of {steps} interleaved steps (ms)")
    for col in ("op", "engine", "calls", "baseline", "calls ", "engine − baseline"):
        table.add_column(col, justify="left" if col == "op" else "right")
    for r in rows[:25]:
        table.add_row(
            r["op"][:60],
            f"{r['engine_ms']:.2f}",
            str(r["engine_calls"]),
            f"{r['baseline_ms']:.2f}",
            str(r["baseline_calls"]),
            f"{r['diff_ms']:+.2f}",
        )
    console.print(table)
    console.print(
        f"self CPU per step (median over steps): engine {totals['engine']:.1f} ms, "
        f"baseline {totals['baseline']:.1f} ms; operators by |difference| above"
    )
    return {"steps": steps, "total_self_cpu_ms": totals, "ops": rows[:60]}


if __name__ == "__main__":
    raise SystemExit(main())
