"""Memory of many runs on one base model: measured growth per run vs adapter + gradients + Adam state.

Loads one base model in an `Engine`, then creates `--runs` runs (rank `--rank`) one after another. Each run
does `forward_backward` → `optim_step` → `forward_backward`, so that it holds everything a live run can hold
at once: its adapter, accumulated gradients (the engine drops them at `optim_step`, hence the second
`forward_backward`) and AdamW state (exp_avg, exp_avg_sq, step). Memory is read after each phase once it
has settled (`gc.collect()` and glibc `malloc_trim(0)`, which hands freed heap pages back to the kernel), and
the peak during each `forward_backward` is read too (activations and logits are transient).

Before the runs, a scratch run is trained once and deleted, to show apart the one-time cost of the first
training step in the process (reported, and used for a second "warm base" bound).

Theory per run = P × 4 B × (1 adapter + 1 gradients + 2 Adam moments) = 16·P bytes (fp32), P = the run's
parameter count. The bound checked is: base + runs × 16·P × 1.25, where "base" is the memory after loading
the base model *and running one forward pass of it*: on CPU, transformers 5 leaves fp32 safetensors weights
memory-mapped, so they only become resident (as RssFile) when a forward first touches them. Finally every run
is deleted (`Engine.delete_run`) and the memory they freed is measured, and weak references confirm that
no adapter, gradient or optimizer tensor outlives its run.

What is measured: on CPU, the process's resident set from /proc/self/status — VmRSS (all resident pages),
RssAnon (anonymous memory: tensors, the heap; what runs add), RssFile (mapped files: shared libraries, and
safetensors weights that stay memory-mapped), and VmHWM (peak VmRSS, reset before each forward_backward
through /proc/self/clear_refs where the kernel allows). RSS also holds the Python heap, glibc free lists
and allocator caches, so growth per run is reported both as the total over all runs (which includes one-time
costs of the first training step) and as the marginal slope between the first and the last run. On CUDA:
torch.cuda.memory_allocated (settled) and max_memory_allocated (peak).

Reproduce (results in BENCHMARKS.md):

    uv run python bench/memory.py --model smollm2
    uv run python bench/memory.py --model tiny

Results go to bench/results/memory-<model>-<device>.json (or `--name`).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import sys
import tempfile
import weakref
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common import machine_info, pick_device, pick_dtype, resolve_model, write_results

console = Console()
MiB = 2**20
BYTES_PER_PARAM = 4 * (1 + 1 + 2)  # fp32 adapter + gradients + Adam exp_avg and exp_avg_sq
SLACK = 1.25


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="'smollm2' (default), 'tiny' or a model directory")
    p.add_argument("--runs", type=int, default=16, help="runs to create (default 16)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--batch", type=int, default=2, help="sequences per forward_backward (default 2)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="base model dtype"
    )
    p.add_argument("--no-trim", action="store_true", help="do not call glibc malloc_trim(0) before measuring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="results file name (default memory-<model>-<device>)")
    return p.parse_args(argv)


class Meter:
    """Reads settled and peak memory of this process (CPU: /proc; CUDA: the caching allocator)."""

    def __init__(self, device: torch.device, trim: bool) -> None:
        self.device = device
        self.trim = trim
        self._libc = None
        if trim and device.type == "cpu":
            name = ctypes.util.find_library("c") or "libc.so.6"
            try:
                self._libc = ctypes.CDLL(name)
                self._libc.malloc_trim(0)
            except (OSError, AttributeError):  # not glibc: nothing to trim
                self._libc = None
        self.peak_resettable = self._reset_peak()

    def settle(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self._libc is not None:
            self._libc.malloc_trim(0)

    def read(self) -> dict[str, int]:
        """Current memory in bytes: `main` is what the bound is checked on (VmRSS, or CUDA allocated)."""
        if self.device.type == "cuda":
            return {
                "main": torch.cuda.memory_allocated(self.device),
                "reserved": torch.cuda.memory_reserved(self.device),
                "peak": torch.cuda.max_memory_allocated(self.device),
            }
        status = _proc_status()
        return {
            "main": status["VmRSS"],
            "anon": status["RssAnon"],
            "file": status["RssFile"],
            "peak": status["VmHWM"],
        }

    def _reset_peak(self) -> bool:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # resets VmHWM to the current VmRSS (Linux ≥ 4.0)
            return True
        except OSError:
            return False

    def reset_peak(self) -> None:
        if self.peak_resettable:
            self._reset_peak()


def _proc_status() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def mapped_bytes(suffix: str) -> int:
    """Resident bytes of this process's mappings of files whose name ends with `suffix` (/proc/self/smaps)."""
    total, inside = 0, False
    try:
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
            for line in f:
                first = line.split(maxsplit=1)[0] if line.strip() else ""
                if "-" in first and ":" not in first:  # a mapping's header line: "addr-addr perms ... path"
                    inside = line.rstrip().endswith(suffix)
                elif inside and first == "Rss:":
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


