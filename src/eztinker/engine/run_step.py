"""`optim_step` of one or many runs (`eztinker.engine.run`): AdamW runs with equal hyperparameters share
one multi-tensor update, a Dimuon run steps alone, and a step that fails restores its run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from eztinker.engine.errors import ComputeError, EngineError, NonFiniteError
from eztinker.engine.optimizers import Dimuon, check_step_params
from eztinker.engine.types import AdamParams, DimuonParams, OptimStepResult

if TYPE_CHECKING:
    from eztinker.engine.run import TrainingRun


StepParams = AdamParams | DimuonParams


def optim_step(run: TrainingRun, params: StepParams) -> OptimStepResult:
    """Apply the accumulated gradients with the run's optimizer, zero them, and count the step.

    `params` must be of the run's optimizer family (`AdamParams` for AdamW, `DimuonParams` for Dimuon),
    else `InvalidInputError` and nothing changes. A step with no accumulated gradients treats them as
    zero (momentum and weight decay still apply).
    """
    (outcome,) = optim_step_many([(run, params)])
    if isinstance(outcome, EngineError):
        raise outcome
    return outcome


def optim_step_many(steps: Sequence[tuple[TrainingRun, StepParams]]) -> list[OptimStepResult | EngineError]:
    """`optim_step` for several runs; AdamW runs with equal hyperparameters share one multi-tensor update.

    AdamW is elementwise, so each run's outcome equals stepping it alone; a Dimuon run steps alone. A
    run whose step fails is restored and fails alone; if a shared update raises, every run in it is
    restored and fails. A run named more than once steps once per mention, in order: its later steps
    start from the state its earlier ones left (and from no gradients, as they consumed them).
    """
    outcomes: list[OptimStepResult | EngineError | None] = [None] * len(steps)
    for wave in _waves(steps):
        for i, outcome in zip(wave, _step_wave([steps[i] for i in wave]), strict=True):
            outcomes[i] = outcome
    return [o for o in outcomes if o is not None]


def _waves(steps: Sequence[tuple[TrainingRun, StepParams]]) -> list[list[int]]:
    """The steps' indices in waves that name each run at most once: every run's first step, then the
    second steps, ... (a run's steps are sequential; different runs' steps are independent)."""
    waves: list[list[int]] = []
    seen: dict[int, int] = {}
    for i, (run, _) in enumerate(steps):
        n = seen.get(id(run), 0)
        seen[id(run)] = n + 1
        if n == len(waves):
            waves.append([])
        waves[n].append(i)
    return waves


def _step_wave(steps: Sequence[tuple[TrainingRun, StepParams]]) -> list[OptimStepResult | EngineError]:
    """One outcome per step of runs that are all different, in order (see `optim_step_many`)."""
    outcomes: list[OptimStepResult | EngineError | None] = [None] * len(steps)
    groups: dict[tuple[Any, ...], list[_Step]] = {}
    for i, (run, params) in enumerate(steps):
        try:
            step = _prepare_step(i, run, params)
        except EngineError as exc:
            outcomes[i] = exc
            continue
        if isinstance(params, AdamParams):
            key: tuple[Any, ...] = (
                "adamw",
                params.learning_rate,
                params.beta1,
                params.beta2,
                params.eps,
                params.weight_decay,
            )
        else:
            key = ("dimuon", i)
        groups.setdefault(key, []).append(step)
    for group in groups.values():
        with ExitStack() as locks:
            for base in {id(s.run.base): s.run.base for s in group}.values():
                locks.enter_context(base.lock)
            try:
                if isinstance(group[0].params_in, DimuonParams):
                    _dimuon(group[0])
                else:
                    _adamw(group)
            except BaseException as exc:
                for s in group:
                    _restore(s)
                if not isinstance(exc, Exception):
                    raise
                error = (
                    exc
                    if isinstance(exc, EngineError)
                    else ComputeError(f"optim_step failed: {type(exc).__name__}: {exc}; the run is unchanged")
                )
                error.__cause__ = exc
                for s in group:
                    outcomes[s.index] = error
                continue
            for s in group:
                outcomes[s.index] = _finish_step(s)
    return [o for o in outcomes if o is not None]


@dataclass
class _Step:
    """A run's optimizer step under way, with what it takes to undo it."""

    index: int
    run: TrainingRun
    params_in: StepParams
    params: list[nn.Parameter]
    grad_norm: torch.Tensor
    weights: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    states: dict[int, dict[str, torch.Tensor]]


