"""The checkpoint format: its file names and constants, the records read and written, and the
translation between PEFT's and Tinker's names for the output head."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from eztinker.engine.optimizers import OptimizerName
from eztinker.models import LoRAConfig, LossFunctionConfig

if TYPE_CHECKING:
    pass

__all__ = [  # all of them re-exported by `eztinker.engine.checkpoint`
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "AGE_SUFFIX",
    "FORMAT_VERSION",
    "LEGACY_ADAPTER_WEIGHTS_FILE",
    "METADATA_FILE",
    "OPTIMIZER_FILE",
    "OPTIMIZER_STATS",
    "PEFT_PREFIX",
    "TINKER_UNEMBED",
    "CheckpointInfo",
    "LoadedCheckpoint",
    "ModuleNames",
    "PreparedCheckpoint",
    "translate_module_name",
    "with_model_names",
]


FORMAT_VERSION = 1
"""Version of the EZTinker part of the format (`eztinker.json`, `optimizer.safetensors`)."""

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_ADAPTER_WEIGHTS_FILE = "adapter_model.bin"  # PEFT < 0.7; read with torch.load(weights_only=True)
OPTIMIZER_FILE = "optimizer.safetensors"
METADATA_FILE = "eztinker.json"

PEFT_PREFIX = "base_model.model."
"""PEFT's prefix of every saved key: the model's module path follows it."""

TINKER_UNEMBED = "model.unembed_tokens"
"""Tinker's module name for the output head (unembedding) in the adapters it exports."""

AGE_SUFFIX = ".age"
"""The suffix of an age-encrypted checkpoint file (`adapter_model.safetensors.age`), as Tinker's."""

ModuleNames = Literal["peft", "tinker"]
"""How a checkpoint names the output head: by its module path (PEFT) or as Tinker does."""

OPTIMIZER_STATS = ("step", "exp_avg", "exp_avg_sq")
"""The AdamW statistics every saved parameter has (`max_exp_avg_sq` too under amsgrad)."""

_TEMP_MARK = ".eztinker-tmp-"
_TRASH_MARK = ".eztinker-del-"
_KEY_RE = re.compile(r"^(?P<path>.+)\.lora_(?P<which>[AB])\.weight$")
_SAFETENSORS_METADATA = {"format": "pt"}  # what PEFT and transformers write


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    kind: Literal["state", "weights"]
    step: int
    base_model: str | None
    created_at: float
    size_bytes: int
    optimizer_path: Path | None


@dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path
    kind: Literal["state", "weights"]
    lora_config: LoRAConfig
    base_model: str | None
    step: int
    loss_config: LossFunctionConfig | None
    # module path -> (A (r, in), B (out, r)), on the CPU as stored
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    # "<module path>.lora_A" -> {"step", "exp_avg", "exp_avg_sq"} (AdamW) or {"momentum_buffer"} (Dimuon);
    # None for an adapter without optimizer state
    optimizer: dict[str, dict[str, torch.Tensor]] | None
    created_at: float | None = None  # from eztinker.json; None for a plain PEFT adapter
    optimizer_name: OptimizerName = "adamw"  # the saving run's optimizer (whose state `optimizer` holds)


@dataclass(frozen=True)
class PreparedCheckpoint:
    """A run's checkpoint content, copied out of the run: writing it needs no lock."""

    kind: Literal["state", "weights"]
    step: int
    base_model: str
    created_at: float
    adapter: dict[str, torch.Tensor]  # PEFT keys -> CPU tensors
    optimizer: dict[str, torch.Tensor] | None  # "<path>.lora_A.<stat>" -> CPU tensors
    adapter_config_json: str
    metadata_json: str


# --- module names ------------------------------------------------------------------------------------


def translate_module_name(key: str, head: str | None, to: ModuleNames) -> str:
    """`key` with the output head named as `to` names it; the one place the two namings meet.

    `key` is a module path or starts with one (`<path>.lora_A`, `<path>.lora_A.exp_avg`, or a PEFT key
    `base_model.model.<path>.lora_A.weight`); `head` is the model's output-head path (`lm_head`; None if
    it has none: nothing is renamed). To "tinker", the head becomes `model.unembed_tokens`; to "peft",
    `model.unembed_tokens` becomes the head's path. Every other module keeps its path in both namings
    (Tinker names dense attention and MLP layers by their Hugging Face paths too).
    """
    if head is None:
        return key
    prefix = PEFT_PREFIX if key.startswith(PEFT_PREFIX) else ""
    rest = key[len(prefix) :]
    old, new = (head, TINKER_UNEMBED) if to == "tinker" else (TINKER_UNEMBED, head)
    if rest == old or rest.startswith(old + "."):
        return prefix + new + rest[len(old) :]
    return key


def _translate_targets(targets: Any, head: str | None, to: ModuleNames) -> Any:
    """adapter_config.json's target_modules (short names or paths) in the naming `to` (see above)."""
    if head is None or not isinstance(targets, list | tuple | set):
        return targets
    short = {head.rsplit(".", 1)[-1]: TINKER_UNEMBED.rsplit(".", 1)[-1]}  # lm_head <-> unembed_tokens
    if to == "peft":
        short = {v: k for k, v in short.items()}
    return sorted(short.get(t, translate_module_name(t, head, to)) for t in targets)


def with_model_names(loaded: LoadedCheckpoint, head: str | None) -> LoadedCheckpoint:
    """`loaded` with its layers named by the model's module paths: Tinker's `model.unembed_tokens` becomes
    `head`, the model's output-head path (call it once the model is known). Idempotent."""
    if head is None or not any(translate_module_name(p, head, "peft") != p for p in loaded.tensors):
        return loaded
    tensors = {translate_module_name(p, head, "peft"): ab for p, ab in loaded.tensors.items()}
    optimizer = (
        None
        if loaded.optimizer is None
        else {translate_module_name(k, head, "peft"): v for k, v in loaded.optimizer.items()}
    )
    targets = loaded.lora_config.target_modules
    if isinstance(targets, list):
        targets = _translate_targets(targets, head, "peft")
    lora_config = loaded.lora_config.model_copy(update={"target_modules": targets})
    return dataclasses.replace(loaded, tensors=tensors, optimizer=optimizer, lora_config=lora_config)