def run_tensors(engine, run_id: str) -> tuple[int, list[weakref.ref]]:
    """(bytes held by the run's adapter, gradients and optimizer state, weak refs to those tensors).

    Reads the engine's private run table: a benchmark may, the API need not expose it.
    """
    run = engine._runs[run_id]
    total, refs = 0, []
    for p in run.params:
        total += p.numel() * p.element_size()
        refs.append(weakref.ref(p))
        if p.grad is not None:
            total += p.grad.numel() * p.grad.element_size()
            refs.append(weakref.ref(p.grad))
        for value in run.optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
                refs.append(weakref.ref(value))
    return total, refs


def mib(n: float) -> str:
    return f"{n / MiB:,.1f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)

    from eztinker.engine import Engine, EngineConfig
    from eztinker.engine.types import AdamParams, Datum
    from eztinker.models import LoRAConfig

    meter = Meter(device, trim=not args.no_trim)
    with tempfile.TemporaryDirectory() as workdir:
        model_dir, tag = resolve_model(args.model, Path(workdir))
        console.print(f"[bold]memory[/]: {args.runs} runs of rank {args.rank} on {tag}, {device} ({dtype})")
        meter.settle()
        before_load = meter.read()
        engine = Engine(EngineConfig(device=str(device), dtype=dtype))
        base = engine.base_model(str(model_dir))
        meter.settle()
        after_load = meter.read()
        mapped_after_load = mapped_bytes(".safetensors") if device.type == "cpu" else 0
        gen = torch.Generator().manual_seed(args.seed)
        vocab = min(base.vocab_size, len(base.tokenizer))
        ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen)
        data = [Datum.from_labels(row.tolist()) for row in ids]
        # One forward of the bare base: weights that from_pretrained left memory-mapped become resident.
        engine.compute_logprobs(ids[0].tolist(), base_model=str(model_dir))
        meter.settle()
        after_base_forward = meter.read()
        mapped_weights = mapped_bytes(".safetensors") if device.type == "cpu" else 0
    base_weight_bytes = sum(p.numel() * p.element_size() for p in base.model.parameters()) + sum(
        b.numel() * b.element_size() for b in base.model.buffers()
    )
    adam = AdamParams(learning_rate=1e-4)

    # A scratch run, trained and deleted: what the first training step costs once per process (autograd's
    # worker state, allocator arenas, kernel caches) is then measured apart from what each run costs.
    scratch = engine.create_run(str(model_dir), LoRAConfig(r=args.rank, lora_alpha=2.0 * args.rank, seed=-1))
    engine.forward_backward(scratch.run_id, data)
    engine.optim_step(scratch.run_id, adam)
    engine.forward_backward(scratch.run_id, data)
    engine.delete_run(scratch.run_id)
    meter.settle()
    after_warmup = meter.read()

    rows: list[dict] = []
    run_ids: list[str] = []
    refs: list[weakref.ref] = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("runs: create → fb → step → fb", total=args.runs)
        for i in range(args.runs):
            info = engine.create_run(
                str(model_dir), LoRAConfig(r=args.rank, lora_alpha=2.0 * args.rank, seed=i)
            )
            run_ids.append(info.run_id)
            meter.settle()
            created = meter.read()
            meter.reset_peak()
            engine.forward_backward(info.run_id, data)
            peak_fb = meter.read()["peak"]
            engine.optim_step(info.run_id, adam)
            meter.settle()
            stepped = meter.read()
            meter.reset_peak()
            engine.forward_backward(info.run_id, data)
            peak_fb = max(peak_fb, meter.read()["peak"])
            meter.settle()
            settled = meter.read()
            held, run_refs = run_tensors(engine, info.run_id)
            refs.extend(run_refs)
            rows.append(
                {
                    "run": i + 1,
                    "parameters": info.num_parameters,
                    "theory_bytes": info.num_parameters * BYTES_PER_PARAM,
                    "tensor_bytes_held": held,
                    "created": created,
                    "after_fb_step": stepped,
                    "settled": settled,
                    "peak_during_fb": peak_fb,
                }
            )
            progress.advance(task)

    n = args.runs
    params = rows[0]["parameters"]
    theory = params * BYTES_PER_PARAM
    base_mem = after_base_forward["main"]
    final = rows[-1]["settled"]
    bound = base_mem + n * theory * SLACK
    bound_warm = after_warmup["main"] + n * theory * SLACK
    growth_total = final["main"] - base_mem
    per_run_total = growth_total / n
    per_run_slope = (final["main"] - rows[0]["settled"]["main"]) / (n - 1) if n > 1 else per_run_total
    peak_max = max(r["peak_during_fb"] for r in rows)
    result: dict = {
        "metric": "torch.cuda.memory_allocated" if device.type == "cuda" else "VmRSS (/proc/self/status)",
        "before_load": before_load,
        "after_load": after_load,
        "after_base_forward": after_base_forward,
        "base_weight_bytes": base_weight_bytes,
        "base_mapped_safetensors_bytes_after_load": mapped_after_load,
        "base_mapped_safetensors_bytes": mapped_weights,
        "run_parameters": params,
        "theory_per_run_bytes": theory,
        "tensor_bytes_held_per_run": rows[-1]["tensor_bytes_held"],
        "final_settled": final,
        "growth_total_bytes": growth_total,
        "growth_per_run_total_bytes": per_run_total,
        "growth_per_run_slope_bytes": per_run_slope,
        "bound_bytes": bound,
        "bound_holds": final["main"] <= bound,
        "after_warmup_run": after_warmup,
        "bound_after_warmup_bytes": bound_warm,
        "bound_after_warmup_holds": final["main"] <= bound_warm,
        "peak_max_bytes": peak_max,
        "peak_resettable": meter.peak_resettable,
        "peak_within_bound": peak_max <= bound,
    }
    if device.type == "cpu":
        anon_growth = final["anon"] - after_base_forward["anon"]
        result["growth_total_anon_bytes"] = anon_growth
        result["growth_per_run_slope_anon_bytes"] = (
            (final["anon"] - rows[0]["settled"]["anon"]) / (n - 1) if n > 1 else anon_growth / n
        )

    # Delete every run: their tensors must die, and their memory must come back.
    for run_id in run_ids:
        engine.delete_run(run_id)
    meter.settle()
    after_delete = meter.read()
    alive = sum(1 for r in refs if r() is not None)
    freed = final["main"] - after_delete["main"]
    result.update(
        {
            "after_delete": after_delete,
            "freed_bytes": freed,
            "freed_fraction_of_growth": freed / growth_total if growth_total else None,
            "freed_vs_theory": freed / (n * theory),
            "residual_after_delete_bytes": after_delete["main"] - base_mem,
            "run_tensors_tracked": len(refs),
            "run_tensors_alive_after_delete": alive,
        }
    )

    per_run = Table(title=f"{n} runs, rank {args.rank}, on {tag} ({device}, {dtype}); MiB")
    cols = ["run", "created", "after fb+step", "after fb+step+fb", "Δ vs previous", "theory Δ", "peak in fb"]
    for col in cols:
        per_run.add_column(col, justify="right")
    previous = base_mem
    for r in rows:
        per_run.add_row(
            str(r["run"]),
            mib(r["created"]["main"]),
            mib(r["after_fb_step"]["main"]),
            mib(r["settled"]["main"]),
            mib(r["settled"]["main"] - previous),
            mib(r["theory_bytes"]),
            mib(r["peak_during_fb"]),
        )
        previous = r["settled"]["main"]
    console.print(per_run)

    table = Table(title=f"Memory summary ({result['metric']}; MiB)")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("before loading the base", mib(before_load["main"]))
    table.add_row("after loading the base", mib(after_load["main"]))
    table.add_row("after one forward of the base (= base)", mib(base_mem))
    table.add_row("  base weights + buffers (theory)", mib(base_weight_bytes))
    if device.type == "cpu":
        table.add_row(
            "  memory-mapped .safetensors resident: after load → after forward",
            f"{mib(mapped_after_load)} → {mib(mapped_weights)}",
        )
    table.add_row("after a scratch run's training, deleted (= warm base)", mib(after_warmup["main"]))
    table.add_row(f"theory per run: {params:,} params × 16 B", mib(theory))
    table.add_row("tensor bytes the engine holds per run", mib(rows[-1]["tensor_bytes_held"]))
    table.add_row(f"after {n} runs (settled)", mib(final["main"]))
    table.add_row("growth per run: (after runs − base) / runs", mib(per_run_total))
    table.add_row("growth per run: slope, run 1 → last", mib(per_run_slope))
    if device.type == "cpu":
        table.add_row("growth per run: slope of RssAnon", mib(result["growth_per_run_slope_anon_bytes"]))
    for label, value, ok in (
        (f"bound: base + {n} × theory × {SLACK}", bound, result["bound_holds"]),
        (f"bound: warm base + {n} × theory × {SLACK}", bound_warm, result["bound_after_warmup_holds"]),
    ):
        table.add_row(label, f"{mib(value)} {'[green]holds[/]' if ok else '[red]EXCEEDED[/]'}")
    peak_note = "" if meter.peak_resettable else " (process lifetime peak)"
    table.add_row(f"peak during forward_backward{peak_note}", mib(peak_max))
    table.add_row("after deleting every run (settled)", mib(after_delete["main"]))
    table.add_row(
        "freed by deleting (vs theory of all runs)", f"{mib(freed)} ({freed / (n * theory):.0%} of theory)"
    )
    table.add_row("run tensors still alive after delete", f"{alive} of {len(refs)}")
    console.print(table)

    payload = {
        "benchmark": "memory",
        "command": "uv run python bench/memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(device),
        "config": {
            "model": tag,
            "model_dir": str(model_dir),
            "runs": n,
            "rank": args.rank,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "malloc_trim": meter._libc is not None,
        },
        "result": result,
        "per_run": rows,
    }
    name = args.name or f"memory-{tag}-{device.type}"
    path = write_results(name, payload)
    console.print(f"results: {path}")
    return 0 if result["bound_holds"] and alive == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
