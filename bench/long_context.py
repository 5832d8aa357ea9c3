"""Long context: peak memory and tokens/s of one training step vs sequence length, EZTinker vs PEFT.

Sides, each measured in a **fresh subprocess per point** (so one point's allocator state, page cache and
peak cannot leak into the next):

* `ours` — `Engine.forward_backward` + `optim_step` on one run (LoRA r on every attention and MLP
  projection), native cross-entropy on a 1 × T sequence: chunked head, decoder layers checkpointed past
  `checkpoint_tokens`, causal SDPA without a mask.
* `peft` — a plain PEFT + AdamW loop on the same model and LoRA: `model(ids, labels=ids).loss.backward()`.
* `peft-gc` — the same with `gradient_checkpointing_enable(use_reentrant=False)`.
* `today` (optional, `--today-src DIR`) — `ours` run from another copy of the source tree (e.g. the
  commit before this change), for the speed comparison at short lengths.

Per point: load, one 64-token warm-up step (pages the memory-mapped weights in, starts autograd), settle
(`gc.collect()` + glibc `malloc_trim(0)`), read VmRSS, reset VmHWM (`/proc/self/clear_refs`), then
`--steps` steps of T tokens. Peak = VmHWM − settled VmRSS (CPU; on CUDA max_memory_allocated − allocated).
tokens/s = T / the median step time (the first step is dropped when there are two or more). A watchdog
stops a point whose RSS passes `--cap-gib` (a shared machine must not run out of memory); that side skips
every longer length. `ours` also reports the engine's own estimate of the pass's peak (the bound its
refusal of over-long sequences uses) next to the measurement.

Reproduce (results in BENCHMARKS.md, plot in docs/long-context.png):

    uv run python bench/long_context.py --model smollm2
    uv run python bench/long_context.py --model smollm2 --lengths 512 --sides ours,today \\
        --today-src /path/to/old/src --rounds 5 --steps 4

Results go to bench/results/long_context-<model>-<device>.json (or `--name`).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common import machine_info, pick_device, resolve_model, write_results

console = Console()
MiB = 2**20
SIDES = ("ours", "peft", "peft-gc")
TARGETS = {2048: 1.5 * 2**30, 8192: 3 * 2**30}  # issue 18: peak above settled, bytes
DEFAULT_LENGTHS = "512,1024,2048,4096,8192,16384"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="'smollm2' (default), 'tiny' or a model directory")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"sequence lengths (default {DEFAULT_LENGTHS})")
    p.add_argument("--sides", default=",".join(SIDES), help="ours, peft, peft-gc, today (comma-separated)")
    p.add_argument("--today-src", default=None, help="a src/ directory to run the 'today' side from")
    p.add_argument(
        "--context",
        type=int,
        default=0,
        help="raise the model's position limit (max_position_embeddings) to this many tokens",
    )
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=0, help="steps per point (default: 3 to 2k, 2 to 4k, then 1)")
    p.add_argument("--rounds", type=int, default=1, help="repeat every point (order of sides alternates)")
    p.add_argument("--cap-gib", type=float, default=9.0, help="stop a point whose RSS passes this (GiB)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--name", default=None, help="results file name (default long_context-<model>-<device>)")
    p.add_argument("--plot", default="docs/long-context.png", help="plot path ('' for none)")
    p.add_argument("--replot", default=None, help="only draw --plot again from this results JSON")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=512, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def steps_for(length: int, steps: int) -> int:
    if steps > 0:
        return steps
    return 3 if length <= 2048 else 2 if length <= 4096 else 1


# --- one point, in its own process ---------------------------------------------------------------------


class Meter:
    """Settled and peak memory of this process (CPU: /proc/self; CUDA: the caching allocator)."""

    def __init__(self, device) -> None:
        self.device = device
        name = ctypes.util.find_library("c") or "libc.so.6"
        try:
            self.libc = ctypes.CDLL(name)
            self.libc.malloc_trim(0)
        except (OSError, AttributeError):
            self.libc = None

    def settle(self) -> int:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        if self.libc is not None:
            self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # VmHWM := VmRSS
        return status()["VmRSS"]

    def peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return status()["VmHWM"]


def status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def watchdog(cap: int) -> None:
    """Exit at once (code 3) if this process's RSS passes `cap` bytes."""

    def watch() -> None:
        while True:
            if status()["VmRSS"] > cap:
                sys.stderr.write(f"RSS passed the cap of {cap / 2**30:.1f} GiB: stopped\n")
                sys.stderr.flush()
                os._exit(3)
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()


