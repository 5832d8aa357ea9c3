"""Many LoRA adapters on one frozen base model: base output + a routed low-rank delta.

Every targeted linear layer of the base model is wrapped once in a `LoRALinear`. The wrapper holds one
`LoRAWeights` slot per adapter (a run's live adapter, or a frozen sampler snapshot) and a reference to
the base model's shared `Routing`, which says — for the forward pass under way — which adapter serves
which rows of the batch. So one pass can serve several runs at once, and a run costs only its own A and B.

The maths is PEFT's, so a saved adapter loads into `peft.PeftModel` unchanged:

    y = base(x) + lora_B(lora_A(dropout(x))) * lora_alpha / r       A: (r, in), B: (out, r)

Adapters are kept in float32 whatever the base dtype (as PEFT does), and the delta is cast back to the
base output's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from eztinker.engine.errors import InvalidInputError

ADAPTABLE_TYPES = (nn.Linear, Conv1D)


@dataclass
class Segment:
    """Rows [start, stop) of the batch are served by `adapter` (None: the bare base model)."""

    adapter: str | None
    start: int
    stop: int


@dataclass
class Routing:
    """Which adapter serves which rows during the current forward pass. One per base model.

    Empty `segments` means: the bare base model for every row.
    """

    segments: list[Segment] = field(default_factory=list)
    train: bool = False  # adapter dropout is active only while training


@dataclass
class LoRAWeights:
    """One adapter's slot in one layer."""

    lora_A: nn.Parameter  # (r, in)
    lora_B: nn.Parameter  # (out, r)
    scaling: float
    dropout: float

    def delta(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """The adapter's contribution for input x (..., in) -> (..., out), in float32."""
        h = x.to(self.lora_A.dtype)
        if train and self.dropout > 0:
            h = F.dropout(h, p=self.dropout, training=True)
        return F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling


class LoRALinear(nn.Module):
    """A frozen linear layer (`nn.Linear`, or GPT-2's transposed `Conv1D`) plus routed LoRA slots."""

    base_layer: nn.Module
    routing: Routing
    adapters: dict[str, LoRAWeights]
    path: str
    fan_in_fan_out: bool
    in_features: int
    out_features: int

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        segments = self.routing.segments
        if not segments or not self.adapters:
            return y
        train = self.routing.train
        if len(segments) == 1:  # the common case: the whole batch belongs to one adapter
            slot = self.adapters.get(segments[0].adapter) if segments[0].adapter else None
            return y if slot is None else y + slot.delta(x, train).to(y.dtype)
        slots = [self.adapters.get(seg.adapter) if seg.adapter else None for seg in segments]
        if not (train and any(s is not None and s.dropout > 0 for s in slots)):
            delta = _routed_delta(x, segments, slots)
            return y if delta is None else y + delta.to(y.dtype)
        pieces = []
        for seg in segments:
            y_rows = y[seg.start : seg.stop]
            slot = self.adapters.get(seg.adapter) if seg.adapter else None
            if slot is not None:
                y_rows = y_rows + slot.delta(x[seg.start : seg.stop], train).to(y.dtype)
            pieces.append(y_rows)
        return torch.cat(pieces, dim=0)


def _routed_delta(
    x: torch.Tensor, segments: Sequence[Segment], slots: Sequence[LoRAWeights | None]
) -> torch.Tensor | None:
    """Every row's delta from its own adapter in two matmuls, whatever the number of adapters.

    A loop over segments would cost a handful of small kernels per adapter per layer; both ways here cost
    the same few kernels for any number of adapters (rows without an adapter in this layer get zero).
    """
    present = [(seg, slot) for seg, slot in zip(segments, slots, strict=True) if slot is not None]
    if not present:
        return None
    unique = list({id(slot): slot for _, slot in present}.values())
    total_rank = sum(slot.lora_A.shape[0] for slot in unique)
    h = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
    concatenate = total_rank <= _CONCAT_MAX_RANK and h.shape[1] <= _CONCAT_MAX_TOKENS
    delta = _concatenated(h, present, unique) if concatenate else _gathered(h, present)
    return delta.reshape(*x.shape[:-1], delta.shape[-1])


# Concatenating computes every adapter's ranks for every row; gathering copies each row's own A and B
# once per call. Decoding (a token or so per row) is dominated by that copy: concatenate. Training and
# prefill (many tokens per row) are dominated by the matmuls, where the unused ranks would cost up to
# 2·R/hidden of the base layer's flops (50 % for 8 rank-8 runs at hidden 256): gather. Measured on CPU.
_CONCAT_MAX_RANK = 64
_CONCAT_MAX_TOKENS = 4


def _concatenated(
    h: torch.Tensor, present: list[tuple[Segment, LoRAWeights]], unique: list[LoRAWeights]
) -> torch.Tensor:
    """All adapters side by side: x @ [A_1; A_2; …]ᵀ, masked so a row keeps its own adapter's ranks
    (times its scaling), then @ [B_1, B_2, …]ᵀ. Two plain matmuls; the masked-out products are exact zeros."""
    a = torch.cat([slot.lora_A for slot in unique])  # (R, in)
    b = torch.cat([slot.lora_B for slot in unique], dim=1)  # (out, R)
    start, offsets = 0, {}
    for slot in unique:
        offsets[id(slot)] = start
        start += slot.lora_A.shape[0]
    mask = torch.zeros(h.shape[0], a.shape[0], dtype=a.dtype)
    for seg, slot in present:
        first = offsets[id(slot)]
        mask[seg.start : seg.stop, first : first + slot.lora_A.shape[0]] = slot.scaling
    lowrank = (h.to(a.dtype) @ a.T) * mask.to(a.device)[:, None, :]  # (B, T, R)
    return lowrank @ b.T  # (B, T, out)


def _gathered(h: torch.Tensor, present: list[tuple[Segment, LoRAWeights]]) -> torch.Tensor:
    """Each row gathers its adapter's A and B (ranks zero-padded to the largest: padding adds exact zeros)
    and scaling (0 for rows without an adapter here), then two batched matmuls."""
    rank = max(slot.lora_A.shape[0] for _, slot in present)
    a = torch.stack([F.pad(slot.lora_A, (0, 0, 0, rank - slot.lora_A.shape[0])) for _, slot in present])
    b = torch.stack([F.pad(slot.lora_B, (0, rank - slot.lora_B.shape[1])) for _, slot in present])
    rows = h.shape[0]
    index, scale = [0] * rows, [0.0] * rows
    for i, (seg, slot) in enumerate(present):
        index[seg.start : seg.stop] = [i] * (seg.stop - seg.start)
        scale[seg.start : seg.stop] = [slot.scaling] * (seg.stop - seg.start)
    index_t = torch.tensor(index, device=h.device)
    scale_t = torch.tensor(scale, dtype=a.dtype, device=h.device).view(rows, 1, 1)
    lowrank = torch.bmm(h.to(a.dtype), a[index_t].transpose(1, 2)) * scale_t  # (B, T, r)
    return torch.bmm(lowrank, b[index_t].transpose(1, 2))  # (B, T, out)


# --- resolving targets -------------------------------------------------------------------------------


def adaptable_layers(model: nn.Module, *, include_head: bool = False) -> dict[str, nn.Module]:
    """Every linear layer LoRA can target, by module path; the output head only if `include_head`.

    The head (unembedding) is left out of "all-linear" and of family defaults, as PEFT does; naming it
    (Tinker's `train_unembed`, or `target_modules=["lm_head"]`) adapts it like any other linear layer,
    and PEFT loads the saved adapter unchanged (`base_model.model.lm_head.lora_A.weight`).
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            if include_head or head is None or module is not head:
                found[path] = module
        elif isinstance(module, ADAPTABLE_TYPES) and not path.endswith(".base_layer"):
            if head is not None and module is head and not include_head:
                continue
            found[path] = module
    return found


def resolve_targets(model: nn.Module, target_modules: Sequence[str] | str) -> list[str]:
    """Module paths matched by `target_modules` (PEFT's rule: a name equals the path or ends it).

    "all-linear" excludes the output head; a list may name it.
    """
    if target_modules == "all-linear":
        return sorted(adaptable_layers(model))
    layers = adaptable_layers(model, include_head=True)
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    paths = [p for p in layers if any(p == t or p.endswith("." + t) for t in target_modules)]
    if not paths:
        names = sorted({p.rsplit(".", 1)[-1] for p in layers})
        raise InvalidInputError(
            "lora_config.target_modules",
            f"{list(target_modules)} matched no linear layer of this model; its layer names are {names}",
        )
    unmatched = [t for t in target_modules if not any(p == t or p.endswith("." + t) for p in paths)]
    if unmatched:
        raise InvalidInputError(
            "lora_config.target_modules", f"{unmatched} matched no linear layer of this model"
        )
    return sorted(paths)


def wrap_layers(model: nn.Module, paths: Sequence[str], routing: Routing) -> dict[str, LoRALinear]:
    """Wrap each layer at `paths` in a LoRALinear (once; already-wrapped layers are returned as they are)."""
    wrapped: dict[str, LoRALinear] = {}
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, LoRALinear):
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            module = LoRALinear(module, routing, path)
            setattr(parent, child, module)
        wrapped[path] = module
    return wrapped


# --- adapter slot life cycle -------------------------------------------------------------------------


def init_adapter(
    layers: dict[str, LoRALinear], name: str, r: int, lora_alpha: float, dropout: float, seed: int | None
) -> dict[str, LoRAWeights]:
    """Create adapter `name` in each layer: A ~ U(±1/sqrt(in)) (PEFT's kaiming init), B = 0.

    With a seed the initialisation is reproducible and independent of the global RNG.
    """
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    slots: dict[str, LoRAWeights] = {}
    for path in sorted(layers):
        layer = layers[path]
        if name in layer.adapters:
            raise ValueError(f"adapter {name!r} already exists in {path}")
        device = layer.base_layer.weight.device
        assert isinstance(device, torch.device)
        bound = 1.0 / math.sqrt(layer.in_features)
        a = (torch.rand(r, layer.in_features, generator=generator, dtype=torch.float32) * 2 - 1) * bound
        b = torch.zeros(layer.out_features, r, dtype=torch.float32)
        slot = LoRAWeights(
            lora_A=nn.Parameter(a.to(device)),
            lora_B=nn.Parameter(b.to(device)),
            scaling=lora_alpha / r,
            dropout=dropout,
        )
        layer.adapters[name] = slot
        slots[path] = slot
    return slots


def copy_adapter(layers: dict[str, LoRALinear], source: str, name: str) -> dict[str, LoRAWeights]:
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
        )
        layer.adapters[name] = slot
        slots[path] = slot
    return slots


def remove_adapter(layers: dict[str, LoRALinear], name: str) -> None:
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

