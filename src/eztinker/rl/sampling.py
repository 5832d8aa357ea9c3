"""Sampling functions (`SampleFn`) over the two clients, and rejection sampling on top of them.

```python
sample = native_sampler(client, run_id, max_tokens=128, temperature=1.0)
result = rejection_sample(prompts, sample, reward_fn, k=8)      # best of 8 per prompt, if good enough
client.forward_backward(run_id, data=[ex.to_native() for ex in result.examples])
```
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eztinker.dataset.base import SupervisedExample
from eztinker.rl.core import Completion, Group, SampleFn

if TYPE_CHECKING:
    import tinker

    from eztinker.client import EZTinkerClient

__all__ = [
    "RejectionResult",
    "RewardFn",
    "best_completion",
    "completions_from_tinker",
    "native_sampler",
    "rejection_sample",
    "tinker_sampler",
]

RewardFn = Callable[[int, Completion], float]
"""`reward(prompt_index, completion) -> float`: how good completion is for prompt number `prompt_index`."""


def native_sampler(
    client: EZTinkerClient,
    run_id: str | None,
    *,
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop: str | Sequence[str] | Sequence[int] | None = None,
    seed: int | None = None,
    base_model: str | None = None,
) -> SampleFn:
    """A `SampleFn` over `EZTinkerClient.generate`: samples `run_id`'s live adapter (or `base_model`).

    With `seed`, the i-th call uses `seed + i`, so a run is reproducible but calls differ.
    """
    calls = [0]

    def sample(prompt_tokens: Sequence[int], n: int) -> list[Completion]:
        call_seed = None if seed is None else seed + calls[0]
        calls[0] += 1
        output = client.generate(
            list(prompt_tokens),
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            run_id=run_id,
            n=n,
            stop=stop,
            seed=call_seed,
            base_model=base_model,
        )
        return [
            Completion(tokens=s.tokens, logprobs=s.logprobs, text=s.text, stop_reason=s.stop_reason)
            for s in output.samples
        ]

    return sample


def tinker_sampler(
    sampling_client: tinker.SamplingClient,
    tokenizer: Any,
    *,
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop: Sequence[str] | Sequence[int] | None = None,
    seed: int | None = None,
) -> SampleFn:
    """A `SampleFn` over an official `tinker.SamplingClient`; `tokenizer` decodes the completions' text.

    `stop=None` leaves the server's default (the model's end of turn). For many prompts at once, submit
    `sampling_client.sample(...)` for each first and collect with `completions_from_tinker`.
    """
    from tinker import types

    params = types.SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=list(stop) if stop else None,
        seed=seed,
    )

    def sample(prompt_tokens: Sequence[int], n: int) -> list[Completion]:
        future = sampling_client.sample(
            types.ModelInput.from_ints(list(prompt_tokens)), num_samples=n, sampling_params=params
        )
        return completions_from_tinker(future.result(), tokenizer)

    return sample


def completions_from_tinker(response: Any, tokenizer: Any) -> list[Completion]:
    """A `tinker.types.SampleResponse`'s sequences as `Completion`s (text decoded without special tokens)."""
    completions = []
    for seq in response.sequences:
        tokens = list(seq.tokens)
        logprobs = list(seq.logprobs) if seq.logprobs is not None else [0.0] * len(tokens)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        stop_reason = "length" if str(seq.stop_reason) == "length" else "stop"
        completions.append(Completion(tokens=tokens, logprobs=logprobs, text=text, stop_reason=stop_reason))
    return completions


def best_completion(
    group: Group, *, min_reward: float | None = None, require_stop: bool = True
) -> Completion | None:
    """The highest-reward completion of `group` (ties: the shortest), or None if none qualifies.

    With `min_reward`, a completion must score at least that; with `require_stop`, completions cut off at
    the token limit are never chosen (training on them would teach the model not to finish).
    """
    best: tuple[float, int, Completion] | None = None
    for completion, reward in zip(group.completions, group.rewards, strict=True):
        if require_stop and completion.stop_reason != "stop":
            continue
        if min_reward is not None and reward < min_reward:
            continue
        key = (reward, -len(completion.tokens))
        if best is None or key > best[:2]:
            best = (*key, completion)
    return None if best is None else best[2]


@dataclass
class RejectionResult:
    """What `rejection_sample` found: the kept SFT examples and every sampled group (for statistics)."""

    examples: list[SupervisedExample]
    groups: list[Group]

    @property
    def mean_reward(self) -> float:
        """Mean reward over every sample drawn."""
        rewards = [r for g in self.groups for r in g.rewards]
        return sum(rewards) / len(rewards) if rewards else 0.0

    @property
    def pass_rate(self) -> float:
        """Fraction of prompts for which an example was kept."""
        return len(self.examples) / len(self.groups) if self.groups else 0.0


def rejection_sample(
    prompts: Sequence[Sequence[int]],
    sample: SampleFn,
    reward: RewardFn,
    *,
    k: int,
    min_reward: float | None = 1.0,
    require_stop: bool = True,
    on_group: Callable[[Group], None] | None = None,
) -> RejectionResult:
    """Sample `k` completions per prompt, score them, and keep the best of each as an SFT example.

    The kept example is the prompt (weight 0) followed by the chosen completion (weight 1): see
    `best_completion` for the choice. `on_group` is called after each prompt (a progress bar hook).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    examples, groups = [], []
    for i, prompt in enumerate(prompts):
        completions = sample(prompt, k)
        group = Group(list(prompt), completions, [float(reward(i, c)) for c in completions])
        groups.append(group)
        chosen = best_completion(group, min_reward=min_reward, require_stop=require_stop)
        if chosen is not None:
            examples.append(SupervisedExample.from_prompt_completion(prompt, chosen.tokens))
        if on_group is not None:
            on_group(group)
    return RejectionResult(examples=examples, groups=groups)
