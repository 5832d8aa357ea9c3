"""Model structure, in one place: what each adaptable weight of a base model is.

Every other part of EZTinker — the Tinker facade's `train_attn` / `train_mlp` / `train_unembed`, the
family defaults, checkpoints — asks this module, never the module names, which layers are attention,
MLP, MoE experts, linear attention or the unembedding. The rules read the structure transformers gives
each family (the parent module's name, the experts classes' fused 3-D weights), so a new model of a known
shape needs no entry here.

Kinds (`LayerKind`):
- `attention`: projections of softmax attention (`self_attn.q_proj`, GPT-2's `attn.c_attn`, DeepSeek's
  MLA `q_a_proj` / `q_b_proj` / `kv_a_proj_with_mqa` / `kv_b_proj` / `o_proj`).
- `linear_attention`: projections of linear-attention token mixers (Qwen3.5's gated DeltaNet
  `linear_attn.in_proj_qkv` / `in_proj_z` / `in_proj_b` / `in_proj_a` / `out_proj`).
- `mlp`: dense MLP projections, shared experts included (`mlp.gate_proj`, `shared_expert.down_proj`).
- `experts`: the fused 3-D weights of routed MoE experts (`mlp.experts.gate_up_proj`, `.down_proj`),
  adapted as PEFT's `target_parameters` does (one rank-r delta per expert).
- `router`: MoE routers and shared-expert gates that are linear layers (`mlp.gate` of Qwen2-MoE).
- `unembed`: the output head (`lm_head`).
- `vision`: anything in a vision tower or its projector; never adapted (its rows are image patches, not
  the batch's sequences, so no per-run routing applies).
- `other`: any other linear layer.

Defaults: a family's default LoRA targets are its attention, linear-attention, MLP and expert weights
(Tinker's "all layers" without the unembedding); routers, the head and the vision tower are adapted only
when named (the head through Tinker's `train_unembed`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

from torch import nn
from transformers.pytorch_utils import Conv1D

LayerKind = Literal["attention", "linear_attention", "mlp", "experts", "router", "unembed", "vision", "other"]

LINEAR_TYPES = (nn.Linear, Conv1D)
"""Module types LoRA wraps as linear layers (GPT-2's `Conv1D` is a transposed linear layer)."""

DEFAULT_KINDS: frozenset[LayerKind] = frozenset({"attention", "linear_attention", "mlp", "experts"})
"""What a run adapts when its LoRA config names no target modules."""

TINKER_KINDS: Mapping[str, frozenset[LayerKind]] = {
    "train_attn": frozenset({"attention", "linear_attention"}),
    "train_mlp": frozenset({"mlp", "experts"}),
    "train_unembed": frozenset({"unembed"}),
}
"""Tinker's LoRA flags and the kinds each one adapts (MoE experts are MLP; linear attention is attention)."""

_VISION_PARTS = frozenset(
    {"visual", "vision_tower", "vision_model", "vision_encoder", "multi_modal_projector", "mm_projector"}
)
_LINEAR_ATTENTION_PARENTS = frozenset({"linear_attn", "linear_attention"})
_ATTENTION_WORDS = ("attn", "attention")
_MLP_PARENTS = frozenset(
    {"mlp", "feed_forward", "ffn", "shared_expert", "shared_experts", "shared_mlp", "block_sparse_moe", "moe"}
)
_ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate"})
_EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


def expert_weight_names(module: nn.Module) -> tuple[str, ...]:
    """The fused 3-D expert weights of `module`, in registration order (PEFT's nesting order); () if it is
    not an experts module.

    An experts module is what transformers' `use_experts_implementation` decorates (`Qwen3MoeExperts`,
    `GptOssExperts`, `DeepseekV3Experts`, ...): it holds (num_experts, ·, ·) weights and declares
    `has_gate` / `is_transposed` / `has_bias`, which the routed LoRA forward relies on.
    """
    if not (
        hasattr(module, "has_gate") and hasattr(module, "is_transposed") and hasattr(module, "num_experts")
    ):
        return ()
    names = []
    for name, param in module.named_parameters(recurse=False):
        if name in _EXPERT_WEIGHTS and param.ndim == 3:
            names.append(name)
    return tuple(names)


def is_vision_path(path: str) -> bool:
    return any(part in _VISION_PARTS for part in path.split("."))


def layer_kind(path: str, *, head_path: str | None = None, expert: bool = False) -> LayerKind:
    """The kind of the adaptable weight at `path` (a linear layer's module path, or with `expert` a fused
    expert weight's parameter path); `head_path` is the model's output head."""
    if head_path is not None and path == head_path:
        return "unembed"
    if is_vision_path(path):
        return "vision"
    if expert:
        return "experts"
    parts = path.split(".")
    name = parts[-1]
    parent = parts[-2].lower() if len(parts) > 1 else ""
    if parent in _LINEAR_ATTENTION_PARENTS:
        return "linear_attention"
    if any(word in parent for word in _ATTENTION_WORDS):
        return "attention"
    if name in _ROUTER_NAMES and parent in _MLP_PARENTS:
        return "router"
    if parent in _MLP_PARENTS or any(p in _MLP_PARENTS for p in parent.split("_")):
        return "mlp"
    return "other"


def kinds_for_tinker_flags(*, train_attn: bool, train_mlp: bool, train_unembed: bool) -> frozenset[LayerKind]:
    """The layer kinds Tinker's three LoRA flags ask for."""
    kinds: set[LayerKind] = set()
    for flag, on in (("train_attn", train_attn), ("train_mlp", train_mlp), ("train_unembed", train_unembed)):
        if on:
            kinds |= TINKER_KINDS[flag]
    return frozenset(kinds)


def tinker_flags(kinds: Iterable[LayerKind]) -> dict[str, bool]:
    """Tinker's `train_attn` / `train_mlp` / `train_unembed` for a run that adapts layers of `kinds`."""
    present = set(kinds)
    return {flag: bool(present & wanted) for flag, wanted in TINKER_KINDS.items()}


def short_targets(paths: Iterable[str], all_paths: Iterable[str]) -> list[str]:
    """target_modules naming exactly `paths` among `all_paths` with PEFT's suffix rule, as short as possible:
    `<parent>.<name>` suffixes (three parts for expert weights), else the full paths."""
    chosen = sorted(set(paths))
    universe = sorted(set(all_paths))
    for parts in (2, 3):
        suffixes = sorted({".".join(p.split(".")[-parts:]) for p in chosen})
        matched = {p for p in universe if any(p == s or p.endswith("." + s) for s in suffixes)}
        if matched == set(chosen):
            return suffixes
    return chosen


def preferred_attn_implementation(model_class: type[nn.Module]) -> str:
    """SDPA where the family supports it, else eager attention (gpt-oss's attention sinks, for one)."""
    return "sdpa" if getattr(model_class, "_supports_sdpa", True) else "eager"
