"""Many LoRA adapters on one frozen base model: base output + a routed low-rank delta.

Every targeted linear layer of the base model is wrapped once in a `LoRALinear`; every MoE experts module
with a targeted fused weight is wrapped once in a `LoRAExperts`, which holds one `ExpertWeight` per
adapted 3-D weight (`gate_up_proj`, `down_proj`). A layer holds one `LoRAWeights` slot per adapter (a
run's live adapter, or a frozen sampler snapshot) and a reference to the base model's shared `Routing`,
which says — for the forward pass under way — which adapter serves which rows of the batch. So one pass
can serve several runs at once, and a run costs only its own A and B.

The maths is PEFT's, so a saved adapter loads into `peft.PeftModel` unchanged:

    linear:  y = base(x) + lora_B(lora_A(dropout(x))) * lora_alpha / r       A: (r, in), B: (out, r)
    experts: W_e' = W_e + (lora_alpha / r) · B_e · A_e  for every expert e, as PEFT's `target_parameters`
             stores it: A (E·r, in) with expert e's rows at [e·r, (e+1)·r), B (out, r·E) with expert e's
             rank k at column k·E + e (`peft.tuners.lora.ParamWrapper`); no dropout (PEFT has none there)

Adapters are kept in float32 whatever the base dtype (as PEFT does): their gradients and the optimizer's
state are float32, a linear layer's low-rank products run in float32, and the delta is added to the base
output in float32 and rounded once to the base dtype (PEFT's order). With a bf16 base the layer input is
kept for backward in bf16, not as a float32 copy (`_lowrank`). A co-batched pass computes every row's
delta with a fixed number of kernels per layer whatever the number of adapters, from index tensors built
once per row layout, so no layer reads from or waits for the host (see "the co-batched dense delta").

Expert LoRA in a co-batched pass: the experts module's own router picks each token's top-k experts (so
routing is per row: a run's attention LoRA changes its own tokens' routing only); the (token, expert)
pairs are sorted by (expert, the token's adapter) and each projection computes x·(W_e + ΔW_e)ᵀ with the
pair's own adapter's ΔW_e, before the expert's activation — so a run's result equals running it alone.
Two equal ways, chosen per projection by cost (`_expert_projection`): one grouped matmul computes every
pair's base projection (groups by expert) and two more its low-rank delta (groups by expert × adapter,
each with its adapter's factors, ranks zero-padded to the largest) — the way for large experts, which
never copies them; or, when the pass has more rows than the experts have weights, the delta weights are
formed per (expert, adapter) and one grouped matmul runs with W_e + ΔW_e, as PEFT does. On CUDA the
low-rank products run in bf16 (`_expert_factors_dtype`: the one dtype of torch's fast grouped matmul);
group offsets come from `searchsorted` on the sorted keys, never read back to the host.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from eztinker.engine.errors import InvalidInputError
from eztinker.engine.families import LINEAR_TYPES, expert_weight_names, is_vision_path

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


# --- MoE experts ------------------------------------------------------------------------------------


class ExpertWeight:
    """The LoRA slots of one fused expert weight (E, ·, ·) of a `LoRAExperts` module.

    `in_features` / `out_features` are one expert's, in the direction the projection applies (PEFT's
    convention: `x (·, in) -> (·, out)`, whatever the storage order of the 3-D weight).
    """

    fan_in_fan_out = False

    def __init__(self, owner: LoRAExperts, name: str, path: str) -> None:
        self.owner = owner
        self.name = name  # "gate_up_proj", "up_proj" or "down_proj"
        self.path = path  # the weight's parameter path, e.g. "model.layers.0.mlp.experts.gate_up_proj"
        weight = getattr(owner.base_layer, name)
        num_experts, first, second = weight.shape
        transposed = bool(getattr(owner.base_layer, "is_transposed", False))
        self.num_experts = int(num_experts)
        self.in_features, self.out_features = (first, second) if transposed else (second, first)
        self.adapters: dict[str, LoRAWeights] = {}

    @property
    def device(self) -> torch.device:
        return getattr(self.owner.base_layer, self.name).device


class LoRAExperts(nn.Module):
    """A frozen MoE experts module (fused 3-D weights) plus routed per-expert LoRA slots on its weights."""

    base_layer: nn.Module
    routing: Routing
    path: str
    weights: dict[str, ExpertWeight]

    def __init__(self, base_layer: nn.Module, routing: Routing, path: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.path = path  # module path of the experts, e.g. "model.layers.0.mlp.experts"
        self.weights = {}  # weight name -> its slots, for the weights some run adapts
        object.__setattr__(self, "routing", routing)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # what the MoE block (or a load-balancing loss) reads off its experts
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None:
                raise
            return getattr(base, name)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        segments = self.routing.segments
        names: list[str] = []
        for seg in segments:
            adapter = seg.adapter
            if (
                adapter is not None
                and adapter not in names
                and any(adapter in w.adapters for w in self.weights.values())
            ):
                names.append(adapter)
        if not names:
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        return _routed_experts(self, hidden_states, top_k_index, top_k_weights, names)


def _routed_experts(
    module: LoRAExperts,
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    names: list[str],
) -> torch.Tensor:
    """The experts' output with each token's adapter's expert deltas (see the module docstring).

    Follows transformers' grouped-matmul experts forward (`integrations.moe`), so the base part computes
    what the model computes without adapters.
    """
    experts: Any = module.base_layer
    segments = module.routing.segments
    num_tokens = x.shape[0]
    rows = module.routing.rows
    if num_tokens % rows:
        raise RuntimeError(f"experts got {num_tokens} tokens for a batch of {rows} rows")
    per_row = num_tokens // rows
    group_of = {name: g for g, name in enumerate(names)}
    groups = len(names) + (1 if any(seg.adapter not in group_of for seg in segments) else 0)
    row_group = _expert_row_groups(module.routing, segments, group_of, x.device)
    num_experts = int(experts.num_experts)
    top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    key = expert_ids * groups + row_group.repeat_interleave(per_row * top_k)  # a pair's row: p // (T·k)
    key_sorted, perm = torch.sort(key, stable=True)
    expert_sorted = key_sorted // groups
    base_offsets = _run_ends(expert_sorted, num_experts)
    lora_offsets = _run_ends(key_sorted, num_experts * groups)
    x_g = x[perm // top_k]

    up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    grouping = _Grouping(base_offsets, lora_offsets, expert_sorted, names, groups)
    h = _expert_projection(experts, up_name, module.weights.get(up_name), x_g, grouping)
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    out = _expert_projection(experts, "down_proj", module.weights.get("down_proj"), h, grouping)
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.shape[0], device=perm.device)
    final = out[inverse].view(num_tokens, top_k, -1).sum(dim=1)
    return final.to(x.dtype)


def _expert_row_groups(
    routing: Routing, segments: Sequence[Segment], group_of: dict[str, int], device: torch.device
) -> torch.Tensor:
    """(B,) each row's adapter group (`len(group_of)`: none), on `device`, cached by layout like `_row_plan`."""
    layout = tuple((seg.start, seg.stop, group_of.get(seg.adapter or "", len(group_of))) for seg in segments)
    key = ("experts", device, layout)
    row_group = routing.plans.get(key)
    if row_group is None:
        host = torch.empty(layout[-1][1], dtype=torch.long)
        for start, stop, g in layout:
            host[start:stop] = g
        if len(routing.plans) >= _MAX_PLANS:
            routing.plans.clear()
        row_group = routing.plans[key] = _to_device(host, device)
    return row_group


