"""Export: an adapter merged into its base model's weights, as a plain Hugging Face model directory."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers.pytorch_utils import Conv1D

from eztinker.engine.checkpoint.format import _TEMP_MARK, LoadedCheckpoint, with_model_names
from eztinker.engine.checkpoint.read import _invalid, read_checkpoint
from eztinker.engine.errors import ConflictError, InvalidInputError, NotFoundError
from eztinker.engine.lora import output_head_path

if TYPE_CHECKING:
    pass


# --- export ------------------------------------------------------------------------------------------


def merge_into_base(adapter_dir: str | Path, base_model: str, out_dir: str | Path) -> Path:
    """Write a full Hugging Face model directory: `base_model` with the adapter merged into its weights.

    Every adapted weight W becomes W + (lora_alpha / r)·B·A (transposed for GPT-2's Conv1D), in fp32:
    the merged model computes what the base with the adapter computes (and `PeftModel` with it). The
    adapter may be any directory `read_checkpoint` accepts, in either naming of the head.

    A base that ties its output head to its input embedding (`tie_word_embeddings`) is untied first when
    the adapter changes the head: the head gets its own copy of the weight, and the delta; the input
    embedding keeps the base's values, as in the adapted model. Merging into the shared weight would
    move every input embedding too. The tokenizer is copied along, and a vision-language base's image
    processor (without it the merged model takes no images). Written atomically like a checkpoint.
    """
    from transformers import AutoTokenizer

    from eztinker.engine.model import _from_pretrained, _source_kwargs

    target = Path(out_dir)
    if target.exists() and any(target.iterdir()):
        raise ConflictError(f"{target} already exists and is not empty")
    loaded = read_checkpoint(adapter_dir)
    source, extra = _source_kwargs(base_model)
    model = _from_pretrained(source, torch.float32, extra)
    head_path = output_head_path(model)
    loaded = with_model_names(loaded, head_path)
    experts = _expert_weights_of(model, loaded)  # PEFT's module name -> fused expert weight path
    if head_path is not None and head_path in loaded.tensors:
        _untie_output_head(model)
    scaling = loaded.lora_config.lora_alpha / loaded.lora_config.r
    with torch.no_grad():
        for module_path, (a, b) in sorted(loaded.tensors.items()):
            if module_path in experts:
                _merge_experts(model, experts[module_path], a, b, scaling, loaded.path)
                continue
            weight = _mergeable_weight(model, module_path, loaded.path)
            delta = (b.to(torch.float32) @ a.to(torch.float32)) * scaling  # (out, in)
            if isinstance(model.get_submodule(module_path), Conv1D):  # stored (in, out)
                delta = delta.T
            if tuple(delta.shape) != tuple(weight.shape):
                raise _invalid(
                    loaded.path,
                    f"layer {module_path} has a delta of shape {tuple(delta.shape)} but the base's weight "
                    f"is {tuple(weight.shape)}: the adapter was not trained on {base_model!r}",
                )
            weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
    if getattr(model.config, "quantization_config", None) is not None:  # a dequantised GGUF saves as plain
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    if tokenizer is None:
        raise NotFoundError(f"base model {base_model!r} has no tokenizer files")
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f".{target.name}{_TEMP_MARK}{uuid.uuid4().hex[:12]}"
    try:
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        _save_image_processor(model, source, extra, temp)
        if target.exists():
            target.rmdir()  # empty, checked above
        os.rename(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return target


def _save_image_processor(model: Any, source: str, extra: dict, out: Path) -> None:
    """Save the base's image processor into `out` if the base takes images and has one."""
    config = model.config
    if getattr(config, "vision_config", None) is None or getattr(config, "image_token_id", None) is None:
        return
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(source, **extra)
    except (OSError, ValueError):  # a multimodal family's text-only checkpoint: no processor files
        return
    processor.save_pretrained(out)


def _expert_weights_of(model: torch.nn.Module, loaded: LoadedCheckpoint) -> dict[str, str]:
    """PEFT's module names of the checkpoint's fused expert weights -> their parameter paths in `model`."""
    from eztinker.engine.lora import adaptable_layers, expert_peft_names, resolve_targets

    targets = loaded.lora_config.target_modules
    all_experts = {p for p, expert in adaptable_layers(model).items() if expert}
    if not all_experts:
        return {}
    try:  # None: the family default, which adapts every expert weight
        chosen = (
            sorted(all_experts)
            if targets is None
            else [p for p in resolve_targets(model, targets) if p in all_experts]
        )
    except InvalidInputError:  # a target of another model: reported when its layer is merged
        return {}
    return {peft: path for path, peft in expert_peft_names(model, chosen).items()}


def _merge_experts(
    model: torch.nn.Module, path: str, a: torch.Tensor, b: torch.Tensor, scaling: float, root: Path
) -> None:
    """W_e += scaling · B_e · A_e for every expert e of the fused weight at `path` (PEFT's factor layout)."""
    owner_path, _, name = path.rpartition(".")
    owner = model.get_submodule(owner_path)
    weight = getattr(owner, name)
    num_experts = weight.shape[0]
    rank = a.shape[0] // num_experts
    a_e = a.to(torch.float32).reshape(num_experts, rank, a.shape[1])  # (E, r, in)
    b_e = b.to(torch.float32).reshape(b.shape[0], rank, num_experts).permute(2, 0, 1)  # (E, out, r)
    delta = (b_e @ a_e) * scaling  # (E, out, in)
    if getattr(owner, "is_transposed", False):  # stored (E, in, out)
        delta = delta.transpose(1, 2)
    if tuple(delta.shape) != tuple(weight.shape):
        raise _invalid(
            root, f"expert weight {path} has a delta of shape {tuple(delta.shape)}, not {tuple(weight.shape)}"
        )
    weight.add_(delta.to(device=weight.device, dtype=weight.dtype))


def _mergeable_weight(model: torch.nn.Module, module_path: str, root: Path) -> torch.Tensor:
    """The weight of the linear layer at `module_path`, which an adapter layer merges into."""
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        raise _invalid(root, f"adapts layer {module_path}, which the base model does not have") from None
    weight = getattr(module, "weight", None)
    if not isinstance(module, torch.nn.Linear | Conv1D) or not isinstance(weight, torch.Tensor):
        raise _invalid(root, f"adapts {module_path}, which is a {type(module).__name__}, not a linear layer")
    return weight


def _untie_output_head(model: Any) -> None:
    """Give the output head its own weight if it shares the input embedding's, and say so in the config
    (so `save_pretrained` writes it and `from_pretrained` does not tie it again)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embedding is None or head.weight is not embedding.weight:
        return
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
