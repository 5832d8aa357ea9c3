"""Catalogue families: the engine's `forward_backward` vs a PEFT reference loop, side by side, per family;
and MoE adapter memory per run against the count of LoRA parameters.

For each family (`eztinker.testing.TINY_CATALOGUE_FAMILIES`: qwen3_moe, qwen3_5, qwen3_5_moe, gpt_oss,
deepseek_v3, qwen3_vl — tiny random models built offline) one run with the family's default targets
(attention, linear attention, MLP, experts) is created, given a random B, and saved; PEFT loads the saved
adapter trainable (`PeftModel.from_pretrained(..., is_trainable=True)`: the same LoRA, through
`target_parameters` for the fused experts). One step is:

* engine:   `Engine.forward_backward(run_id, data, "cross_entropy")` (Tinker's token loss, summed)
* baseline: `logits = peft_model(input_ids, attention_mask).logits`; Σ −log p(targets); `.backward()`;
            gradients zeroed

Measurement: warm-up steps, then `--steps` rounds, each timing one step of each side in alternating order
(noise on a shared machine hits both alike). Reported per family: median tokens/s of each side, the ratio of
medians (engine ÷ PEFT; target ≥ 0.95), the median of per-round ratios, the ratio of the fastest steps, and
that both sides compute the same loss.

Memory: the bytes the run's adapter holds (its A and B, fp32), against theory — Σ over adapted linear layers
of r·(in + out) and over fused expert weights of E·r·(in + out), × 4 bytes — computed from the model's
weight shapes alone; and the expert weights' share of it.

Reproduce (results in BENCHMARKS.md):

    uv run python bench/families.py --steps 15
    uv run python bench/families.py --families qwen3_moe gpt_oss --hidden 256 --layers 4 --batch 8 --seq-len 128

Results go to bench/results/families-<device>.json (or `--name`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from common import machine_info, pick_device, summary, sync, write_results

console = Console()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from eztinker.testing import TINY_CATALOGUE_FAMILIES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=list(TINY_CATALOGUE_FAMILIES))
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the tiny models (default 128)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=15, help="measured rounds (default 15)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: tiny models are latency-bound)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="results file name (default families-<device>)")
    return p.parse_args(argv)


def theory_bytes(base, slots: dict, rank: int) -> tuple[int, int]:
    """(all, experts) adapter bytes from weight shapes: r·(in+out) per linear layer, E·r·(in+out) per expert
    weight, fp32."""
    from eztinker.engine.families import expert_weight_names
    from eztinker.engine.lora import ExpertWeight

    total = experts = 0
    for path, layer in base.lora_layers.items():
        if path not in slots:
            continue
        if isinstance(layer, ExpertWeight):
            module = layer.owner.base_layer
            assert layer.name in expert_weight_names(module)
            e, first, second = getattr(module, layer.name).shape
            n = e * rank * (first + second)
            experts += n
        else:
            weight = layer.base_layer.weight
            n = rank * (weight.shape[0] + weight.shape[1])
        total += n
    return 4 * total, 4 * experts


def bench_family(family: str, args: argparse.Namespace, device: torch.device, workdir: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from eztinker.engine import Datum, Engine, EngineConfig
    from eztinker.testing import make_tiny_model

    model_dir = make_tiny_model(workdir / family, family, hidden_size=args.hidden, num_layers=args.layers)
    engine = Engine(EngineConfig(device=str(device), dtype=torch.float32))
    info = engine.create_run(str(model_dir), {"r": args.rank, "lora_alpha": 2 * args.rank, "seed": args.seed})
    run = engine._run(info.run_id)
    generator = torch.Generator().manual_seed(args.seed)
    for path in sorted(run.slots):
        run.slots[path].lora_B.data.normal_(0, 0.02, generator=generator)
    engine.save_weights(info.run_id, workdir / f"{family}-adapter")
    base = engine.base_model(str(model_dir))
    auto = AutoModelForImageTextToText if family == "qwen3_vl" else AutoModelForCausalLM
    attn = "eager" if family == "gpt_oss" else "sdpa"
    hf = auto.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).to(device).eval()
    peft_model = PeftModel.from_pretrained(hf, str(workdir / f"{family}-adapter"), is_trainable=True)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]

    vocab = min(base.vocab_size, len(base.tokenizer))
    rows = torch.randint(3, vocab, (args.batch, args.seq_len + 1), generator=generator)
    data = [Datum.from_targets(r[:-1].tolist(), r[1:].tolist()) for r in rows]
    input_ids = rows[:, :-1].to(device)
    targets = rows[:, 1:].to(device)
    mask = torch.ones_like(input_ids)
    tokens = args.batch * args.seq_len

    def engine_step() -> float:
        sync(device)
        t0 = time.perf_counter()
        result = engine.forward_backward(info.run_id, data, "cross_entropy")
        sync(device)
        elapsed = time.perf_counter() - t0
        for p in run.params:
            p.grad = None
        engine._run(info.run_id).pending_grad_ops = 0
        losses["engine"].append(result.loss)
        return elapsed

    def peft_step() -> float:
        sync(device)
        t0 = time.perf_counter()
        logits = peft_model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), reduction="sum"
        )
        loss.backward()
        sync(device)
        elapsed = time.perf_counter() - t0
        for p in trainable:
            p.grad = None
        losses["peft"].append(float(loss.detach()))
        return elapsed

    losses: dict[str, list[float]] = {"engine": [], "peft": []}
    for _ in range(args.warmup):
        engine_step()
        peft_step()
    times: dict[str, list[float]] = {"engine": [], "peft": []}
    for i in range(args.steps):
        order = (("engine", engine_step), ("peft", peft_step))
        for name, step in order if i % 2 == 0 else order[::-1]:
            times[name].append(step())
    ratios = [p / e for e, p in zip(times["engine"], times["peft"], strict=True)]
    adapter_bytes = sum(p.numel() * p.element_size() for p in run.params)
    peft_bytes = sum(p.numel() * p.element_size() for p in trainable)
    theory, experts = theory_bytes(base, run.slots, args.rank)
    return {
        "family": family,
        "model_type": base.family,
        "tokens_per_step": tokens,
        "engine": {
            "tokens_per_s": tokens / statistics.median(times["engine"]),
            "step_s": summary(times["engine"]),
        },
        "peft": {"tokens_per_s": tokens / statistics.median(times["peft"]), "step_s": summary(times["peft"])},
        "ratio_of_medians": statistics.median(times["peft"]) / statistics.median(times["engine"]),
        "median_round_ratio": statistics.median(ratios),
        "ratio_of_fastest": min(times["peft"]) / min(times["engine"]),
        "loss_engine": losses["engine"][0],
        "loss_peft": losses["peft"][0],
        "loss_rel_diff": abs(losses["engine"][0] - losses["peft"][0]) / abs(losses["peft"][0]),
        "adapter": {
            "bytes": adapter_bytes,
            "peft_bytes": peft_bytes,
            "theory_bytes": theory,
            "expert_bytes_theory": experts,
            "parameters": info.num_parameters,
            "layers": len(run.slots),
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            console.print(f"[bold]{family}[/] …")
            results.append(bench_family(family, args, device, Path(tmp)))
    table = Table(
        title=f"forward_backward, engine vs PEFT ({device}, fp32, {args.batch}×{args.seq_len}, r={args.rank})"
    )
    for col in (
        "family",
        "engine tok/s",
        "PEFT tok/s",
        "ratio",
        "round ratio",
        "adapter KiB",
        "theory KiB",
        "experts",
    ):
        table.add_column(col)
    for r in results:
        a = r["adapter"]
        table.add_row(
            r["family"],
            f"{r['engine']['tokens_per_s']:.0f}",
            f"{r['peft']['tokens_per_s']:.0f}",
            f"{r['ratio_of_medians']:.2f}",
            f"{r['median_round_ratio']:.2f}",
            f"{a['bytes'] / 1024:.1f}",
            f"{a['theory_bytes'] / 1024:.1f}",
            f"{a['expert_bytes_theory'] / max(a['theory_bytes'], 1):.0%}",
        )
    console.print(table)
    payload = {
        "benchmark": "families",
        "command": "uv run python bench/families.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": vars(args),
        "machine": machine_info(device),
        "results": results,
    }
    path = write_results(args.name or f"families-{device.type}", payload)
    console.print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