def _run_ends(sorted_keys: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) int32: where the run of each key 0..n-1 ends in `sorted_keys` — `bincount(…).cumsum()`, but
    with a fixed output size: CUDA's bincount reads the largest key back to the host (a sync) first."""
    keys = torch.arange(n, device=sorted_keys.device, dtype=sorted_keys.dtype)
    return torch.searchsorted(sorted_keys, keys, right=True).to(torch.int32)


MERGE_EXPERTS_BELOW = 1.0
"""Form W_e + ΔW_e when the delta weights cost at most this many times the low-rank path (see
`_expert_projection`); 0 never forms them, infinity always does."""


@dataclass
class _Grouping:
    """How a pass's (token, expert) pairs are sorted: by expert, then by the token's adapter group."""

    base_offsets: torch.Tensor  # (E,) end of each expert's rows
    lora_offsets: torch.Tensor  # (E·groups,) end of each (expert, adapter group)'s rows
    expert_of_row: torch.Tensor  # (S,)
    names: list[str]  # the adapters of groups 0..len-1; a last group, if any, has none
    groups: int


def _expert_projection(
    experts: Any, name: str, weight: ExpertWeight | None, x: torch.Tensor, grouping: _Grouping
) -> torch.Tensor:
    """One projection (`gate_up_proj` / `up_proj` / `down_proj`) of the sorted rows, each row's adapter's
    expert delta included.

    Two equal ways (x·(W_e + ΔW_e)ᵀ = x·W_eᵀ + (x·A_eᵀ)·B_eᵀ), chosen by cost: when the rows outnumber the
    weights — G·E·in·out ≤ S·(in + out), typically small experts or short passes — the delta weights are
    formed (as PEFT does) and one grouped matmul runs with W_e + ΔW_e per (expert, adapter group); else the
    base grouped matmul plus two low-rank grouped matmuls, which never hold a copy of the experts.
    """
    base = getattr(experts, name)
    bias = getattr(experts, f"{name}_bias") if experts.has_bias else None
    transposed = bool(experts.is_transposed)
    if weight is None:
        return _expert_linear(x, base, grouping.base_offsets, bias, grouping.expert_of_row, transposed)
    cells = grouping.groups * weight.num_experts * weight.in_features * weight.out_features
    if cells <= MERGE_EXPERTS_BELOW * x.shape[0] * (weight.in_features + weight.out_features):
        merged = _merged_expert_weights(base, weight, grouping.names, grouping.groups, transposed)
        return _expert_linear(x, merged, grouping.lora_offsets, bias, grouping.expert_of_row, transposed)
    out = _expert_linear(x, base, grouping.base_offsets, bias, grouping.expert_of_row, transposed)
    delta = _expert_delta(x, weight, grouping.names, grouping.groups, grouping.lora_offsets)
    return out + delta.to(out.dtype)


