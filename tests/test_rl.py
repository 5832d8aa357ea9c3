"""eztinker.rl: advantages, RL datums, rejection sampling, and both against a live server on a tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import eztinker
from eztinker import EZTinkerClient
from eztinker.rl import (
    Completion,
    Group,
    best_completion,
    compute_advantages,
    group_advantages,
    groups_to_data,
    groups_to_tinker_data,
    native_sampler,
    rejection_sample,
    rl_datum,
)


def _completion(tokens: list[int], stop_reason: str = "stop") -> Completion:
    return Completion(
        tokens=tokens, logprobs=[-0.5] * len(tokens), text=" ".join(map(str, tokens)), stop_reason=stop_reason
    )  # type: ignore[arg-type]


# --- advantages ------------------------------------------------------------------------------------------


def test_group_advantages_are_centred_and_scaled() -> None:
    advantages = group_advantages([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    assert sum(advantages) == pytest.approx(0.0, abs=1e-9)
    assert math.sqrt(sum(a * a for a in advantages) / len(advantages)) == pytest.approx(1.0, abs=1e-5)
    assert advantages[0] > 0 > advantages[1]
    assert group_advantages([1.0, 0.0, 0.0, 0.0], normalize_std=False) == [0.75, -0.25, -0.25, -0.25]


def test_equal_rewards_give_zero_advantages() -> None:
    assert group_advantages([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]
    assert group_advantages([0.3]) == [0.0]
    assert group_advantages([]) == []
    with pytest.raises(ValueError, match="finite"):
        group_advantages([1.0, float("nan")])


# --- data for importance_sampling / ppo ------------------------------------------------------------------


def test_rl_datum_shifts_and_masks_the_prompt() -> None:
    datum = rl_datum([10, 11, 12], [20, 21], [-0.1, -0.2], 0.5)
    assert datum == {
        "tokens": [10, 11, 12, 20],
        "loss_inputs": {
            "target_tokens": [11, 12, 20, 21],
            "logprobs": [0.0, 0.0, -0.1, -0.2],
            "advantages": [0.0, 0.0, 0.5, 0.5],
        },
    }
    with pytest.raises(ValueError, match="logprobs"):
        rl_datum([1, 2], [3, 4], [-0.1], 1.0)
    with pytest.raises(ValueError, match="completion"):
        rl_datum([1, 2], [], [], 1.0)


def test_groups_to_data_skips_groups_without_signal() -> None:
    groups = [
        Group([1, 2], [_completion([3]), _completion([4, 5])], [1.0, 0.0]),
        Group([6, 7], [_completion([8]), _completion([9])], [1.0, 1.0]),  # no signal: skipped
    ]
    with pytest.raises(ValueError, match="compute_advantages"):
        groups_to_data(groups)
    compute_advantages(groups)
    assert [g.has_signal for g in groups] == [True, False]
    data = groups_to_data(groups)
    assert [d["loss_inputs"]["target_tokens"] for d in data] == [[2, 3], [2, 4, 5]]
    assert data[0]["loss_inputs"]["advantages"][-1] == pytest.approx(1.0, abs=1e-5)
    tinker_data = groups_to_tinker_data(groups)
    assert [d.model_input.to_ints() for d in tinker_data] == [[1, 2], [1, 2, 4]]


# --- rejection sampling ----------------------------------------------------------------------------------


def test_best_completion_prefers_reward_then_shortness_and_finished() -> None:
    group = Group(
        [1],
        [_completion([1, 2, 3]), _completion([4, 5]), _completion([6], "length"), _completion([7, 8, 9, 9])],
        [1.0, 1.0, 1.0, 0.0],
    )
    assert best_completion(group) is not None and best_completion(group).tokens == [4, 5]  # type: ignore[union-attr]
    assert best_completion(group, require_stop=False).tokens == [6]  # type: ignore[union-attr]
    assert best_completion(Group([1], [_completion([2])], [0.0]), min_reward=1.0) is None


def test_rejection_sample_keeps_the_best_per_prompt() -> None:
    def sample(prompt, n):
        return [_completion([prompt[0] + i]) for i in range(n)]

    seen = []
    result = rejection_sample(
        [[10], [20], [30]],
        sample,
        lambda i, c: 1.0 if (i != 1 and c.tokens[0] % 2 == 1) else 0.0,
        k=4,
        on_group=seen.append,
    )
    assert len(seen) == 3 and len(result.groups) == 3
    assert [ex.tokens for ex in result.examples] == [[10, 11], [30, 31]]  # prompt 1 never scored
    assert [ex.weights for ex in result.examples] == [[0.0, 1.0]] * 2
    assert result.pass_rate == pytest.approx(2 / 3)
    assert result.mean_reward == pytest.approx(4 / 12)
    with pytest.raises(ValueError, match="k must be"):
        rejection_sample([[1]], sample, lambda i, c: 0.0, k=0)


# --- against a live server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    with (
        eztinker.serve(data_dir=tmp_path_factory.mktemp("rl-server")) as url,
        EZTinkerClient(base_url=url) as client,
    ):
        run_id = client.create_run(str(tiny_model_dir), lora_config={"r": 4, "seed": 0})
        yield client, run_id


def test_native_sampler_and_importance_sampling_start_at_ratio_one(live) -> None:
    """Sampler logprobs equal training logprobs: with advantage 1 the summed loss is -(completion tokens)."""
    client, run_id = live
    sample = native_sampler(client, run_id, max_tokens=5, temperature=1.0, stop=[], seed=3)
    prompt = [5, 17, 42, 99]
    completions = sample(prompt, 3)
    assert len(completions) == 3
    assert all(len(c.tokens) == 5 == len(c.logprobs) and c.stop_reason == "length" for c in completions)
    assert sample(prompt, 3) != completions  # the seed moves on from call to call

    data = [rl_datum(prompt, c.tokens, c.logprobs, 1.0) for c in completions]
    out = client.forward(run_id, data=data, loss_fn="importance_sampling").result()
    assert out["loss"] == pytest.approx(-15.0, abs=1e-3)
    for c, lp in zip(completions, out["logprobs"], strict=True):
        assert lp[len(prompt) - 1 :] == pytest.approx(c.logprobs, abs=1e-4)


def test_grpo_step_moves_probability_towards_rewarded_samples(live) -> None:
    """One PPO step with advantage +1 on one completion and -1 on another raises the first's logprob."""
    client, run_id = live
    prompt = [7, 8, 9]
    group = Group(
        prompt, native_sampler(client, run_id, max_tokens=4, stop=[], seed=11)(prompt, 2), [1.0, 0.0]
    )
    compute_advantages([group])
    data = groups_to_data([group])
    before = client.forward(run_id, data=data, loss_fn="ppo").result()["logprobs"]
    client.forward_backward(run_id, data=data, loss_fn="ppo")
    client.optim_step(run_id, learning_rate=5e-2).result()
    after = client.forward(run_id, data=data, loss_fn="ppo").result()["logprobs"]
    n = len(prompt) - 1
    gain = [sum(a[n:]) - sum(b[n:]) for a, b in zip(after, before, strict=True)]
    assert gain[0] > 0 > gain[1]


def test_rejection_sft_examples_train_on_the_native_loss(live) -> None:
    client, run_id = live
    sample = native_sampler(client, run_id, max_tokens=3, stop=[], seed=5)
    result = rejection_sample([[3, 4, 5]], sample, lambda i, c: 1.0, k=2, require_stop=False)
    [example] = result.examples
    out = client.forward_backward(run_id, data=[example.to_native()]).result()
    assert math.isfinite(out["loss"]) and out["loss"] > 0
    client.optim_step(run_id, learning_rate=1e-3).result()