def worker(args: argparse.Namespace) -> dict:
    import torch

    device = pick_device(args.device)
    watchdog(int(args.cap_gib * 2**30))
    meter = Meter(device)
    gen = torch.Generator().manual_seed(0)
    if args.side in ("ours", "today"):
        step, estimate = _ours(args, device, gen)
    else:
        step, estimate = _peft(args, device, gen)
    step(64)  # warm-up
    settled = meter.settle()
    times = []
    for _ in range(steps_for(args.length, args.steps)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step(args.length)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = meter.peak()
    timed = times[1:] if len(times) > 1 else times
    return {
        "side": args.side,
        "length": args.length,
        "settled_bytes": settled,
        "peak_bytes": peak,
        "peak_above_settled_bytes": peak - settled,
        "step_seconds": times,
        "tokens_per_s": args.length / statistics.median(timed),
        "estimate_bytes": estimate,
        "torch_threads": torch.get_num_threads(),
    }


def _ours(args, device, gen):
    import torch

    from eztinker.engine import AdamParams, Datum, Engine, EngineConfig

    engine = Engine(EngineConfig(device=str(device)))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    run = engine.create_run(
        args.model_dir, {"r": args.rank, "lora_alpha": 2 * args.rank, "target_modules": targets, "seed": 0}
    ).run_id
    base = engine.base_model(args.model_dir)
    vocab = min(base.vocab_size, len(base.tokenizer))
    adam = AdamParams(learning_rate=1e-5)
    estimate = None
    try:  # the engine's own bound for this pass (absent from an older source tree)
        from eztinker.engine.memory import memory_profile

        profile = memory_profile(base)
        memory = engine.config.pass_options().memory(base)
        checkpoint = memory.should_checkpoint(profile, 1, args.length, full_logits=False)
        estimate = memory.estimate(profile, 1, args.length, backward=True, checkpoint=checkpoint)
    except ImportError:
        pass

    def step(n: int) -> None:
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        engine.forward_backward(run, [Datum.from_labels(ids)])
        engine.optim_step(run, adam)

    return step, estimate


def _peft(args, device, gen):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, attn_implementation="sdpa")
    model.to(device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, lora_dropout=0.0)
    model = get_peft_model(model, config)
    if args.side == "peft-gc":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    vocab = model.get_input_embeddings().weight.shape[0]

    def step(n: int) -> None:
        ids = torch.randint(0, vocab, (1, n), generator=gen).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, None


# --- the driver ----------------------------------------------------------------------------------------


def run_point(args, model_dir: Path, side: str, length: int) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--side",
        side,
        "--length",
        str(length),
        "--model-dir",
        str(model_dir),
        "--rank",
        str(args.rank),
        "--steps",
        str(args.steps),
        "--cap-gib",
        str(args.cap_gib),
    ]
    if args.device:
        cmd += ["--device", args.device]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if side == "today":
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.today_src).resolve()), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1].removeprefix("RESULT "))
    why = "stopped at the RSS cap" if proc.returncode == 3 else f"exit {proc.returncode}"
    if proc.returncode < 0 or proc.returncode == 137:
        why = "killed (out of memory?)"
    tail = proc.stderr.strip().splitlines()[-3:]
    return {"side": side, "length": length, "failed": why, "stderr_tail": tail}


def with_context(model_dir: Path, context: int, workdir: Path) -> Path:
    """The model with its position limit raised to `context` tokens: the weights linked, config.json edited.

    SmolLM2's config says 8,192 positions, and the engine refuses longer sequences before compute. RoPE
    itself takes any position, and a step's memory and time do not depend on what the weights have
    learned, so this measures a 16k step on the same network.
    """
    out = workdir / f"{model_dir.name}-ctx{context}"
    out.mkdir()
    for item in model_dir.iterdir():
        if item.name != "config.json":
            (out / item.name).symlink_to(item.resolve())
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = context
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        config = saved["config"]
        device_type = saved["machine"]["device"]
        plot(
            saved["summary"],
            config["sides"],
            config["lengths"],
            config["model"],
            device_type,
            Path(args.plot),
        )
        console.print(f"plot: {args.plot}")
        return 0
    device = pick_device(args.device)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    sides = [s for s in args.sides.split(",") if s]
    if "today" in sides and not args.today_src:
        raise SystemExit("--sides today needs --today-src")
    with tempfile.TemporaryDirectory() as workdir:
        model_dir, tag = resolve_model(args.model, Path(workdir))
        if args.context:
            model_dir, tag = with_context(model_dir, args.context, Path(workdir)), f"{tag}-ctx{args.context}"
        points: list[dict] = []
        failed_at: dict[str, int] = {}
        total = args.rounds * len(lengths) * len(sides)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("points", total=total)
            for r in range(args.rounds):
                for length in lengths:
                    order = sides if r % 2 == 0 else list(reversed(sides))
                    for side in order:
                        progress.update(task, description=f"round {r + 1}: {side} × {length} tokens")
                        if side in failed_at and length > failed_at[side]:
                            point = {
                                "side": side,
                                "length": length,
                                "failed": "skipped (a shorter one failed)",
                            }
                        else:
                            point = run_point(args, model_dir, side, length)
                        if "failed" in point:
                            failed_at[side] = min(failed_at.get(side, length), length)
                        point["round"] = r
                        points.append(point)
                        progress.advance(task)
    summary = summarise(points, sides, lengths)
    print_table(summary, sides, lengths, tag, device)
    payload = {
        "benchmark": "long_context",
        "command": "uv run python bench/long_context.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(device),
        "config": {
            "model": tag,
            "context": args.context or None,
            "rank": args.rank,
            "batch": 1,
            "lengths": lengths,
            "sides": sides,
            "rounds": args.rounds,
            "cap_gib": args.cap_gib,
            "today_src": args.today_src,
            "loss": "native cross_entropy (ours) / HF causal-LM loss (peft)",
        },
        "summary": summary,
        "points": points,
    }
    name = args.name or f"long_context-{tag}-{device.type}"
    path = write_results(name, payload)
    console.print(f"results: {path}")
    if args.plot:
        plot(summary, sides, lengths, tag, device.type, Path(args.plot))
        console.print(f"plot: {args.plot}")
    return 0