def _merged_expert_weights(
    base: torch.Tensor, weight: ExpertWeight, names: list[str], groups: int, transposed: bool
) -> torch.Tensor:
    """(E·groups, ·, ·) in the base weight's layout: W_e + scaling·B_e·A_e of group g's adapter (W_e alone
    for a group without one), in the base weight's dtype (as PEFT forms it)."""
    num_experts, fan_in, fan_out = weight.num_experts, weight.in_features, weight.out_features
    parts = []
    for g in range(groups):
        slot = weight.adapters.get(names[g]) if g < len(names) else None
        if slot is None:
            parts.append(base)
            continue
        a = slot.lora_A.view(num_experts, slot.rank, fan_in)  # (E, r, in)
        b = slot.lora_B.view(fan_out, slot.rank, num_experts).permute(2, 0, 1)  # (E, out, r)
        delta = (b @ a) * slot.scaling  # (E, out, in)
        parts.append(base + (delta.transpose(1, 2) if transposed else delta).to(base.dtype))
    if groups == 1:
        return parts[0]
    return torch.stack(parts, dim=1).reshape(num_experts * groups, *base.shape[1:])


def _expert_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    expert_of_row: torch.Tensor,
    transposed: bool,
) -> torch.Tensor:
    """Rows grouped by expert (`offsets`) times their expert's weight, (E, in, out) if `transposed`,
    else (E, out, in), plus the expert's bias."""
    out = _grouped_mm(x.to(weight.dtype), weight if transposed else weight.transpose(-2, -1), offsets)
    return out if bias is None else out + bias[expert_of_row]


