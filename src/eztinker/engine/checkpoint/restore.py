"""Restoring a read checkpoint into a run: adapter, step and optimizer state, all or nothing."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from eztinker.engine.checkpoint.format import LoadedCheckpoint, with_model_names
from eztinker.engine.checkpoint.save import _named_params, with_layer_paths
from eztinker.engine.errors import InvalidInputError
from eztinker.engine.lora import output_head_path

if TYPE_CHECKING:
    from eztinker.engine.run import TrainingRun


# --- restoring into a run ----------------------------------------------------------------------------


def restore_into_run(run: TrainingRun, loaded: LoadedCheckpoint, *, with_optimizer: bool) -> None:
    """Overwrite `run`'s adapter, step and optimizer state with the checkpoint's, all or nothing.

    The checkpoint must have exactly the run's layers, shapes and scaling, else `InvalidInputError`
    (field "path") naming the first mismatch, and the run is untouched. Accumulated gradients are
    dropped. The optimizer state is the checkpoint's if `with_optimizer` and it has one; else it is
    cleared (the optimizer starts afresh at the next step). State of another optimizer than the run's
    is refused (a run's optimizer is fixed). Tinker's name for the head is accepted.
    """
    loaded = with_layer_paths(with_model_names(loaded, output_head_path(run.base.model)), run)
    _check_compatible(run, loaded)
    params = _named_params(run)
    use_optimizer = with_optimizer and loaded.optimizer is not None
    if use_optimizer and loaded.optimizer_name != run.optimizer_name:
        raise InvalidInputError(
            "path",
            f"the checkpoint holds {loaded.optimizer_name} optimizer state, but run "
            f"{run.run_id!r} uses {run.optimizer_name} (fixed when it was created): load its weights only, "
            "or create a run from it",
        )
    # Convert everything first (this is where an out-of-memory would strike), then commit.
    new_weights: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    for module_path, (a, b) in loaded.tensors.items():
        slot = run.slots[module_path]
        new_weights.append((slot.lora_A, a.to(device=slot.lora_A.device, dtype=slot.lora_A.dtype)))
        new_weights.append((slot.lora_B, b.to(device=slot.lora_B.device, dtype=slot.lora_B.dtype)))
    new_states: dict[str, dict[str, torch.Tensor]] = {}
    if use_optimizer:
        assert loaded.optimizer is not None
        groups = {id(p): group for group in run.optimizer.param_groups for p in group["params"]}
        for key, state in loaded.optimizer.items():
            param = params[key]
            if run.optimizer_name == "adamw":
                new_states[key] = _torch_adam_state(param, state, groups.get(id(param), {}))
            else:  # Dimuon's momentum: the parameter's device and dtype
                new_states[key] = {
                    k: v.detach().to(device=param.device, dtype=param.dtype, copy=True)
                    for k, v in state.items()
                }

    with torch.no_grad():
        for param, value in new_weights:
            param.copy_(value)
    for key, param in params.items():
        param.grad = None
        run.optimizer.state.pop(param, None)
        if key in new_states:
            run.optimizer.state[param] = new_states[key]
    run.pending_grad_ops = 0
    run.step = loaded.step


def _check_compatible(run: TrainingRun, loaded: LoadedCheckpoint) -> None:
    def mismatch(message: str) -> InvalidInputError:
        # Not the directory it was read from: that is the server's, and the caller named the checkpoint.
        return InvalidInputError("path", f"the checkpoint does not fit run {run.run_id!r}: {message}")

    missing = sorted(set(run.slots) - set(loaded.tensors))
    if missing:
        raise mismatch(f"it has no adapter for layer {missing[0]} (run targets {run.target_modules})")
    extra = sorted(set(loaded.tensors) - set(run.slots))
    if extra:
        raise mismatch(f"it has an adapter for layer {extra[0]}, which the run does not adapt")
    for module_path in sorted(run.slots):
        slot = run.slots[module_path]
        a, b = loaded.tensors[module_path]
        for name, saved, live in (("lora_A", a, slot.lora_A), ("lora_B", b, slot.lora_B)):
            if tuple(saved.shape) != tuple(live.shape):
                raise mismatch(
                    f"{module_path}.{name} has shape {tuple(saved.shape)} in the checkpoint and "
                    f"{tuple(live.shape)} in the run (checkpoint r={loaded.lora_config.r}, run r={run.lora_config.r})"
                )
        scaling = loaded.lora_config.lora_alpha / loaded.lora_config.r
        if not math.isclose(scaling, slot.scaling, rel_tol=1e-6):
            raise mismatch(
                f"its scaling lora_alpha/r = {loaded.lora_config.lora_alpha}/{loaded.lora_config.r} differs "
                f"from the run's {run.lora_config.lora_alpha}/{run.lora_config.r}"
            )
    if loaded.optimizer is not None:
        named = _named_params(run)
        for key, state in loaded.optimizer.items():
            param = named.get(key)
            if param is None:
                raise mismatch(f"it has optimizer state for {key}, which the run does not have")
            for stat, value in state.items():
                expected = () if stat == "step" else tuple(param.shape)
                if tuple(value.shape) != expected:
                    raise mismatch(
                        f"its optimizer {stat} for {key} has shape {tuple(value.shape)}, not {expected}"
                    )


def _scalar_dtype(fused: bool) -> torch.dtype:
    """torch.optim's dtype for `step` (`torch.optim.optimizer._get_scalar_dtype`)."""
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _torch_adam_state(
    param: torch.Tensor, saved: Mapping[str, torch.Tensor], group: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The state dict torch's Adam/AdamW would hold for `param`, with the saved values (fresh copies).

    As in `torch.optim.Adam`: `step` is a 0-d tensor on the CPU (on the parameter's device, float32 if
    fused, when the optimizer is fused or capturable); the moments match the parameter's device and dtype.
    """
    fused = bool(group.get("fused"))
    on_device = fused or bool(group.get("capturable"))
    state: dict[str, torch.Tensor] = {}
    for stat, value in saved.items():
        if stat == "step":
            state[stat] = (
                value.detach()
                .reshape(())
                .to(
                    device=param.device if on_device else torch.device("cpu"),
                    dtype=_scalar_dtype(fused),
                    copy=True,
                )
            )
        else:
            state[stat] = value.detach().to(device=param.device, dtype=param.dtype, copy=True)
    return state