def summarise(points: list[dict], sides: list[str], lengths: list[int]) -> dict:
    """Per side and length: the median peak and tokens/s over rounds (None where the point failed)."""
    out: dict[str, dict[str, dict]] = {}
    for side in sides:
        out[side] = {}
        for length in lengths:
            ok = [p for p in points if p["side"] == side and p["length"] == length and "failed" not in p]
            bad = [p for p in points if p["side"] == side and p["length"] == length and "failed" in p]
            if not ok:
                out[side][str(length)] = {"failed": bad[0]["failed"] if bad else "not run"}
                continue
            entry = {
                "peak_above_settled_mib": statistics.median(p["peak_above_settled_bytes"] for p in ok) / MiB,
                "tokens_per_s": statistics.median(p["tokens_per_s"] for p in ok),
                "rounds": len(ok),
            }
            estimates = [p["estimate_bytes"] for p in ok if p.get("estimate_bytes")]
            if estimates:
                entry["engine_estimate_mib"] = statistics.median(estimates) / MiB
            target = TARGETS.get(length)
            if target is not None and side == "ours":
                entry["target_mib"] = target / MiB
                entry["meets_target"] = entry["peak_above_settled_mib"] * MiB <= target
            out[side][str(length)] = entry
    if "today" in sides and "ours" in sides:  # per-round speed ratios, ours ÷ today
        ratios = {}
        for length in lengths:
            per_round = []
            for r in {p["round"] for p in points}:
                mine = [
                    p for p in points if p["side"] == "ours" and p["length"] == length and p["round"] == r
                ]
                old = [
                    p for p in points if p["side"] == "today" and p["length"] == length and p["round"] == r
                ]
                if mine and old and "failed" not in mine[0] and "failed" not in old[0]:
                    per_round.append(mine[0]["tokens_per_s"] / old[0]["tokens_per_s"])
            if per_round:
                ratios[str(length)] = {"median": statistics.median(per_round), "per_round": per_round}
        out["ours_vs_today_tokens_per_s"] = ratios
    return out


def print_table(summary: dict, sides: list[str], lengths: list[int], tag: str, device) -> None:
    table = Table(
        title=f"one training step, 1 × T tokens, {tag} ({device}): peak above settled (MiB), tokens/s"
    )
    table.add_column("T", justify="right")
    for side in sides:
        table.add_column(f"{side} peak", justify="right")
        table.add_column(f"{side} tok/s", justify="right")
    for length in lengths:
        cells = [str(length)]
        for side in sides:
            entry = summary[side][str(length)]
            if "failed" in entry:
                cells += [entry["failed"], "–"]
            else:
                cells += [f"{entry['peak_above_settled_mib']:,.0f}", f"{entry['tokens_per_s']:,.0f}"]
        table.add_row(*cells)
    console.print(table)
    for length, ratio in summary.get("ours_vs_today_tokens_per_s", {}).items():
        console.print(
            f"ours ÷ today tokens/s at {length}: {ratio['median']:.3f} (rounds {ratio['per_round']})"
        )


def plot(summary: dict, sides: list[str], lengths: list[int], tag: str, device_type: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = {
        "ours": "EZTinker",
        "peft": "PEFT loop",
        "peft-gc": "PEFT + grad. checkpointing",
        "today": "EZTinker before",
    }
    for side in sides:
        xs, mem, speed = [], [], []
        for length in lengths:
            entry = summary[side][str(length)]
            if "failed" not in entry:
                xs.append(length)
                mem.append(entry["peak_above_settled_mib"] / 1024)
                speed.append(entry["tokens_per_s"])
        ax_mem.plot(xs, mem, marker="o", label=labels.get(side, side))
        ax_speed.plot(xs, speed, marker="o", label=labels.get(side, side))
    for length, target in TARGETS.items():
        ax_mem.scatter([length], [target / 2**30], marker="_", s=300, color="black", zorder=5)
    for ax in (ax_mem, ax_speed):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths])
        ax.set_xlabel("sequence length (tokens, batch 1)")
        ax.grid(alpha=0.3)
    ax_mem.set_ylabel("peak memory above settled (GiB)")
    ax_mem.set_title("peak memory of one training step (— target)")
    ax_speed.set_ylabel("tokens/s")
    ax_speed.set_title("training throughput")
    ax_mem.legend(loc="upper left")  # the targets sit at 2k and 8k, low on the right
    fig.suptitle(f"Long context: {tag}, LoRA r 8, {device_type}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