def _expert_delta(
    x: torch.Tensor, weight: ExpertWeight, names: list[str], groups: int, offsets: torch.Tensor
) -> torch.Tensor:
    """Each row's delta from its adapter's factors for its expert: rows grouped by (expert, adapter).

    Group e·groups + g uses adapter `names[g]`'s A_eᵀ (in, R) and scaling·B_eᵀ (R, out), ranks zero-padded
    to R (exact zeros); an adapter without a slot here, and the last group when some rows have no adapter,
    use zeros.
    """
    num_experts, fan_in, fan_out = weight.num_experts, weight.in_features, weight.out_features
    slots = [weight.adapters.get(name) for name in names] + [None] * (groups - len(names))
    present = [s for s in slots if s is not None]
    dtype = _expert_factors_dtype(x, present[0].lora_A.dtype)
    # Pad ranks so every matrix row is a multiple of 16 bytes, as grouped matmul kernels want.
    multiple = max(1, 16 // (torch.finfo(dtype).bits // 8))
    rank = -(-max(s.rank for s in present) // multiple) * multiple
    a_parts, b_parts = [], []
    for slot in slots:
        if slot is None:
            a_parts.append(x.new_zeros(num_experts, fan_in, rank, dtype=dtype))
            b_parts.append(x.new_zeros(num_experts, rank, fan_out, dtype=dtype))
            continue
        r = slot.rank
        a = slot.lora_A.view(num_experts, r, fan_in).transpose(1, 2)  # (E, in, r)
        b = slot.lora_B.view(fan_out, r, num_experts).permute(2, 1, 0) * slot.scaling  # (E, r, out)
        a_parts.append(F.pad(a, (0, rank - r)))
        b_parts.append(F.pad(b, (0, 0, 0, rank - r)))
    a_g = torch.stack(a_parts, dim=1).reshape(num_experts * groups, fan_in, rank).to(dtype)
    b_g = torch.stack(b_parts, dim=1).reshape(num_experts * groups, rank, fan_out).to(dtype)
    lowrank = _grouped_mm(x.to(dtype), a_g, offsets)
    return _grouped_mm(lowrank, b_g, offsets)


EXPERT_FACTORS_DTYPE: torch.dtype | None = None
"""The dtype of the expert low-rank products (None: `_expert_factors_dtype` chooses; tests pin one)."""


def _expert_factors_dtype(x: torch.Tensor, lora_dtype: torch.dtype) -> torch.dtype:
    """The adapters' float32 where torch's grouped matmul runs in it (CPU), else the base dtype where it
    runs in that (bf16 on CUDA: the only dtype of its fast kernel), else float32 (the per-group loop).

    On CUDA a float32 grouped matmul would fall back to one matmul per (expert, adapter) group after
    reading the offsets back to the host; E·G small matmuls per projection per layer cost far more than
    bf16 rounding of the factors and of x·Aᵀ (accumulated in float32 by the kernel). The factors stay
    float32 parameters with float32 gradients, and this is still finer than PEFT's way for experts (and
    the "merged" way here), which rounds W_e + ΔW_e to bf16."""
    if EXPERT_FACTORS_DTYPE is not None:
        return EXPERT_FACTORS_DTYPE
    if _grouped_mm_runs(x.device, lora_dtype) or not _grouped_mm_runs(x.device, x.dtype):
        return lora_dtype
    return x.dtype


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows [offsets[g-1], offsets[g]) of x (S, in) times weight[g] (in, out): torch's grouped matmul where
    it runs (CPU; bf16 on CUDA; 16-byte aligned rows), else one matmul per non-empty group."""
    if _fast_grouped_mm(x, weight):
        return F.grouped_mm(x, weight, offs=offsets)
    pieces = []
    start = 0
    for group, stop in enumerate(offsets.tolist()):  # the fallback's one host sync per call
        if stop > start:
            pieces.append(x[start:stop] @ weight[group])
        start = stop
    if start < x.shape[0]:  # rows past the last group: none in this module's use
        pieces.append(x.new_zeros(x.shape[0] - start, weight.shape[-1]))
    return torch.cat(pieces) if pieces else x.new_zeros(0, weight.shape[-1])


def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped matmul has a kernel for `dtype` on `device` (CPU: any; CUDA: bf16, sm80+)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu"


def _fast_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.dtype != weight.dtype or not _grouped_mm_runs(x.device, x.dtype):
        return False
    size = x.element_size()
    return (
        x.shape[-1] * size % 16 == 0
        and weight.shape[-1] * size % 16 == 0
        and weight.shape[-2] * size % 16 == 0
        and x.data_ptr() % 16 == 0
        and weight.data_ptr() % 16 == 0
    )


AdaptedLayer = LoRALinear | ExpertWeight
"""A layer LoRA adapts: a wrapped linear layer, or one fused expert weight of a wrapped experts module."""


# --- resolving targets -------------------------------------------------------------------------------


def adaptable_layers(model: nn.Module, *, include_head: bool = False) -> dict[str, bool]:
    """Every weight LoRA can target, by path -> whether it is a fused expert weight; the output head only
    if `include_head`.

    Linear layers go by module path, fused expert weights (`mlp.experts.gate_up_proj`) by parameter path.
    The vision tower of a multimodal model is never adaptable (its rows are image patches, not the batch's
    sequences). The head (unembedding) is left out of "all-linear" and of family defaults, as PEFT does;
    naming it (Tinker's `train_unembed`, or `target_modules=["lm_head"]`) adapts it like any other linear
    layer, and PEFT loads the saved adapter unchanged (`base_model.model.lm_head.lora_A.weight`).
    """
    head = output_head_path(model)
    found: dict[str, bool] = {}
    for path, module in model.named_modules():
        if path.endswith(".base_layer") or ".base_layer." in path or is_vision_path(path):
            continue
        if isinstance(module, LoRAExperts):
            names = expert_weight_names(module.base_layer)
        elif isinstance(module, (LoRALinear, *ADAPTABLE_TYPES)):
            if include_head or path != head:
                found[path] = False
            continue
        else:
            names = expert_weight_names(module)
        for name in names:
            found[f"{path}.{name}" if path else name] = True
    return found


def output_head_path(model: nn.Module) -> str | None:
    """The module path of `model`'s output head (unembedding; `lm_head` in most families), wrapped in a
    `LoRALinear` or not; None if the model has none."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return None
    for path, module in model.named_modules():
        if module is head or getattr(module, "base_layer", None) is head:
            return path
    return None


def _matches(path: str, target: str, expert: bool) -> bool:
    """PEFT's rule: a name equals the path or ends it; a target naming an experts module (`experts`,
    `mlp.experts`) also matches its fused weights."""
    if path == target or path.endswith("." + target):
        return True
    parent = path.rpartition(".")[0]
    return expert and (parent == target or parent.endswith("." + target))


def resolve_targets(model: nn.Module, target_modules: Sequence[str] | str) -> list[str]:
    """Paths matched by `target_modules` (PEFT's rule: a name equals the path or ends it).

    "all-linear" is every linear layer and fused expert weight but the output head; a list may name it.
    """
    if target_modules == "all-linear":
        return sorted(adaptable_layers(model))
    layers = adaptable_layers(model, include_head=True)
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    paths = [p for p, expert in layers.items() if any(_matches(p, t, expert) for t in target_modules)]
    if not paths:
        names = sorted({p.rsplit(".", 1)[-1] for p in layers})
        raise InvalidInputError(
            "lora_config.target_modules",
            f"{list(target_modules)} matched no linear layer of this model; its layer names are {names}",
        )
    unmatched = [t for t in target_modules if not any(_matches(p, t, layers[p]) for p in paths)]
    if unmatched:
        raise InvalidInputError(
            "lora_config.target_modules", f"{unmatched} matched no linear layer of this model"
        )
    return sorted(paths)


def wrap_layers(model: nn.Module, paths: Sequence[str], routing: Routing) -> dict[str, AdaptedLayer]:
    """Wrap each layer at `paths` for LoRA (once; already-wrapped layers are returned as they are).

    A linear layer becomes a `LoRALinear`; a fused expert weight's experts module becomes a `LoRAExperts`
    and the weight one of its `ExpertWeight`s.
    """
    wrapped: dict[str, AdaptedLayer] = {}
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if isinstance(parent, LoRAExperts) or expert_weight_names(parent):
            experts = (
                parent if isinstance(parent, LoRAExperts) else _wrap_experts(model, parent_path, routing)
            )
            if child not in experts.weights:
                experts.weights[child] = ExpertWeight(experts, child, path)
            wrapped[path] = experts.weights[child]
            continue
        module = model.get_submodule(path)
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module, routing, path)
            setattr(parent, child, module)
        wrapped[path] = module
    return wrapped


def _wrap_experts(model: nn.Module, path: str, routing: Routing) -> LoRAExperts:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    experts = LoRAExperts(model.get_submodule(path), routing, path)
    setattr(parent, child, experts)
    return experts


# --- adapter slot life cycle -------------------------------------------------------------------------


def init_adapter(
    layers: dict[str, AdaptedLayer], name: str, r: int, lora_alpha: float, dropout: float, seed: int | None
) -> dict[str, LoRAWeights]:
    """Create adapter `name` in each layer: A ~ U(±1/sqrt(in)) (PEFT's kaiming init), B = 0.

    With a seed the initialisation is reproducible and independent of the global RNG. Fused expert
    weights take no dropout (PEFT cannot apply it there): a positive dropout with them is refused.
    """
    if dropout > 0 and any(isinstance(layer, ExpertWeight) for layer in layers.values()):
        raise InvalidInputError(
            "lora_config.lora_dropout",
            f"is {dropout}, but LoRA on MoE expert weights takes no dropout (as PEFT's target_parameters); "
            "set it to 0 or leave the experts out of target_modules",
        )
    for path, layer in layers.items():
        if name in layer.adapters:
            raise ValueError(f"adapter {name!r} already exists in {path}")
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    slots: dict[str, LoRAWeights] = {}
    for path in sorted(layers):
        layer = layers[path]
        experts = layer.num_experts if isinstance(layer, ExpertWeight) else 1
        bound = 1.0 / math.sqrt(layer.in_features)
        a = (
            torch.rand(r * experts, layer.in_features, generator=generator, dtype=torch.float32) * 2 - 1
        ) * bound
        b = torch.zeros(layer.out_features, r * experts, dtype=torch.float32)
        slot = LoRAWeights(
            lora_A=nn.Parameter(a.to(layer.device)),
            lora_B=nn.Parameter(b.to(layer.device)),
            scaling=lora_alpha / r,
            dropout=dropout,
            num_experts=experts,
        )
        layer.adapters[name] = slot
        slots[path] = slot
    return slots


def copy_adapter(layers: dict[str, AdaptedLayer], source: str, name: str) -> dict[str, LoRAWeights]:
    """A frozen copy of adapter `source` under `name` (a sampler snapshot: later training never touches it)."""
    slots: dict[str, LoRAWeights] = {}
    for path, layer in layers.items():
        src = layer.adapters.get(source)
        if src is None:
            continue
        slot = LoRAWeights(
            lora_A=nn.Parameter(src.lora_A.detach().clone(), requires_grad=False),
            lora_B=nn.Parameter(src.lora_B.detach().clone(), requires_grad=False),
            scaling=src.scaling,
            dropout=0.0,
            num_experts=src.num_experts,
        )
        layer.adapters[name] = slot
        slots[path] = slot
    return slots


def remove_adapter(layers: dict[str, AdaptedLayer], name: str) -> None:
    """Free adapter `name` from every layer (its tensors go when the last reference does)."""
    for layer in layers.values():
        layer.adapters.pop(name, None)


@contextmanager
def routed(routing: Routing, segments: Sequence[Segment], train: bool = False) -> Generator[None]:
    """Route the rows of the next forward passes to adapters; restore the previous routing after."""
    saved = (routing.segments, routing.train)
    routing.segments, routing.train = list(segments), train
    try:
        yield
    finally:
        routing.segments, routing.train = saved


# --- PEFT names -----------------------------------------------------------------------------------------


def peft_module_names(paths: Sequence[str], layers: dict[str, AdaptedLayer]) -> dict[str, str]:
    """The module name PEFT gives each adapted path's LoRA (its saved keys are `<name>.lora_A.weight`).

    A linear layer keeps its module path. PEFT wraps each targeted weight of an experts module in a
    `ParamWrapper`, the first (in the module's registration order) innermost: with gate_up_proj and
    down_proj both adapted they are `experts.base_layer` and `experts`; with one, `experts`.
    """
    experts = {p: layer.owner.base_layer for p in paths if isinstance(layer := layers.get(p), ExpertWeight)}
    names = {p: p for p in paths if p not in experts}
    names.update(_param_wrapper_names(experts, set(paths)))
    return names


def expert_peft_names(model: nn.Module, paths: Sequence[str]) -> dict[str, str]:
    """`peft_module_names` for fused expert weights of a plain (unwrapped or wrapped) model: param path ->
    PEFT's module name."""
    modules: dict[str, nn.Module] = {}
    for path in paths:
        module = model.get_submodule(path.rpartition(".")[0])
        modules[path] = module.base_layer if isinstance(module, LoRAExperts) else module
    return _param_wrapper_names(modules, set(paths))


def _param_wrapper_names(modules: dict[str, nn.Module], chosen: set[str]) -> dict[str, str]:
    names = {}
    for path, module in modules.items():
        owner, _, name = path.rpartition(".")
        targeted = [n for n in expert_weight_names(module) if f"{owner}.{n}" in chosen]
        names[path] = owner + ".base_layer" * (len(targeted) - 1 - targeted.index(name))
    return names
