"""A training run: one LoRA adapter on a shared base model, its optimizer state, and its three training ops.

Ops of several runs on one base model can execute together (`forward_backward_many`, `optim_step_many`):
rows of every run go through one forward and backward pass, each row routed to its own run's adapter,
and AdamW runs with equal hyperparameters are updated by one multi-tensor step (a Dimuon run steps on
its own: `eztinker.engine.optimizers`). A lone op is the same code with one request, so "together" and
"alone" cannot drift apart.

Invariant: an op that fails leaves the run exactly as it was. `forward_backward` computes gradients
into buffers of its own and adds them to the run's accumulated gradients only once every chunk has
succeeded and every value is finite; `optim_step` snapshots weights and optimizer state first and
restores them if anything goes wrong. In a shared pass, a request that fails fails alone.

This module holds the run's state (`TrainingRun`); the ops live beside it, one module per idea:
- `run_pass`: `forward_backward` / `forward` — checking and chunking requests, packing the chunks of
  several runs into shared blocks, one forward and backward per block, committing each run's gradients;
- `run_losses`: the losses of one chunk, from hidden states in head chunks or from full logits;
- `run_step`: `optim_step` — snapshots, the shared AdamW update or a Dimuon step, restore on failure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from eztinker.engine.lora import LoRAWeights
from eztinker.engine.model import BaseModel
from eztinker.engine.optimizers import OptimizerName, optimizer_name
from eztinker.engine.run_losses import target_logprobs
from eztinker.engine.run_pass import (
    PassOptions,
    TrainRequest,
    check_request,
    forward_backward,
    forward_backward_many,
    resolve_loss,
)
from eztinker.engine.run_step import StepParams, optim_step, optim_step_many
from eztinker.models import LoRAConfig, LossFunctionConfig

__all__ = [
    "PassOptions",
    "StepParams",
    "TrainRequest",
    "TrainingRun",
    "check_request",
    "forward_backward",
    "forward_backward_many",
    "optim_step",
    "optim_step_many",
    "resolve_loss",
    "target_logprobs",
]


@dataclass
class TrainingRun:
    """A LoRA adapter being trained. Its adapter slot in the base model's layers is named `run_id`."""

    run_id: str
    base: BaseModel
    lora_config: LoRAConfig
    loss_config: LossFunctionConfig
    slots: dict[str, LoRAWeights]  # module path -> this run's A and B in that layer
    optimizer: torch.optim.Optimizer  # AdamW or Dimuon, fixed for the run's life (`optimizer_name`)
    target_modules: list[str]  # the layer names actually adapted (resolved from the config)
    step: int = 0
    created_at: float = field(default_factory=time.time)
    pending_grad_ops: int = 0  # forward_backward calls accumulated since the last optim_step
    # Counted once: a paged-out run's parameters hold no storage (`eztinker.engine.paging`).
    num_parameters: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.num_parameters = sum(p.numel() for p in self.params)

    @property
    def params(self) -> list[nn.Parameter]:
        """A then B of every adapted layer, in module-path order (the optimizer's order)."""
        return [p for path in sorted(self.slots) for p in (self.slots[path].lora_A, self.slots[path].lora_B)]

    @property
    def optimizer_name(self) -> OptimizerName:
        return optimizer_name(self.optimizer)
