"""The same SFT loop through the official `tinker` SDK and through `EZTinkerClient`, side by side.

Against one real `eztinker server` subprocess on 127.0.0.1 (SQLite, CPU): two LoRA runs of the same rank on
the same model, the same batch (token cross-entropy, Tinker's convention: targets shifted, weights 1) and the
same learning rate. Each loop submits step k's `forward_backward` + `optim_step`, then reads step k-1's
result (one step in flight), as the cookbook's trainers and `bench/client_vs_engine.py` do. Rounds are
interleaved (SDK, client, SDK, client, …) so machine noise hits both; the result is the ratio of median
tokens/s, SDK ÷ client (target >= 0.9).

Reproduce:

    uv run python bench/tinker_vs_client.py                  # tiny qwen2 (H=256, L=4), batch 4x64
    uv run python bench/tinker_vs_client.py --model smollm2 --batch 2 --seq-len 64 --steps 60
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client_vs_engine import batch_ids, start_server
from common import machine_info, resolve_model, summary, write_results
from eztinker import EZTinkerClient

console = Console()
LORA_ALPHA = 32  # what the Tinker facade uses for every rank


def sdk_steps(training: Any, data: list[Any], steps: int, lr: float) -> float:
    """`steps` SFT steps through the tinker SDK's TrainingClient; seconds."""
    from tinker import types

    start = time.perf_counter()
    previous = optim = None
    for _ in range(steps):
        fb = training.forward_backward(data, "cross_entropy")
        optim = training.optim_step(types.AdamParams(learning_rate=lr))
        if previous is not None:
            previous.result()
        previous = fb
    assert optim is not None
    optim.result()
    return time.perf_counter() - start


def client_steps(client: EZTinkerClient, run_id: str, data: list[dict], steps: int, lr: float) -> float:
    """The same steps through `EZTinkerClient`, with the same token data and loss; seconds."""
    start = time.perf_counter()
    previous = optim = None
    for _ in range(steps):
        fb = client.forward_backward(run_id, data=data, loss_fn="cross_entropy")
        optim = client.optim_step(run_id, learning_rate=lr)
        if previous is not None:
            previous.result()
        previous = fb
    assert optim is not None
    optim.result()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 | a model directory")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100, help="SFT steps per side")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds the steps are split into")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="eztinker-bench-"))
    os.environ.update(TINKER_API_KEY="tml-bench", TINKER_TELEMETRY="0", HOME=str(workdir))
    import tinker
    from tinker import types

    model_dir, tag = resolve_model(args.model, workdir)
    server, url = start_server(model_dir, workdir / "server")
    lr = 1e-4
    try:
        service = tinker.ServiceClient(base_url=url)
        service.get_server_capabilities()
        training = service.create_lora_training_client(
            base_model=str(model_dir), rank=args.rank, seed=0, train_unembed=False
        ).result()
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        ids = batch_ids(args.batch, args.seq_len, vocab)
        sdk_data = [
            types.Datum(
                model_input=types.ModelInput.from_ints(x[:-1]),
                loss_fn_inputs={"target_tokens": x[1:], "weights": [1.0] * (len(x) - 1)},
            )
            for x in ids
        ]
        client_data = [
            {"tokens": x[:-1], "loss_inputs": {"target_tokens": x[1:], "weights": [1.0] * (len(x) - 1)}}
            for x in ids
        ]
        lora = {"r": args.rank, "lora_alpha": LORA_ALPHA, "seed": 0}
        with EZTinkerClient(base_url=url) as client, Progress(console=console) as progress:
            run_id = client.create_run(str(model_dir), lora_config=lora)
            sdk_steps(training, sdk_data, 3, lr)  # warm-up both sides
            client_steps(client, run_id, client_data, 3, lr)
            per_round = args.steps // args.rounds
            task = progress.add_task("SFT rounds (tinker SDK, EZTinkerClient)", total=args.rounds)
            sdk_times, client_times = [], []
            for _ in range(args.rounds):
                sdk_times.append(sdk_steps(training, sdk_data, per_round, lr))
                client_times.append(client_steps(client, run_id, client_data, per_round, lr))
                progress.advance(task)
        service.close("success").result()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)

    tokens = args.batch * (args.seq_len - 1) * per_round
    sdk_tps = [tokens / t for t in sdk_times]
    client_tps = [tokens / t for t in client_times]
    ratios = [s / c for s, c in zip(sdk_tps, client_tps, strict=True)]
    ratio = summary(sdk_tps)["median"] / summary(client_tps)["median"]
    command = "uv run python bench/tinker_vs_client.py " + " ".join(sys.argv[1:])
    payload = {
        "benchmark": "tinker_vs_client",
        "command": command.strip(),
        "machine": machine_info(torch.device("cpu")),
        "sdk_version": tinker.__version__,
        "config": {"model": tag, "batch": args.batch, "seq_len": args.seq_len, "steps": per_round * args.rounds,
                   "rounds": args.rounds, "rank": args.rank, "lora_alpha": LORA_ALPHA, "learning_rate": lr},
        "sft": {"sdk_tokens_per_s": summary(sdk_tps), "client_tokens_per_s": summary(client_tps),
                "ratio_of_medians": ratio, "per_round_ratios": ratios, "target_ratio": 0.9,
                "meets_target": ratio >= 0.9},
    }  # fmt: skip
    path = write_results(f"tinker_vs_client-{tag}-cpu", payload)

    table = Table("measurement", "value")
    table.add_row("tinker SDK tokens/s (median)", f"{summary(sdk_tps)['median']:.0f}")
    table.add_row("EZTinkerClient tokens/s (median)", f"{summary(client_tps)['median']:.0f}")
    table.add_row("SDK / client", f"{ratio:.3f}  (rounds: {', '.join(f'{r:.3f}' for r in ratios)})")
    console.print(table)
    console.print(f"results: {path}")


if __name__ == "__main__":
    main()
