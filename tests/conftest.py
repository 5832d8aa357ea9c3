"""Shared pytest fixtures: offline settings and tiny models built once per session.

The environment is set before anything imports transformers, so no test can reach the model hub: an
accidental hub id fails at once instead of hanging on the network.

The directories the session fixtures return are shared by all tests: treat them as read-only (copy one
with `shutil.copytree` into `tmp_path` first if a test must change it).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from pathlib import Path

import pytest
import torch

from eztinker.testing import TINY_FAMILIES, make_tiny_model, make_tiny_tokenizer, smollm2_dir

# Tiny models are latency-bound: one thread avoids ~3x of thread hand-off overhead on a 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 1,024-token ChatML byte-level BPE tokenizer (eos `<|im_end|>`=2, pad `<|endoftext|>`=0)."""
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A random Qwen2 model, hidden size 64, 2 layers, seed 0, with the tiny tokenizer."""
    out = tmp_path_factory.mktemp("tiny-qwen2")
    return make_tiny_model(out, "qwen2", hidden_size=64, num_layers=2, tokenizer_dir=tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> dict[str, Path]:
    """One random H=64, L=2 model directory per family: qwen2, gpt2, phi, phi3, llama."""
    return {
        family: make_tiny_model(
            tmp_path_factory.mktemp(f"tiny-{family}"), family, tokenizer_dir=tiny_tokenizer_dir
        )
        for family in TINY_FAMILIES
    }


@pytest.fixture(scope="session")
def smollm2_model_dir() -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF directory (converted once, ~25 s, then cached)."""
    return smollm2_dir()
