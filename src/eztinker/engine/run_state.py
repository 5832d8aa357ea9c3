"""A run's state as named tensors: its adapter weights, their gradients and the optimizer's moments, by a
stable key (`<i>.data`, `<i>.grad`, `<i>.state.<stat>` for the i-th parameter in the optimizer's order);
their bytes; and taking them out of the run and putting them back (what `eztinker.engine.paging` moves
between the device, host memory and disk)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from eztinker.engine.run import TrainingRun


def state_tensors(run: TrainingRun) -> dict[str, torch.Tensor]:
    """Every tensor of the run's state, by a stable key: `<i>.data`, `<i>.grad`, `<i>.state.<stat>` for
    the i-th parameter (the optimizer's order)."""
    tensors: dict[str, torch.Tensor] = {}
    for i, p in enumerate(run.params):
        tensors[f"{i}.data"] = p.data
        if p.grad is not None:
            tensors[f"{i}.grad"] = p.grad
        for stat, value in run.optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"{i}.state.{stat}"] = value
    return tensors


def state_bytes(run: TrainingRun, device_only: bool = True) -> int:
    """Bytes of the run's state (on a non-CPU device only, if `device_only` and the run is on one)."""
    on_cpu = run.base.device.type == "cpu"
    return sum(
        t.numel() * t.element_size()
        for t in state_tensors(run).values()
        if not device_only or on_cpu or t.device.type != "cpu"
    )


def take_state(run: TrainingRun, moved: Callable[[torch.Tensor], bool]) -> dict[str, torch.Tensor]:
    """Detach the run's tensors that `moved` selects from it (their storage is freed once the caller drops
    them); what is left of a parameter is an empty tensor of its dtype and device."""
    taken: dict[str, torch.Tensor] = {}
    for i, p in enumerate(run.params):
        if moved(p.data):
            taken[f"{i}.data"] = p.data
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        if p.grad is not None and moved(p.grad):
            taken[f"{i}.grad"] = p.grad
            p.grad = None
        state = run.optimizer.state.get(p)
        if state is None:
            continue
        for stat in list(state):
            value = state[stat]
            if isinstance(value, torch.Tensor) and moved(value):
                taken[f"{i}.state.{stat}"] = value
                del state[stat]
    return taken


def put_state(run: TrainingRun, tensors: dict[str, torch.Tensor]) -> None:
    """Give the run back the tensors `take_state` took (weights first: a gradient must match its parameter)."""
    params = run.params
    for key in sorted(tensors, key=lambda k: (k.split(".")[1] != "data", k)):
        index, kind, *stat = key.split(".", 2)
        p = params[int(index)]
        if kind == "data":
            p.data = tensors[key]
        elif kind == "grad":
            p.grad = tensors[key]
        else:
            run.optimizer.state[p][stat[0]] = tensors[key]


def copy_tensors(tensors: dict[str, torch.Tensor], devices: dict[str, torch.device], pin: bool) -> dict:
    """Fresh copies of `tensors`, each on `devices[key]` (or the CPU, pinned if `pin`)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        device = devices.get(key, torch.device("cpu"))
        copy = torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=pin and device.type == "cpu")
        copy.copy_(t, non_blocking=copy.is_pinned() or t.is_pinned())
        out[key] = copy
    if any(t.is_cuda for t in (*tensors.values(), *out.values())):
        torch.cuda.synchronize()  # the non-blocking copies are done before the source is dropped
    return out


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of `tensors` together."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
