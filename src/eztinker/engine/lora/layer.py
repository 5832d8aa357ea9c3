"""The LoRA linear layer and its routing: one `LoRAWeights` slot per adapter, a shared `Routing` that says
which adapter serves which rows, and the co-batched dense delta that computes every row's in one pass."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from eztinker.engine.families import LINEAR_TYPES

ADAPTABLE_TYPES = LINEAR_TYPES


@dataclass
class Segment:
    """Rows [start, stop) of the batch are served by `adapter` (None: the bare base model)."""

    adapter: str | None
    start: int
    stop: int


@dataclass
class Routing:
    """Which adapter serves which rows during the current forward pass. One per base model.

    Empty `segments` means: the bare base model for every row. Segments cover rows 0..rows-1 in order.
    """

    segments: list[Segment] = field(default_factory=list)
    train: bool = False  # adapter dropout is active only while training
    # Index tensors that send each row to its adapter's factors in one batched op, on the pass's device,
    # by layout (`_row_plan`): built once per layout and reused by every layer and every later pass with
    # that layout, so no layer copies anything from the host (a host-to-device copy of a plain tensor
    # waits for the device to finish all queued work) nor loops over rows in Python.
    plans: dict[tuple, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def rows(self) -> int:
        """The batch size of the pass under way (layers that see flattened tokens recover rows from it)."""
        return self.segments[-1].stop if self.segments else 0


@dataclass
class LoRAWeights:
    """One adapter's slot in one layer (for a fused expert weight: every expert's factors, PEFT's layout)."""

    lora_A: nn.Parameter  # (r, in); experts: (E·r, in)
    lora_B: nn.Parameter  # (out, r); experts: (out, r·E)
    scaling: float
    dropout: float
    num_experts: int = 1

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0] // self.num_experts

    def delta(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """The adapter's contribution for input x (..., in) -> (..., out), in float32 (linear layers)."""
        if train and self.dropout > 0:
            h = F.dropout(x.to(self.lora_A.dtype), p=self.dropout, training=True)
            return _one_adapter(h, self.lora_A, self.lora_B, scaling=self.scaling)
        return _lowrank(functools.partial(_one_adapter, scaling=self.scaling), x, [self.lora_A, self.lora_B])


def _one_adapter(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, scaling: float) -> torch.Tensor:
    return F.linear(F.linear(h, a), b) * scaling


def _add(y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """base output + float32 delta, rounded once to the base dtype (PEFT's order: bf16 + fp32 is fp32)."""
    return (y + delta).to(y.dtype)


class LoRALinear(nn.Module):
    """A frozen linear layer (`nn.Linear`, or GPT-2's transposed `Conv1D`) plus routed LoRA slots."""

    base_layer: nn.Module
    routing: Routing
    adapters: dict[str, LoRAWeights]
    path: str
    fan_in_fan_out: bool
    in_features: int
    out_features: int
    num_experts: int = 1

    def __init__(self, base_layer: nn.Module, routing: Routing, path: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.path = path  # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        weight = base_layer.weight
        assert isinstance(weight, torch.Tensor)
        rows, cols = weight.shape  # (in, out) for Conv1D, (out, in) for Linear
        self.in_features, self.out_features = (rows, cols) if self.fan_in_fan_out else (cols, rows)
        self.adapters: dict[str, LoRAWeights] = {}
        # Plain attribute lookups, not nn.Module registration: the routing is shared, not owned.
        object.__setattr__(self, "routing", routing)

    @property
    def device(self) -> torch.device:
        weight = self.base_layer.weight
        assert isinstance(weight, torch.Tensor)
        return weight.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        segments = self.routing.segments
        if not segments or not self.adapters:
            return y
        train = self.routing.train
        if len(segments) == 1:  # the common case: the whole batch belongs to one adapter
            slot = self.adapters.get(segments[0].adapter) if segments[0].adapter else None
            return y if slot is None else _add(y, slot.delta(x, train))
        rows = self.routing.rows
        if x.shape[0] != rows:  # flattened tokens (an MoE block's shared expert sees (B·T, in)): rows back
            out = self._routed(x.reshape(rows, -1, x.shape[-1]), y.reshape(rows, -1, y.shape[-1]), segments)
            return out.reshape(y.shape)
        return self._routed(x, y, segments)

    def _routed(self, x: torch.Tensor, y: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        train = self.routing.train
        slots = [self.adapters.get(seg.adapter) if seg.adapter else None for seg in segments]
        if not (train and any(s is not None and s.dropout > 0 for s in slots)):
            delta = _routed_delta(x, segments, slots, self.routing)
            return y if delta is None else _add(y, delta)
        pieces = []  # dropout draws a mask per row group: one adapter at a time
        for seg, slot in zip(segments, slots, strict=True):
            y_rows = y[seg.start : seg.stop]
            if slot is not None:
                y_rows = _add(y_rows, slot.delta(x[seg.start : seg.stop], train))
            pieces.append(y_rows)
        return torch.cat(pieces, dim=0)


# --- the co-batched dense delta ------------------------------------------------------------------------
#
# A pass's rows come in segments, one adapter each. Every way below computes all rows' deltas with a
# fixed number of kernels per layer, whatever the number of adapters, and builds nothing on the host per
# layer: the index tensors come from the pass's `_RowPlan` (cached on the Routing), the factors are
# joined with one `cat` each. They differ in what they waste:
#
#   "concat"  every row times every adapter's ranks (x·[A_1; …; A_G]ᵀ, masked, then ·[B_1 … B_G]ᵀ): two
#             plain matmuls that read each factor once; wastes B·T·(R - r)·(in + out) flops. For decoding.
#   "rows"    each row gathers its own adapter's A and B (ranks zero-padded to the largest), two bmm:
#             copies B·r·(in + out) factor elements, negligible once a row has more tokens than ranks.
#             For training and prefill.
#   "groups"  the rows of each adapter gathered into one bmm batch (padded to the largest group), times
#             that adapter's factors, scattered back: copies the rows (B·T·in in, B·T·out out), reads each
#             factor once, wastes only the group padding. For decoding many rows on many adapters, where
#             "concat" multiplies every row by every rank and "rows" copies factors per row.
#   "loop"    one pair of matmuls per segment: the reference the others are tested against.
#
# All four run on any device; no torch grouped matmul here: its fast kernel (CUDA) takes bf16 only, and
# LoRA's products stay in float32 (below); its fallback for other dtypes reads the group offsets back to
# the host (a sync) and loops over groups. Gathers use `index_select` of whole rows (`_gather`).
#
# Precision with a bf16 base: A and B are float32 parameters (so are their gradients and the optimizer's
# state); x is cast to float32 and both products and their accumulation run in float32; the delta is
# added to the base output in float32 and rounded once (PEFT's order). Where autograd would keep the
# float32 copy of x for the gradient of A (twice the bf16 activation, per adapted layer, and not counted
# by `engine.memory`'s profile), `_lowrank` keeps x itself and recomputes the cheap low-rank forward in
# backward instead (`_LowRankSavingInput`; on CUDA, see `SAVE_INPUT_IN_BASE_DTYPE`). With a float32 base
# there is no copy and no recompute.

DENSE_PATH = "auto"
"""How `_routed_delta` computes a co-batched pass's deltas: "auto" (`_dense_path`), or "concat", "rows",
"groups", "loop" everywhere (tests and benchmarks pin one; every way gives the same result)."""

SAVE_INPUT_IN_BASE_DTYPE: bool | None = None
"""With a bf16/fp16 base, keep the layer input in its own dtype for backward and recompute the low-rank
forward there (`_lowrank`), rather than keep a float32 copy of it. None: on CUDA only — where activation
memory is what limits a pass and the recompute costs ~r/hidden of a layer (1-2 % at hidden 2048+); on a
CPU, with the tiny models it serves, the recompute costs 15 % of a bf16 training step (measured at hidden
256, ranks 4-32) and memory is rarely the limit."""

# Which way (`_dense_path`): "concat" for decoding (≤ 4 tokens per row) while rows × total rank is small —
# its wasted flops grow with both; on CPU, measured (tiny models, 8-32 adapters): it beats the others up
# to about 2^14, "groups" beats it beyond; on CUDA, where a decode step is bound by reading weights rather
# than by flops, an estimate: at 2^15, B·R·(in + out)·2 float32 flops take ~10 µs at hidden 4096, about
# what the extra gathers of "groups" cost (gpu_check's `cuda_paths` section times all four). Otherwise
# "rows" once a row has at least as many tokens as the largest rank (its factor copies are then at most
# the size of the input), else "groups". Measured on CPU, "rows" is 10-30 % faster than the way before
# it (per-layer index tensors and padded stacks) for training shapes, "concat" and "groups" 2-10× faster
# for decoding.
_CONCAT_MAX_TOKENS = 4
_CONCAT_MAX_ROW_RANKS = {"cpu": 2**14, "cuda": 2**15}
_MAX_PLANS = 256  # layouts kept per base model (a layout is a few small index tensors)


@dataclass(frozen=True)
class _RowPlan:
    """Rows of a pass routed to the G adapters present in a layer (R ranks in all, the largest r), as
    index tensors on the pass's device. The factors are indexed joined: rows 0..R-1 of [A_1; …; A_G] and
    a zero row R (where a shorter rank or a row without an adapter points)."""

    layout: tuple[tuple[int, int, int], ...]  # (start, stop, group) per segment; group -1: no adapter
    ranks: tuple[int, ...]
    scales: tuple[float, ...]
    rows: int
    row_scale: torch.Tensor  # (B, 1, 1): the row's adapter's scaling, 0 without one
    row_pad: torch.Tensor  # (B, r): the joined-factor row of each of the row's adapter's ranks
    concat_mask: torch.Tensor  # (B, R): the row's scaling on its adapter's ranks, else 0
    group_pad: torch.Tensor  # (G, r): the joined-factor rows of each adapter's ranks
    group_scale: torch.Tensor  # (G, 1, 1)
    group_rows: torch.Tensor  # (G, L): the rows of each adapter (padded with row 0; never read back)
    row_slot: torch.Tensor  # (B,): where each row lands in the (G·L) outputs of "groups"
    row_has: torch.Tensor  # (B, 1, 1) bool: the row has an adapter in this layer

    @property
    def total_rank(self) -> int:
        return sum(self.ranks)


def _row_plan(
    routing: Routing,
    segments: Sequence[Segment],
    slots: Sequence[LoRAWeights | None],
    device: torch.device,
) -> tuple[_RowPlan, list[LoRAWeights]] | None:
    """The pass's plan for a layer with these slots (one per segment), and the layer's distinct slots in
    group order; None if no row has an adapter here. Cached by layout: only the first layer (of the first
    pass) with a layout builds it."""
    groups: dict[int, int] = {}
    present: list[LoRAWeights] = []
    layout = []
    for seg, slot in zip(segments, slots, strict=True):
        if slot is None:
            layout.append((seg.start, seg.stop, -1))
            continue
        g = groups.setdefault(id(slot), len(present))
        if g == len(present):
            present.append(slot)
        layout.append((seg.start, seg.stop, g))
    if not present:
        return None
    dtype = present[0].lora_A.dtype
    ranks = tuple(slot.lora_A.shape[0] for slot in present)
    scales = tuple(float(slot.scaling) for slot in present)
    key = (device, dtype, tuple(layout), ranks, scales)
    plan = routing.plans.get(key)
    if plan is None:
        if len(routing.plans) >= _MAX_PLANS:
            routing.plans.clear()
        plan = routing.plans[key] = _build_plan(tuple(layout), ranks, scales, device, dtype)
    return plan, present


def _build_plan(
    layout: tuple[tuple[int, int, int], ...],
    ranks: tuple[int, ...],
    scales: tuple[float, ...],
    device: torch.device,
    dtype: torch.dtype,
) -> _RowPlan:
    rows = layout[-1][1]
    total, largest = sum(ranks), max(ranks)
    firsts = [sum(ranks[:g]) for g in range(len(ranks))]
    group_pad = torch.full((len(ranks), largest), total, dtype=torch.long)
    for g, (first, r) in enumerate(zip(firsts, ranks, strict=True)):
        group_pad[g, :r] = torch.arange(first, first + r)
    row_group = torch.full((rows,), -1, dtype=torch.long)
    row_scale = torch.zeros(rows, dtype=dtype)
    concat_mask = torch.zeros(rows, total, dtype=dtype)
    for start, stop, g in layout:
        if g >= 0:
            row_group[start:stop] = g
            row_scale[start:stop] = scales[g]
            concat_mask[start:stop, firsts[g] : firsts[g] + ranks[g]] = scales[g]
    has = row_group >= 0
    row_pad = torch.full((rows, largest), total, dtype=torch.long)
    row_pad[has] = group_pad[row_group[has]]
    members = [torch.arange(rows)[row_group == g] for g in range(len(ranks))]
    width = max(len(m) for m in members)
    group_rows = torch.zeros(len(ranks), width, dtype=torch.long)
    row_slot = torch.zeros(rows, dtype=torch.long)
    for g, m in enumerate(members):
        group_rows[g, : len(m)] = m
        row_slot[m] = g * width + torch.arange(len(m))
    return _RowPlan(
        layout=layout,
        ranks=ranks,
        scales=scales,
        rows=rows,
        row_scale=_to_device(row_scale.view(rows, 1, 1), device),
        row_pad=_to_device(row_pad, device),
        concat_mask=_to_device(concat_mask, device),
        group_pad=_to_device(group_pad, device),
        group_scale=_to_device(torch.tensor(scales, dtype=dtype).view(-1, 1, 1), device),
        group_rows=_to_device(group_rows, device),
        row_slot=_to_device(row_slot, device),
        row_has=_to_device(has.view(rows, 1, 1), device),
    )


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, queued behind the device's work rather than waiting for it (CUDA: a
    plain host-to-device copy synchronises; one from pinned memory with non_blocking does not)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _routed_delta(
    x: torch.Tensor, segments: Sequence[Segment], slots: Sequence[LoRAWeights | None], routing: Routing
) -> torch.Tensor | None:
    """Every row's delta from its own adapter (zero for rows without one in this layer), in float32, with
    a fixed number of kernels whatever the number of adapters (see above); None if no row has one."""
    planned = _row_plan(routing, segments, slots, x.device)
    if planned is None:
        return None
    plan, present = planned
    h = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
    path = _dense_path(plan, h.shape[1], h.device.type) if DENSE_PATH == "auto" else DENSE_PATH
    params = [t for slot in present for t in (slot.lora_A, slot.lora_B)]
    delta = _lowrank(functools.partial(_DENSE_PATHS[path], plan=plan), h, params)
    return delta.reshape(*x.shape[:-1], delta.shape[-1])


def _dense_path(plan: _RowPlan, tokens: int, device_type: str) -> str:
    """The cheapest way for a layer's shapes (see above): `tokens` per row, on a device of this type."""
    row_ranks = _CONCAT_MAX_ROW_RANKS.get(device_type, _CONCAT_MAX_ROW_RANKS["cuda"])
    if tokens <= _CONCAT_MAX_TOKENS and plan.rows * plan.total_rank <= row_ranks:
        return "concat"
    return "rows" if tokens >= max(plan.ranks) else "groups"


def _joined(params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[A_1; …; A_G; 0] (R + 1, in) and [B_1ᵀ; …; B_Gᵀ; 0] (R + 1, out), contiguous (so gathering rows of
    them copies contiguous rows): every factor once, a zero row last."""
    a = params[0]
    zeros = a.new_zeros(1, a.shape[1] + params[1].shape[0])
    a = torch.cat([*params[0::2], zeros[:, : a.shape[1]]])
    bt = torch.cat([*(b.T for b in params[1::2]), zeros[:, a.shape[1] :]])
    return a, bt


def _concat_path(h: torch.Tensor, *params: torch.Tensor, plan: _RowPlan) -> torch.Tensor:
    a = torch.cat(list(params[0::2]))  # (R, in)
    b = torch.cat(list(params[1::2]), dim=1)  # (out, R)
    return ((h @ a.T) * plan.concat_mask[:, None, :]) @ b.T  # masked-out products are exact zeros


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[index] for a 2-D index into t's rows: (n, m) + t.shape[1:] (`index_select` copies whole rows; a
    2-D advanced index is several times slower on CPU)."""
    return t.index_select(0, index.reshape(-1)).view(*index.shape, *t.shape[1:])


def _rows_path(h: torch.Tensor, *params: torch.Tensor, plan: _RowPlan) -> torch.Tensor:
    a, bt = _joined(params)
    lowrank = torch.bmm(h, _gather(a, plan.row_pad).transpose(1, 2)) * plan.row_scale  # (B, T, r)
    return torch.bmm(lowrank, _gather(bt, plan.row_pad))  # (B, T, out)


def _groups_path(h: torch.Tensor, *params: torch.Tensor, plan: _RowPlan) -> torch.Tensor:
    a, bt = _joined(params)
    groups, width = plan.group_rows.shape
    rows, tokens = h.shape[0], h.shape[1]
    x_g = _gather(h, plan.group_rows).reshape(groups, width * tokens, h.shape[-1])  # (G, L·T, in)
    lowrank = torch.bmm(x_g, _gather(a, plan.group_pad).transpose(1, 2)) * plan.group_scale  # (G, L·T, r)
    out = torch.bmm(lowrank, _gather(bt, plan.group_pad)).reshape(groups * width, tokens, -1)
    # `where`, not a multiply by 0: a row without an adapter takes nothing from the row it points at.
    return torch.where(plan.row_has, out.index_select(0, plan.row_slot), 0.0).reshape(rows, tokens, -1)


def _loop_path(h: torch.Tensor, *params: torch.Tensor, plan: _RowPlan) -> torch.Tensor:
    out_features = params[1].shape[0]
    pieces = []
    for start, stop, g in plan.layout:
        if g < 0:
            pieces.append(h.new_zeros(stop - start, h.shape[1], out_features))
        else:
            a, b = params[2 * g], params[2 * g + 1]
            pieces.append(_one_adapter(h[start:stop], a, b, scaling=plan.scales[g]))
    return torch.cat(pieces)


_DENSE_PATHS = {"concat": _concat_path, "rows": _rows_path, "groups": _groups_path, "loop": _loop_path}


def _lowrank(
    fn: Callable[..., torch.Tensor], x: torch.Tensor, params: Sequence[torch.Tensor]
) -> torch.Tensor:
    """fn(x in the factors' dtype, *params): the delta, computed in float32.

    When x is bf16/fp16 and a gradient will be taken, autograd would keep the float32 copy of x for the
    gradient of A; `_LowRankSavingInput` keeps x itself (which the base model's own graph usually holds
    anyway, and q/k/v share) and recomputes the low-rank forward — a few percent of the layer's flops —
    in backward. The results are the same to the bit."""
    dtype = params[0].dtype
    save = x.device.type == "cuda" if SAVE_INPUT_IN_BASE_DTYPE is None else SAVE_INPUT_IN_BASE_DTYPE
    if (
        x.dtype == dtype
        or not save
        or not torch.is_grad_enabled()
        or not (x.requires_grad or any(p.requires_grad for p in params))
    ):
        return fn(x.to(dtype), *params)
    return _LowRankSavingInput.apply(fn, x, *params)


class _LowRankSavingInput(torch.autograd.Function):
    """`fn(x.to(float32), *params)` that saves x in its own dtype, not the float32 copy (see `_lowrank`)."""

    @staticmethod
    def forward(
        ctx: Any, fn: Callable[..., torch.Tensor], x: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        ctx.fn = fn
        ctx.save_for_backward(x, *params)
        return fn(x.to(params[0].dtype), *params)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = grad_outputs
        x, *params = ctx.saved_tensors
        wants = ctx.needs_input_grad[1:]  # x, then each parameter
        with torch.enable_grad():
            h = x.detach().to(params[0].dtype).requires_grad_(wants[0])
            leaves = [p.detach().requires_grad_(w) for p, w in zip(params, wants[1:], strict=True)]
            inputs = [t for t in (h, *leaves) if t.requires_grad]
            out = ctx.fn(h, *leaves)
            found = torch.autograd.grad(out, inputs, grad, allow_unused=True) if inputs else ()
        grads = iter(g if g is not None else torch.zeros_like(t) for g, t in zip(found, inputs, strict=True))
        dx = next(grads).to(x.dtype) if wants[0] else None
        return (None, dx, *(next(grads) if w else None for w in wants[1:]))