def _prepare_step(index: int, run: TrainingRun, step_params: StepParams) -> _Step:
    """Check the step can go ahead, snapshot the run (cheap for an adapter), and install its gradients."""
    check_step_params(run.optimizer_name, step_params, run.run_id, rank=run.lora_config.r)
    clips = step_params.grad_clip_norm > 0
    params = run.params
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if not bool(torch.isfinite(grad_norm)):
        raise NonFiniteError("the accumulated gradients are not finite; the run is unchanged")
    state = run.optimizer.state
    step = _Step(
        index=index,
        run=run,
        params_in=step_params,
        params=params,
        grad_norm=grad_norm,
        weights=_copies([p.detach() for p in params]),
        # The optimizers read gradients without changing them; only clipping scales them in place.
        grads=[None if p.grad is None else p.grad.clone() if clips else p.grad for p in params],
        states=_state_copies(state, params),
    )
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    return step


_FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def _copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Exact copies of many small tensors in one call (a Python loop of `clone` costs more than the step)."""
    return list(torch._foreach_mul(tensors, 1.0)) if tensors else []


def _state_copies(state: Mapping, params: list[nn.Parameter]) -> dict[int, dict[str, torch.Tensor]]:
    """Copies of the optimizer state of `params` (those that have one), keyed by id(param)."""
    keys = [(id(p), k) for p in params if p in state for k in state[p]]
    values = _copies([state[p][k] for p in params if p in state for k in state[p]])
    copies: dict[int, dict[str, torch.Tensor]] = {}
    for (pid, k), v in zip(keys, values, strict=True):
        copies.setdefault(pid, {})[k] = v
    return copies


def _adamw(group: list[_Step]) -> None:
    """Clip each run's gradients by its own norm, then one AdamW update over every run's parameters.

    The update runs in a throwaway optimizer whose per-parameter state is each run's own state dicts,
    so the moments land where the run (and its checkpoints) keep them.
    """
    adam = group[0].params_in
    assert isinstance(adam, AdamParams)
    for s in group:
        if s.params_in.grad_clip_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(
                s.params, s.params_in.grad_clip_norm, s.grad_norm, foreach=True
            )
        for param_group in s.run.optimizer.param_groups:  # what a checkpoint records
            param_group.update(
                lr=adam.learning_rate,
                betas=(adam.beta1, adam.beta2),
                eps=adam.eps,
                weight_decay=adam.weight_decay,
            )
    params = [p for s in group for p in s.params]
    # One fused kernel for every tensor of every run: on CPU, 6x faster than the default per-tensor
    # loop for 8 runs' adapters (448 tensors), the same update up to float rounding.
    fused = params[0].device.type in _FUSED_ADAMW_DEVICES
    optimizer = torch.optim.AdamW(
        params,
        lr=adam.learning_rate,
        betas=(adam.beta1, adam.beta2),
        eps=adam.eps,
        weight_decay=adam.weight_decay,
        fused=fused,
    )
    for s in group:
        for p in s.params:
            state = s.run.optimizer.state[p]
            if fused:
                _place_step_for_fused(state, p)
            optimizer.state[p] = state
    optimizer.step()


def _place_step_for_fused(state: dict[str, Any], param: torch.Tensor) -> None:
    """Put a moment state's `step` where torch's fused AdamW reads it: on the parameter's device, in
    float32 (what `torch.optim.Adam` itself does for a fused optimizer, also on `load_state_dict`).

    State restored from a checkpoint is made for the run's own (unfused) optimizer, which keeps `step`
    on the CPU; the fused CUDA kernel would read that host pointer on the device."""
    step = state.get("step")
    if isinstance(step, torch.Tensor) and (step.device != param.device or step.dtype != torch.float32):
        state["step"] = step.to(device=param.device, dtype=torch.float32)


def _dimuon(s: _Step) -> None:
    """Clip the run's gradients by their global norm, then one Dimuon update of its adapter."""
    params = s.params_in
    assert isinstance(params, DimuonParams) and isinstance(s.run.optimizer, Dimuon)
    if params.grad_clip_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(s.params, params.grad_clip_norm, s.grad_norm, foreach=True)
    s.run.optimizer.set_hyperparameters(params)
    s.run.optimizer.step()


def _finish_step(s: _Step) -> OptimStepResult | EngineError:
    if not bool(torch.isfinite(torch.stack(torch._foreach_norm([p.data for p in s.params]))).all()):
        _restore(s)
        return NonFiniteError("the update produced NaN or infinite weights; the run is unchanged")
    # Gradients are consumed by the step: the next forward_backward starts a new accumulation.
    for p in s.params:
        p.grad = None
    s.run.step += 1
    s.run.pending_grad_ops = 0
    return OptimStepResult(
        step=s.run.step, grad_norm=float(s.grad_norm), learning_rate=s.params_in.learning_rate
    )


def _restore(s: _Step) -> None:
    with torch.no_grad():
        for p, w in zip(s.params, s.weights, strict=True):
            p.copy_(w)
    for p, g in zip(s.params, s.grads, strict=True):
        p.grad = g
        if id(p) in s.states:
            s.run.optimizer.state[p] = s.states[id(p)]
        else:
            s.run.optimizer.state.pop(p, None)
