"""A run's checkpoint content, copied out of the run: adapter tensors under PEFT's names, the optimizer
state, and the PEFT config that loads them."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from eztinker.engine.checkpoint.disk import check_checkpoint_path, write_checkpoint
from eztinker.engine.checkpoint.format import (
    FORMAT_VERSION,
    PEFT_PREFIX,
    CheckpointInfo,
    LoadedCheckpoint,
    ModuleNames,
    PreparedCheckpoint,
    _translate_targets,
    translate_module_name,
)
from eztinker.engine.errors import InvalidInputError
from eztinker.engine.families import short_targets
from eztinker.engine.lora import ExpertWeight, output_head_path, peft_module_names
from eztinker.engine.optimizers import optimizer_config

if TYPE_CHECKING:
    from eztinker.engine.run import TrainingRun


# --- saving ------------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | Path, run: TrainingRun, *, kind: Literal["state", "weights"]
) -> CheckpointInfo:
    """Write `run`'s adapter (and with kind "state" its optimizer state) to the new directory `path`.

    Atomic: `path` appears complete or not at all. `ConflictError` if `path` already exists. The
    caller holds the base model's lock, so the run does not change while its tensors are copied out.
    (To hold the lock only for the copy, call `prepare_checkpoint` under it and `write_checkpoint` after.)
    """
    check_checkpoint_path(path)
    return write_checkpoint(path, prepare_checkpoint(run, kind=kind))


def prepare_checkpoint(
    run: TrainingRun, *, kind: Literal["state", "weights"], module_names: ModuleNames = "peft"
) -> PreparedCheckpoint:
    """Copy out everything a checkpoint of `run` holds (call it under the base model's lock).

    `module_names="tinker"` names the output head as Tinker's exports do (see the module docstring);
    the default names every layer by its module path, which PEFT loads.
    Everything that can fail on bad data happens here, before the first byte is written.
    """
    if kind not in ("state", "weights"):
        raise InvalidInputError("kind", f"must be 'state' or 'weights', got {kind!r}")
    if module_names not in ("peft", "tinker"):
        raise InvalidInputError("module_names", f"must be 'peft' or 'tinker', got {module_names!r}")
    # Only a Tinker-named checkpoint renames anything (the head); None leaves every name as it is.
    head = output_head_path(run.base.model) if module_names == "tinker" else None
    created_at = time.time()
    metadata = {
        "format": "eztinker-checkpoint",
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "step": run.step,
        "run_id": run.run_id,
        "base_model": run.base.name,
        "lora_config": run.lora_config.model_dump(mode="json"),
        "loss_config": run.loss_config.model_dump(mode="json"),
        "target_modules": list(run.target_modules),
        "optimizer": run.optimizer_name if kind == "state" else None,
        "optimizer_config": optimizer_config(run.optimizer_name),
        "module_names": module_names,
        "created_at": created_at,
    }
    optimizer = _optimizer_tensors(run) if kind == "state" else None
    config = _peft_config_dict(run)
    config["target_modules"] = _translate_targets(config["target_modules"], head, "tinker")
    return PreparedCheckpoint(
        kind=kind,
        step=run.step,
        base_model=run.base.name,
        created_at=created_at,
        adapter={translate_module_name(k, head, "tinker"): v for k, v in _adapter_tensors(run).items()},
        optimizer=None
        if optimizer is None
        else {translate_module_name(k, head, "tinker"): v for k, v in optimizer.items()},
        adapter_config_json=json.dumps(config, indent=2, sort_keys=True),
        metadata_json=json.dumps(metadata, indent=2, sort_keys=True),
    )


def _adapter_tensors(run: TrainingRun) -> dict[str, torch.Tensor]:
    """PEFT's state dict of the run's adapter: CPU copies, contiguous, nothing shared with the run."""
    tensors: dict[str, torch.Tensor] = {}
    names = _peft_names(run)
    for module_path in sorted(run.slots):
        slot = run.slots[module_path]
        tensors[f"{PEFT_PREFIX}{names[module_path]}.lora_A.weight"] = _cpu_copy(slot.lora_A)
        tensors[f"{PEFT_PREFIX}{names[module_path]}.lora_B.weight"] = _cpu_copy(slot.lora_B)
    return tensors


def _peft_names(run: TrainingRun) -> dict[str, str]:
    """The run's layer paths -> the module names PEFT saves their LoRA under (a fused expert weight's
    `ParamWrapper`: `mlp.experts` / `mlp.experts.base_layer`; a linear layer: its own path)."""
    return peft_module_names(sorted(run.slots), run.base.lora_layers)


def with_layer_paths(loaded: LoadedCheckpoint, run: TrainingRun) -> LoadedCheckpoint:
    """`loaded` with PEFT's module names of `run`'s fused expert weights turned back into their parameter
    paths (the run's layer paths). Names that are not the run's stay as they are."""
    back = {peft: path for path, peft in _peft_names(run).items() if peft != path}
    if not back:
        return loaded

    def rename(key: str) -> str:
        module, dot, rest = key.rpartition(".")  # "<name>.lora_A" -> ("<name>", "lora_A")
        return back.get(module, module) + dot + rest

    tensors = {back.get(p, p): ab for p, ab in loaded.tensors.items()}
    optimizer = None if loaded.optimizer is None else {rename(k): v for k, v in loaded.optimizer.items()}
    return dataclasses.replace(loaded, tensors=tensors, optimizer=optimizer)


def _optimizer_tensors(run: TrainingRun) -> dict[str, torch.Tensor]:
    """`<module path>.lora_A.<stat>` -> tensor, for every parameter the optimizer has state for."""
    tensors: dict[str, torch.Tensor] = {}
    names = _peft_names(run)
    for key, param in _named_params(run).items():
        state = run.optimizer.state.get(param)
        if not state:
            continue
        module_path, _, which = key.rpartition(".")
        for stat, value in state.items():
            if not isinstance(value, torch.Tensor):  # torch keeps only tensors for AdamW; be safe
                value = torch.tensor(float(value), dtype=torch.float32)
            tensors[f"{names[module_path]}.{which}.{stat}"] = _cpu_copy(value)
    return tensors


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True).contiguous()


def _named_params(run: TrainingRun) -> dict[str, torch.nn.Parameter]:
    """`<module path>.lora_A` / `.lora_B` -> the run's parameter, in the optimizer's order."""
    named: dict[str, torch.nn.Parameter] = {}
    for module_path in sorted(run.slots):
        slot = run.slots[module_path]
        named[f"{module_path}.lora_A"] = slot.lora_A
        named[f"{module_path}.lora_B"] = slot.lora_B
    return named


def _peft_config_dict(run: TrainingRun) -> dict[str, Any]:
    """adapter_config.json's content, from `peft.LoraConfig` and its own serialisation."""
    from peft import LoraConfig  # heavy import, only needed when saving

    config = run.lora_config
    layers = [run.base.lora_layers[p] for p in run.slots if p in run.base.lora_layers]
    experts = sorted(p for p in run.slots if isinstance(run.base.lora_layers.get(p), ExpertWeight))
    linear = [layer for layer in layers if not isinstance(layer, ExpertWeight)]
    # PEFT annotates lora_alpha as int but computes with any number: an integral alpha is written as an
    # int (what PEFT writes), a fractional one as is.
    alpha: Any = int(config.lora_alpha) if float(config.lora_alpha).is_integer() else config.lora_alpha
    target_modules = _peft_target_modules(run)
    # Fused expert weights as PEFT's target_parameters (a ParamWrapper per weight, per-expert factors).
    target_parameters = short_targets(experts, _all_expert_paths(run)) if experts else []
    reread = _v4_renamed_targets(run, target_modules)
    if reread:  # linear layers PEFT would take for pre-v5 expert names: name their weights instead
        paths = [p for p in run.slots if p not in experts and p.rsplit(".", 1)[-1] in reread]
        universe = [f"{p}.weight" for p, expert in _adaptable(run).items() if not expert]
        target_parameters += short_targets([f"{p}.weight" for p in paths], universe)
        kept = [p for p in run.slots if p not in experts and p not in paths]
        target_modules = short_targets(kept, [p for p, e in _adaptable(run).items() if not e]) if kept else []
    peft_config = LoraConfig(
        r=config.r,
        lora_alpha=alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target_modules or None,
        target_parameters=target_parameters or None,
        fan_in_fan_out=bool(linear) and all(layer.fan_in_fan_out for layer in linear),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=run.base.name,
        inference_mode=True,  # as PeftModel.save_pretrained writes it
    )
    out = peft_config.to_dict()
    for key, value in out.items():  # as PeftConfigMixin.save_pretrained does: sets become lists
        if isinstance(value, set):
            out[key] = sorted(value)
    return out


def _peft_target_modules(run: TrainingRun) -> list[str]:
    """The run's short layer names if PEFT would resolve them to exactly the run's layers; else the paths.

    Short names (`q_proj`) keep the config readable and match what users write; but a run made from
    full module paths, or a subset of layers, must not grow adapters on other layers once loaded by PEFT.
    """
    paths = {p for p in run.slots if not isinstance(run.base.lora_layers.get(p), ExpertWeight)}
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    if not paths:
        return []
    matched = {
        path
        for path, _ in run.base.model.named_modules()
        if path
        and any(path == n or path.endswith("." + n) for n in names)
        and ".base_layer" not in path  # inside our LoRA wrappers: PEFT never sees these
    }
    return names if matched == paths else sorted(paths)


def _adaptable(run: TrainingRun) -> dict[str, bool]:
    from eztinker.engine.lora import adaptable_layers

    return adaptable_layers(run.base.model, include_head=True)


def _all_expert_paths(run: TrainingRun) -> list[str]:
    return [p for p, expert in _adaptable(run).items() if expert]


def _v4_renamed_targets(run: TrainingRun, target_modules: list[str]) -> set[str]:
    """The layer names in `target_modules` that PEFT, loading the adapter, would read as transformers-v4 MoE
    expert names and retarget onto fused expert weights (`gate_proj` / `up_proj` / `down_proj` of DeepSeek-V3,
    Qwen3-MoE and the other "qwen2_moe"-style families): PEFT's own conversion, run on a copy of the config."""
    if not target_modules:
        return set()
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # a PEFT without the conversion renames nothing
        return set()
    probe = LoraConfig(r=run.lora_config.r, target_modules=list(target_modules))
    convert_peft_config_for_transformers(probe, model=run.base.model, conversions=None)
    kept = set(probe.target_modules or ())
    return {t.rsplit(".", 1)[-1] for t in target_modules if t not in kept}
