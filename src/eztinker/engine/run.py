"""A training run: one LoRA adapter on a shared base model, its AdamW state, and its three training ops.

Invariant: an op that fails leaves the run exactly as it was. `forward_backward` computes gradients
into buffers of its own and adds them to the run's accumulated gradients only once every chunk has
succeeded and every value is finite; `optim_step` snapshots weights and optimizer state first and
restores them if anything goes wrong.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from eztinker.engine.batch import Chunk, budget_for, check_data, chunk_batch
from eztinker.engine.errors import ComputeError, EngineError, InvalidInputError, NonFiniteError
from eztinker.engine.lora import LoRAWeights, Segment, routed
from eztinker.engine.losses import LossSpec, get_loss_spec, shifted_target_logprobs
from eztinker.engine.model import BaseModel
from eztinker.engine.types import AdamParams, Datum, ForwardBackwardResult, OptimStepResult, TokenLoss
from eztinker.models import LoRAConfig, LossFunctionConfig


@dataclass
class TrainingRun:
    """A LoRA adapter being trained. Its adapter slot in the base model's layers is named `run_id`."""

    run_id: str
    base: BaseModel
    lora_config: LoRAConfig
    loss_config: LossFunctionConfig
    slots: dict[str, LoRAWeights]  # module path -> this run's A and B in that layer
    optimizer: torch.optim.AdamW
    target_modules: list[str]  # the layer names actually adapted (resolved from the config)
    step: int = 0
    created_at: float = field(default_factory=time.time)
    pending_grad_ops: int = 0  # forward_backward calls accumulated since the last optim_step

    @property
    def params(self) -> list[nn.Parameter]:
        """A then B of every adapted layer, in module-path order (the optimizer's order)."""
        return [p for path in sorted(self.slots) for p in (self.slots[path].lora_A, self.slots[path].lora_B)]

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.params)


def make_optimizer(params: Sequence[nn.Parameter]) -> torch.optim.AdamW:
    """AdamW over the adapter; its hyperparameters are set afresh at every step."""
    return torch.optim.AdamW(list(params), lr=0.0, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)


# --- forward and backward ----------------------------------------------------------------------------


def resolve_loss(
    run: TrainingRun, loss: LossFunctionConfig | TokenLoss | str | None
) -> tuple[LossSpec, dict]:
    """The loss spec and its keyword arguments: the run's default, a native config, or a token loss."""
    if loss is None:
        loss = run.loss_config
    if isinstance(loss, str):
        loss = TokenLoss(loss)
    if isinstance(loss, TokenLoss):
        spec = get_loss_spec(loss.name, "token")
        return spec, spec.resolve_config(loss.config)
    return get_loss_spec(loss.loss_type, "native"), loss.params


