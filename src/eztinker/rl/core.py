"""Samples, rewards and advantages, and the training data that RL losses take.

Notation (Tinker's): a prompt of P tokens is sampled G times (a *group*); completion g has T_g tokens,
the sampler's log-probability of each, and a scalar reward. GRPO's advantage of completion g is its
reward minus the group's mean (optionally over the group's standard deviation), so a group whose
completions all score the same teaches nothing and is skipped.

The data for `importance_sampling` and `ppo` is one datum per completion, the prompt and completion
concatenated and shifted by one (`target_tokens[i]` is predicted at position i):

    tokens         = (prompt + completion)[:-1]                      # P + T - 1 inputs
    target_tokens  = (prompt + completion)[1:]
    logprobs       = [0] * (P - 1) + sampler logprobs                # q, the sampling policy
    advantages     = [0] * (P - 1) + [A] * T                         # 0 on the prompt: no gradient there

The losses are token-level **sums** (Tinker's convention): the gradient of one step grows with the
number of completion tokens in it, which the learning rate has to allow for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import tinker

__all__ = [
    "Completion",
    "Group",
    "SampleFn",
    "compute_advantages",
    "group_advantages",
    "groups_to_data",
    "groups_to_tinker_data",
    "rl_datum",
    "rl_tinker_datum",
]


@dataclass(frozen=True)
class Completion:
    """One sampled continuation: its tokens (the stop token included when it stopped on one), the
    sampler's log-probability of each token, its decoded text and why it ended."""

    tokens: list[int]
    logprobs: list[float]
    text: str
    stop_reason: Literal["stop", "length"] = "stop"

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.logprobs):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.logprobs)} logprobs")


SampleFn = Callable[[Sequence[int], int], list[Completion]]
"""`sample(prompt_tokens, n) -> n completions`: see `eztinker.rl.native_sampler` / `tinker_sampler`."""


@dataclass
class Group:
    """A prompt, the completions sampled for it, their rewards, and (once computed) their advantages."""

    prompt_tokens: list[int]
    completions: list[Completion]
    rewards: list[float]
    advantages: list[float] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.completions) != len(self.rewards):
            raise ValueError(f"{len(self.completions)} completions but {len(self.rewards)} rewards")

    @property
    def mean_reward(self) -> float:
        return sum(self.rewards) / len(self.rewards) if self.rewards else 0.0

    @property
    def has_signal(self) -> bool:
        """Whether the rewards differ, so group-relative advantages are not all zero."""
        return len(set(self.rewards)) > 1


def group_advantages(
    rewards: Sequence[float], *, normalize_std: bool = True, eps: float = 1e-6
) -> list[float]:
    """GRPO's group-relative advantages: `r_g - mean(r)`, divided by `std(r) + eps` if `normalize_std`.

    All-equal rewards give all-zero advantages (there is nothing to prefer). The standard deviation is
    the population one (over the G completions), as in the GRPO paper; `normalize_std=False` is
    Dr. GRPO's unbiased variant.
    """
    if not rewards:
        return []
    if any(math.isnan(r) or math.isinf(r) for r in rewards):
        raise ValueError(f"rewards must be finite: {list(rewards)}")
    mean = sum(rewards) / len(rewards)
    centred = [r - mean for r in rewards]
    if not normalize_std:
        return centred
    std = math.sqrt(sum(c * c for c in centred) / len(centred))
    if std == 0:
        return [0.0] * len(rewards)
    return [c / (std + eps) for c in centred]


def _rl_inputs(
    prompt_tokens: Sequence[int],
    completion_tokens: Sequence[int],
    logprobs: Sequence[float],
    advantage: float,
) -> tuple[list[int], dict[str, list[Any]]]:
    if len(prompt_tokens) < 1:
        raise ValueError("the prompt needs at least one token")
    if len(completion_tokens) < 1:
        raise ValueError("the completion needs at least one token")
    if len(logprobs) != len(completion_tokens):
        raise ValueError(f"{len(completion_tokens)} completion tokens but {len(logprobs)} logprobs")
    full = [*prompt_tokens, *completion_tokens]
    n_prompt = len(prompt_tokens) - 1  # targets inside the prompt: not trained on
    return full[:-1], {
        "target_tokens": full[1:],
        "logprobs": [0.0] * n_prompt + [float(x) for x in logprobs],
        "advantages": [0.0] * n_prompt + [float(advantage)] * len(completion_tokens),
    }


def rl_datum(
    prompt_tokens: Sequence[int],
    completion_tokens: Sequence[int],
    logprobs: Sequence[float],
    advantage: float,
) -> dict[str, Any]:
    """A token datum for `loss_fn="importance_sampling"` / `"ppo"` (and cispo, dro, ...): see the module
    docstring. Pass a list of them as `EZTinkerClient.forward_backward(run_id, data=..., loss_fn=...)`."""
    tokens, loss_inputs = _rl_inputs(prompt_tokens, completion_tokens, logprobs, advantage)
    return {"tokens": tokens, "loss_inputs": loss_inputs}


def rl_tinker_datum(
    prompt_tokens: Sequence[int],
    completion_tokens: Sequence[int],
    logprobs: Sequence[float],
    advantage: float,
) -> tinker.types.Datum:
    """`rl_datum` as an official `tinker.types.Datum` (needs the `tinker` package)."""
    from tinker import types

    tokens, loss_inputs = _rl_inputs(prompt_tokens, completion_tokens, logprobs, advantage)
    n = len(tokens)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={
            name: types.TensorData(
                data=values, dtype="int64" if name == "target_tokens" else "float32", shape=[n]
            )
            for name, values in loss_inputs.items()
        },
    )


def compute_advantages(groups: Sequence[Group], *, normalize_std: bool = True) -> None:
    """Fill in each group's `advantages` with `group_advantages` of its rewards."""
    for group in groups:
        group.advantages = group_advantages(group.rewards, normalize_std=normalize_std)


def _datum_args(groups: Sequence[Group]) -> list[tuple[list[int], Completion, float]]:
    args = []
    for i, group in enumerate(groups):
        if len(group.advantages) != len(group.completions):
            raise ValueError(f"groups[{i}] has no advantages yet: call compute_advantages first")
        for completion, advantage in zip(group.completions, group.advantages, strict=True):
            if advantage != 0 and completion.tokens:
                args.append((group.prompt_tokens, completion, advantage))
    return args


def groups_to_data(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """`rl_datum` for every completion with a non-zero advantage (zero ones carry no gradient)."""
    return [rl_datum(p, c.tokens, c.logprobs, a) for p, c, a in _datum_args(groups)]


def groups_to_tinker_data(groups: Sequence[Group]) -> list[tinker.types.Datum]:
    """`groups_to_data` as official `tinker.types.Datum`s."""
    return [rl_tinker_datum(p, c.tokens, c.logprobs, a) for p, c, a in _datum_args(groups)]
