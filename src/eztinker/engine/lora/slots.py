"""Which layers an adapter targets, wrapping them, the adapter slot life cycle (init, copy, remove,
route), and the names PEFT gives them."""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from eztinker.engine.errors import InvalidInputError
from eztinker.engine.families import expert_weight_names, is_vision_path
from eztinker.engine.lora.experts import AdaptedLayer, ExpertWeight, LoRAExperts
from eztinker.engine.lora.layer import ADAPTABLE_TYPES, LoRALinear, LoRAWeights, Routing, Segment

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