def forward_backward(
    run: TrainingRun,
    data: Sequence[Datum],
    loss: LossFunctionConfig | TokenLoss | str | None = None,
    *,
    token_budget: int,
    logits_budget: int,
    backward: bool = True,
) -> ForwardBackwardResult:
    """Run `data` through the run's adapter; with `backward`, add the loss's gradients to the run's."""
    base = run.base
    spec, kwargs = resolve_loss(run, loss)
    checked = check_data(data, spec, vocab_size=base.vocab_size, max_length=base.max_length)
    chunks = chunk_batch(checked, budget_for(base.vocab_size, token_budget, logits_budget))
    params = run.params
    if spec.family == "native":
        normalizer = spec.normalizer or _count_targets
        denominators = [float(normalizer(c.inputs["labels"], c.inputs.get("weights"))) for c in chunks]
        total_denominator = sum(denominators)
        if total_denominator <= 0:
            raise InvalidInputError("data", "has no target to train on: every label is -100 or weight 0")
    logprobs: list[torch.Tensor | None] = [None] * len(checked)
    grads: list[torch.Tensor] | None = None
    loss_total = 0.0
    num_tokens = 0
    with base.lock, routed(base.routing, [Segment(run.run_id, 0, 0)], train=backward):
        for c, chunk in enumerate(chunks):
            base.routing.segments = [Segment(run.run_id, 0, len(chunk.indices))]
            with torch.set_grad_enabled(backward):
                try:
                    if spec.family == "native":
                        chunk_loss, out_B = _native_chunk(base, chunk, spec, kwargs)
                        scaled = chunk_loss * (denominators[c] / total_denominator)
                        loss_total += float(scaled.detach())
                    else:
                        chunk_loss, out_B = _token_chunk(base, chunk, spec, kwargs)
                        scaled = chunk_loss
                        loss_total += float(chunk_loss.detach())
                    if not torch.isfinite(scaled.detach()):
                        raise NonFiniteError(
                            f"loss {spec.name!r} is {float(scaled.detach())} on data {chunk.indices}; "
                            "the run is unchanged"
                        )
                    if backward:
                        chunk_grads = torch.autograd.grad(scaled, params, allow_unused=True)
                        chunk_grads = [
                            torch.zeros_like(p) if g is None else g
                            for p, g in zip(params, chunk_grads, strict=True)
                        ]
                        if grads is None:
                            grads = list(chunk_grads)
                        else:
                            torch._foreach_add_(grads, chunk_grads)
                except EngineError:
                    raise
                except torch.OutOfMemoryError as exc:
                    raise ComputeError(
                        f"out of memory on a chunk of {chunk.input_ids.numel()} tokens; the run is unchanged"
                    ) from exc
                except Exception as exc:  # a custom loss may raise anything
                    raise ComputeError(
                        f"loss {spec.name!r} raised {type(exc).__name__}: {exc}; the run is unchanged"
                    ) from exc
            for row, index in enumerate(chunk.indices):
                logprobs[index] = out_B[row]
            num_tokens += int(chunk.mask.sum())
    if grads is not None:
        if not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
            raise NonFiniteError(f"gradients of loss {spec.name!r} are not finite; the run is unchanged")
        # Commit: only now does the run's state change.
        for p, g in zip(params, grads, strict=True):
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        run.pending_grad_ops += 1
    reduction = "sum" if spec.family == "token" else "mean"
    return ForwardBackwardResult(
        loss=loss_total,
        logprobs=[lp if lp is not None else torch.empty(0) for lp in logprobs],
        metrics={f"loss:{reduction}": loss_total, "num_tokens:sum": float(num_tokens)},
        loss_family=spec.family,
    )


