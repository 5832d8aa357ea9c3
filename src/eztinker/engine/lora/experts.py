"""LoRA on fused MoE expert weights: `ExpertWeight` per adapted 3-D weight, `LoRAExperts` around the
experts module, and the grouped projections that apply each (token, expert) pair's own adapter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eztinker.engine.lora.layer import _MAX_PLANS, LoRALinear, LoRAWeights, Routing, Segment, _to_device

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
