"""RL utilities for EZTinker loops: sampling groups, rewards, advantages and the data RL losses take.

- `group_advantages` / `compute_advantages`: GRPO's group-relative advantages.
- `rl_datum` / `groups_to_data` (native client) and `rl_tinker_datum` / `groups_to_tinker_data`
  (official `tinker` SDK): tokens, sampler logprobs and advantages for `importance_sampling` / `ppo`.
- `native_sampler` / `tinker_sampler`: a `SampleFn` (`sample(prompt_tokens, n)`) over either client.
- `rejection_sample`: sample k per prompt, grade, keep the best as SFT data (`SupervisedExample`).

Like `eztinker.dataset`, nothing here imports torch; the loop stays in the user's code (see
`examples/grpo_gsm8k.py` and `examples/rejection_sft_gsm8k.py`).
"""

from eztinker.rl.core import (
    Completion,
    Group,
    SampleFn,
    compute_advantages,
    group_advantages,
    groups_to_data,
    groups_to_tinker_data,
    rl_datum,
    rl_tinker_datum,
)
from eztinker.rl.sampling import (
    RejectionResult,
    RewardFn,
    best_completion,
    completions_from_tinker,
    native_sampler,
    rejection_sample,
    tinker_sampler,
)

__all__ = [
    "Completion",
    "Group",
    "RejectionResult",
    "RewardFn",
    "SampleFn",
    "best_completion",
    "completions_from_tinker",
    "compute_advantages",
    "group_advantages",
    "groups_to_data",
    "groups_to_tinker_data",
    "native_sampler",
    "rejection_sample",
    "rl_datum",
    "rl_tinker_datum",
    "tinker_sampler",
]
