"""tinker-cookbook 0.6.1's RL (math_rl's arithmetic environment) and DPO trainers, offline, against EZTinker.

The math_rl CLI imports its math-grading extras (sympy, math-verify) at load time, and the DPO CLI only knows
hub datasets, so each runs through a short driver that builds the same `Config` the recipe builds and calls
the cookbook's own trainer (`tinker_cookbook.rl.train.main`, `tinker_cookbook.preference.train_dpo.main`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import eztinker

pytest.importorskip("tinker")
pytest.importorskip("tinker_cookbook")

RL_DRIVER = r'''
"""math_rl's arithmetic environment through tinker_cookbook.rl.train, as recipes/math_rl/train.py builds it."""
import asyncio
import sys

from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticDatasetBuilder
from tinker_cookbook.rl.train import Config, main

model, log_path, loss_fn = sys.argv[1], sys.argv[2], sys.argv[3]
config = Config(
    learning_rate=1e-3,
    dataset_builder=ArithmeticDatasetBuilder(
        batch_size=2, model_name_for_tokenizer=model, renderer_name="role_colon", n_batches=2, group_size=2
    ),
    model_name=model,
    recipe_name="recipe_math_rl",
    renderer_name="role_colon",
    lora_rank=4,
    max_tokens=8,
    log_path=log_path,
    eval_every=0,
    save_every=0,
    loss_fn=loss_fn,
    max_steps=2,
)
asyncio.run(main(config))
'''

DPO_DRIVER = r'''
"""DPO on local preference pairs through tinker_cookbook.preference.train_dpo (its CLI only knows hub datasets)."""
import json
import sys
from pathlib import Path

from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
from tinker_cookbook.preference.train_dpo import Config, main
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

model, log_path = sys.argv[1], sys.argv[2]
pairs = Path(log_path).parent / "pairs.jsonl"
questions = [
    ("What is 2 + 3?", "5", "7"),
    ("Capital of France?", "Paris", "Rome"),
    ("Color of the sky?", "Blue", "Green"),
    ("What is 4 * 2?", "8", "6"),
]
with pairs.open("w") as f:
    for question, good, bad in questions:
        comparison = {
            "prompt_conversation": [{"role": "user", "content": question}],
            "completion_A": [{"role": "assistant", "content": good}],
            "completion_B": [{"role": "assistant", "content": bad}],
        }
        f.write(json.dumps({"comparison": comparison, "label": "A"}) + "\n")
config = Config(
    log_path=log_path,
    model_name=model,
    recipe_name="recipe_dpo",
    renderer_name="role_colon",
    dataset_builder=DPODatasetBuilderFromComparisons(
        comparison_builder=ComparisonBuilderFromJsonl(train_path=str(pairs)),
        common_config=ChatDatasetBuilderCommonConfig(
            model_name_for_tokenizer=model, renderer_name="role_colon", max_length=128, batch_size=2
        ),
    ),
    learning_rate=1e-3,
    lora_rank=4,
    num_epochs=1,
    save_every=0,
    eval_every=0,
    infrequent_eval_every=0,
)
main(config)
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir) -> str:
    with eztinker.serve(data_dir=tmp_path_factory.mktemp("cookbook"), models=[str(tiny_model_dir)]) as url:
        yield url


def _run(driver: str, args: list[str], server: str, tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(driver)
    env = {
        **os.environ,
        "TINKER_BASE_URL": server,
        "TINKER_API_KEY": "tml-local",
        "TINKER_TELEMETRY": "0",
        "HOME": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _metrics(log: Path) -> list[dict]:
    return [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines()]


def _final_run(server: str, log: Path) -> str:
    saved = json.loads((log / "checkpoints.jsonl").read_text().splitlines()[-1])
    run_id = saved["state_path"].removeprefix("tinker://").split("/")[0]
    with eztinker.EZTinkerClient(base_url=server) as native:
        assert {"final", "sampler_weights.final"} <= {c.name for c in native.get_checkpoints(run_id)}
    return run_id


@pytest.mark.parametrize("loss_fn", ["stable_reinforce", "importance_sampling"])
def test_cookbook_math_rl_arithmetic(server, tiny_model_dir, tmp_path, loss_fn) -> None:
    """Two RL steps: rollouts with the role_colon stop string, rewards, advantages, the loss, checkpoints."""
    log = tmp_path / "log"
    _run(RL_DRIVER, [str(tiny_model_dir), str(log), loss_fn], server, tmp_path)
    steps = [m for m in _metrics(log) if "env/all/reward/total" in m]
    assert len(steps) == 2
    assert all(math.isfinite(m["env/all/reward/total"]) for m in steps)
    run_id = _final_run(server, log)
    with eztinker.EZTinkerClient(base_url=server) as native:
        assert native.get_run(run_id).step == 2


def test_cookbook_dpo_on_local_pairs(server, tiny_model_dir, tmp_path) -> None:
    """DPO (forward_backward_custom against a reference sampler's compute_logprobs) for one epoch of 2 steps."""
    log = tmp_path / "log"
    _run(DPO_DRIVER, [str(tiny_model_dir), str(log)], server, tmp_path)
    steps = _metrics(log)
    assert len(steps) == 2
    # The reference is the policy before training: the first step's loss is exactly log 2.
    assert steps[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert all(math.isfinite(s["dpo_loss"]) for s in steps)
    _final_run(server, log)