def _count_targets(labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return (labels[:, 1:] != -100).sum()


def _logits(base: BaseModel, chunk: Chunk) -> torch.Tensor:
    out = base.model(
        input_ids=chunk.input_ids.to(base.device),
        attention_mask=chunk.attention_mask.to(base.device),
        use_cache=False,
    )
    return out.logits  # (B, T, V)


def _native_chunk(
    base: BaseModel, chunk: Chunk, spec: LossSpec, kwargs: Mapping
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The user's loss on one chunk, and each row's log-probs of its shifted labels (N-1,)."""
    logits = _logits(base, chunk)
    labels = chunk.inputs["labels"].to(base.device)
    weights = chunk.inputs.get("weights")
    loss = spec.fn(logits, labels, weights.to(base.device) if weights is not None else None, **kwargs)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"a loss function must return a scalar tensor, got {type(loss).__name__}")
    with torch.no_grad():
        lp = shifted_target_logprobs(logits.detach(), labels).cpu()  # (B, T-1)
    return loss.reshape(()), [lp[row, : n - 1] for row, n in enumerate(chunk.lengths)]


def _token_chunk(
    base: BaseModel, chunk: Chunk, spec: LossSpec, config: Mapping
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Tinker's token-level loss on one chunk: the chunk's summed loss, and each row's target log-probs."""
    logits = _logits(base, chunk)
    targets = chunk.inputs["target_tokens"].to(base.device)
    logprobs = target_logprobs(logits, targets)  # (B, T) or (B, T, K)
    inputs = {k: v.to(base.device) for k, v in chunk.inputs.items() if k != "target_tokens"}
    per_datum = spec.fn(logprobs, inputs, chunk.mask.to(base.device), **config)  # (B,)
    out = logprobs.detach().cpu()
    return per_datum.sum(), [out[row, :n] for row, n in enumerate(chunk.lengths)]


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under `logits` (B, T, V), in float32; targets (B, T) or (B, T, K)."""
    logits = logits.float()
    if targets.ndim == 2:  # one fused log-softmax + gather: the fastest path, forward and backward
        flat = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        return -flat.view(targets.shape)
    picked = torch.gather(logits, -1, targets)  # (B, T, K)
    return picked - torch.logsumexp(logits, dim=-1, keepdim=True)


# --- the optimizer step ------------------------------------------------------------------------------


def check_adam_params(params: AdamParams) -> None:
    checks = {
        "learning_rate": params.learning_rate >= 0,
        "beta1": 0 <= params.beta1 < 1,
        "beta2": 0 <= params.beta2 < 1,
        "eps": params.eps > 0,
        "weight_decay": params.weight_decay >= 0,
        "grad_clip_norm": params.grad_clip_norm >= 0,
    }
    for name, ok in checks.items():
        value = getattr(params, name)
        if not ok or value != value or value in (float("inf"), float("-inf")):
            raise InvalidInputError(f"adam_params.{name}", f"{value} is out of range")


def optim_step(run: TrainingRun, adam: AdamParams) -> OptimStepResult:
    """Apply the accumulated gradients with AdamW, zero them, and count the step.

    A step with no accumulated gradients treats them as zero (momentum and weight decay still apply).
    """
    check_adam_params(adam)
    params = run.params
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if not bool(torch.isfinite(grad_norm)):
        raise NonFiniteError("the accumulated gradients are not finite; the run is unchanged")
    state = run.optimizer.state
    # Cheap for an adapter, and it makes the step all-or-nothing (an OOM half-way through included).
    snapshot = _Snapshot(
        weights=[p.detach().clone() for p in params],
        # AdamW reads gradients without changing them; only clipping scales them in place.
        grads=[
            None if p.grad is None else p.grad.clone() if adam.grad_clip_norm > 0 else p.grad for p in params
        ],
        states={id(p): {k: v.clone() for k, v in state[p].items()} for p in params if p in state},
    )
    with run.base.lock:
        try:
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            if adam.grad_clip_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, adam.grad_clip_norm, grad_norm, foreach=True)
            for group in run.optimizer.param_groups:
                group.update(
                    lr=adam.learning_rate,
                    betas=(adam.beta1, adam.beta2),
                    eps=adam.eps,
                    weight_decay=adam.weight_decay,
                )
            run.optimizer.step()
            if not bool(torch.isfinite(torch.stack(torch._foreach_norm([p.data for p in params]))).all()):
                raise NonFiniteError("the update produced NaN or infinite weights; the run is unchanged")
        except BaseException as exc:
            _restore(run, params, snapshot)
            if isinstance(exc, EngineError):
                raise
            raise ComputeError(
                f"optim_step failed: {type(exc).__name__}: {exc}; the run is unchanged"
            ) from exc
        # Gradients are consumed by the step: the next forward_backward starts a new accumulation.
        for p in params:
            p.grad = None
        run.step += 1
        run.pending_grad_ops = 0
    return OptimStepResult(step=run.step, grad_norm=float(grad_norm), learning_rate=adam.learning_rate)


@dataclass
class _Snapshot:
    weights: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    states: dict[int, dict[str, torch.Tensor]]


def _restore(run: TrainingRun, params: list[nn.Parameter], snapshot: _Snapshot) -> None:
    with torch.no_grad():
        for p, w in zip(params, snapshot.weights, strict=True):
            p.copy_(w)
    for p, g in zip(params, snapshot.grads, strict=True):
        p.grad = g
        if id(p) in snapshot.states:
            run.optimizer.state[p] = snapshot.states[id(p)]
        else:
            run.optimizer.state.pop(p, None)
