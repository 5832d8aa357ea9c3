"""The dataset and RL examples run end to end, for a couple of steps, on a tiny random model.

Each example's `main(argv)` runs in this process with `--local` (an in-process server) and returns its
summary. A random model never solves a word problem, so the GSM8K examples' `grade` is replaced by a
stand-in that rewards about half of the completions: that way the training path (advantages, RL
datums, forward_backward, optim_step) runs too.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _half_right(text: str, reference: str) -> bool:
    """A stand-in grader: deterministic, and right for roughly half of all texts."""
    return sum(map(ord, text)) % 2 == 0


GSM8K_ARGS = ["--train-size", "8", "--eval-size", "2", "--max-tokens", "6", "--seed", "1"]


def test_grpo_gsm8k(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = _load("grpo_gsm8k")
    monkeypatch.setattr(example, "grade", _half_right)
    out = tmp_path / "grpo.json"
    summary = example.main(
        ["--local", "--base-model", str(tiny_model_dir), "--steps", "2", "--batch-size", "2",
         "--group-size", "4", "--eval-samples", "2", "--out", str(out), *GSM8K_ARGS]
    )  # fmt: skip
    assert json.loads(out.read_text()) == summary
    assert [h["step"] for h in summary["history"]] == [1, 2]
    assert sum(h["num_datums"] for h in summary["history"]) > 0  # some group had signal and was trained on
    assert any(h["loss"] is not None for h in summary["history"])
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and summary["eval_size"] == 2
    assert 0.0 <= summary["sampled_accuracy_after"] <= 1.0


def test_grpo_gsm8k_ppo_loss(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = _load("grpo_gsm8k")
    monkeypatch.setattr(example, "grade", _half_right)
    summary = example.main(
        ["--local", "--base-model", str(tiny_model_dir), "--steps", "1", "--batch-size", "2",
         "--group-size", "4", "--loss", "ppo", *GSM8K_ARGS]
    )  # fmt: skip
    assert summary["loss"] == "ppo" and summary["history"][0]["num_datums"] > 0


def test_grpo_gsm8k_tinker_sdk(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tinker")
    monkeypatch.setenv("TINKER_API_KEY", "tml-test")
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("HOME", str(tmp_path))
    example = _load("grpo_gsm8k_tinker")
    monkeypatch.setattr(example, "grade", _half_right)
    summary = example.main(
        ["--local", "--base-model", str(tiny_model_dir), "--steps", "2", "--batch-size", "2",
         "--group-size", "4", *GSM8K_ARGS]
    )  # fmt: skip
    assert [h["step"] for h in summary["history"]] == [1, 2]
    assert sum(h["num_datums"] for h in summary["history"]) > 0
    assert summary["checkpoint"].startswith("tinker://") and summary["checkpoint"].endswith("/weights/final")


def test_rejection_sft_gsm8k(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = _load("rejection_sft_gsm8k")
    monkeypatch.setattr(example, "grade", _half_right)
    summary = example.main(
        ["--local", "--base-model", str(tiny_model_dir), "--rounds", "2", "--problems-per-round", "3",
         "--k", "3", "--epochs", "1", "--batch-size", "2", "--keep-unfinished", *GSM8K_ARGS]
    )  # fmt: skip
    assert [h["round"] for h in summary["history"]] == [1, 2]
    assert sum(h["kept"] for h in summary["history"]) > 0
    assert sum(h["sft_steps"] for h in summary["history"]) > 0


def test_grpo_gsm8k_reads_a_gsm8k_file(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--data DIR` reads train/test splits in the official format instead of generating problems."""
    from eztinker.dataset import arithmetic_problems, write_jsonl

    write_jsonl(arithmetic_problems(4, seed=1), tmp_path / "train.jsonl")
    write_jsonl(arithmetic_problems(3, seed=2), tmp_path / "test.jsonl")
    example = _load("grpo_gsm8k")
    monkeypatch.setattr(example, "grade", _half_right)
    summary = example.main(
        ["--local", "--base-model", str(tiny_model_dir), "--data", str(tmp_path), "--steps", "1",
         "--batch-size", "1", "--group-size", "2", "--eval-size", "2", "--max-tokens", "4"]
    )  # fmt: skip
    assert summary["eval_size"] == 2


def test_sft_sharegpt(tiny_model_dir: Path) -> None:
    example = _load("sft_sharegpt")
    summary = example.main(
        ["--local", "--base-model", str(tiny_model_dir), "--epochs", "2", "--batch-size", "4",
         "--learning-rate", "1e-2", "--max-tokens", "4"]
    )  # fmt: skip
    assert summary["conversations"] == 8 and summary["examples"] == 8
    assert summary["steps"] == 4 and summary["trained_tokens"] > 0
    assert summary["last_loss"] < summary["first_loss"]
    assert isinstance(summary["answer"], str)
