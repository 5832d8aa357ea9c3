"""Checkpoints: PEFT adapter directories, plus the optimizer state and step of a training run.

A checkpoint is a directory that `peft.PeftModel.from_pretrained(base_model, path)` loads unchanged:

```
adapter_config.json          peft.LoraConfig(...), serialised as PEFT serialises it
adapter_model.safetensors    base_model.model.<module path>.lora_A.weight (r, in) / .lora_B.weight (out, r)
eztinker.json                format version, kind, step, base model, lora and loss configs, optimizer
                             (`optimizer_config`; `optimizer`: whose state optimizer.safetensors holds),
                             creation time
optimizer.safetensors        kind "state" only: <module path>.lora_A.<stat> / .lora_B.<stat> for each
                             statistic of the run's optimizer (`optimizers.STATE_STATS`): AdamW's step,
                             exp_avg, exp_avg_sq exactly as torch keeps them, or Dimuon's momentum_buffer
```

Only safetensors and JSON are written and read (an old-style `adapter_model.bin` is read with
`torch.load(weights_only=True)`, which unpickles tensors only), so loading a checkpoint never runs code.

Saving is atomic: every file is written into a hidden temporary directory beside the target, each
file and the directory are fsynced, and the directory is renamed to its final name (then the parent is
fsynced). A crash mid-save leaves at most a hidden `.<name>.eztinker-tmp-<hex>` directory, which
`list_checkpoints` ignores and `remove_stale_temp_dirs` deletes; never a half checkpoint under the
final name. Deleting renames the directory to a hidden name first, then removes it.

`read_checkpoint` accepts any plain-LoRA PEFT adapter directory, e.g. one that PEFT itself saved
(`get_peft_model(...).save_pretrained(path)`): without `eztinker.json` it has step 0 and no optimizer
state. LoRA variants whose maths differ from plain LoRA (DoRA, per-layer ranks or alphas, biases,
extra trainable modules, ...) are refused with a message that names the feature. Rank-stabilised LoRA
(`use_rslora`) is converted: scaling alpha/sqrt(r) is the plain scaling of alpha' = alpha·sqrt(r).

`restore_into_run` is all-or-nothing: everything is checked, and every tensor converted to the run's
device and dtype, before the first weight is overwritten.

Module names. A checkpoint names every adapted layer by its module path in the Hugging Face model
(`model.layers.0.self_attn.q_proj`, `lm_head`), which is what PEFT loads. Tinker's exports name the
output head (unembedding) `model.unembed_tokens` whatever the model calls it, and tinker-cookbook's
`weights.build_hf_model` / `build_lora_adapter` rely on that name: they map it to `lm_head`, or to the
input embedding when the base ties the two (a tied base has no `lm_head.weight` on disk, so an adapter
on `lm_head` cannot be merged by them). So the Tinker export (`module_names="tinker"`) writes Tinker's
name for the head and the model's paths for everything else; reading accepts both namings, and
`model_module_path` / `with_model_names` translate Tinker's name back once the model (hence its head's
path) is known.

Encryption. `write_checkpoint(..., age_recipients=[...])` encrypts every file to the age recipients
(`age1...` X25519 keys or SSH public keys) and stores it as `<file>.age` (binary age format, what
`age -d` and `pyrage.decrypt_file` read). Files are encrypted in memory: no plaintext byte of an
encrypted checkpoint is ever written to disk. The server cannot read such a checkpoint back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyrage as _pyrage
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes
from transformers.pytorch_utils import Conv1D

from eztinker.engine.errors import ConflictError, InvalidInputError, NotFoundError
from eztinker.engine.families import short_targets
from eztinker.engine.lora import ExpertWeight, output_head_path, peft_module_names
from eztinker.engine.optimizers import OPTIMIZERS, STATE_STATS, OptimizerName, optimizer_config
from eztinker.models import LoRAConfig, LossFunctionConfig

if TYPE_CHECKING:
    from eztinker.engine.run import TrainingRun

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

MAX_AGE_RECIPIENTS = 10  # as the Tinker API allows

_age: Any = _pyrage  # pyrage's extension module ships no type information

ModuleNames = Literal["peft", "tinker"]
"""How a checkpoint names the output head: by its module path (PEFT) or as Tinker does."""

OPTIMIZER_STATS = ("step", "exp_avg", "exp_avg_sq")
"""The AdamW statistics every saved parameter has (`max_exp_avg_sq` too under amsgrad)."""

_TEMP_MARK = ".eztinker-tmp-"
_TRASH_MARK = ".eztinker-del-"
_KEY_RE = re.compile(r"^(?P<path>.+)\.lora_(?P<which>[AB])\.weight$")
_SAFETENSORS_METADATA = {"format": "pt"}  # what PEFT and transformers write

# A rename onto an existing empty directory would replace it on POSIX: the existence check and the
# rename happen under this lock, so two saves to one name in this process cannot both succeed.
_RENAME_LOCK = threading.Lock()


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


def check_checkpoint_path(path: str | Path) -> Path:
    """`path` as a Path if a checkpoint can be created there; `ConflictError` if it exists already."""
    target = Path(path)
    if not target.name or target.name in (".", ".."):
        raise InvalidInputError("path", f"{str(path)!r} does not name a directory to create")
    if os.path.lexists(target):
        raise ConflictError(f"checkpoint {str(target)!r} already exists")
    return target


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


def write_checkpoint(
    path: str | Path, prepared: PreparedCheckpoint, *, age_recipients: Sequence[str] | None = None
) -> CheckpointInfo:
    """Write a prepared checkpoint to the new directory `path`, atomically (see the module docstring).

    With `age_recipients` every file is age-encrypted to them and named `<file>.age`; invalid recipients
    are an `InvalidInputError` (field "age_recipients") before anything is written.
    """
    recipients = None if age_recipients is None else parse_age_recipients(age_recipients)
    target = check_checkpoint_path(path)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    temp = parent / f".{target.name}{_TEMP_MARK}{uuid.uuid4().hex[:12]}"
    temp.mkdir()
    renamed = False
    try:
        _put(temp / ADAPTER_CONFIG_FILE, prepared.adapter_config_json, recipients)
        _put(temp / ADAPTER_WEIGHTS_FILE, prepared.adapter, recipients)
        if prepared.optimizer is not None:
            _put(temp / OPTIMIZER_FILE, prepared.optimizer, recipients)
        _put(temp / METADATA_FILE, prepared.metadata_json, recipients)
        _fsync(temp)
        with _RENAME_LOCK:
            if os.path.lexists(target):
                raise ConflictError(f"checkpoint {str(target)!r} already exists")
            os.rename(temp, target)
            renamed = True
    finally:
        if not renamed:
            shutil.rmtree(temp, ignore_errors=True)
    _fsync(parent)
    return CheckpointInfo(
        path=target,
        kind=prepared.kind,
        step=prepared.step,
        base_model=prepared.base_model,
        created_at=prepared.created_at,
        size_bytes=_dir_size(target),
        optimizer_path=None
        if prepared.optimizer is None
        else target / (OPTIMIZER_FILE if recipients is None else OPTIMIZER_FILE + AGE_SUFFIX),
    )


def _put(file: Path, content: str | dict[str, torch.Tensor], recipients: list[Any] | None) -> None:
    """Write text or tensors (as safetensors) to `file`, durably; encrypted to `recipients` as `<file>.age`.

    Encryption happens in memory, so no plaintext of an encrypted checkpoint ever reaches the disk.
    """
    if recipients is None:
        if isinstance(content, str):
            _write_text(file, content)
        else:
            _write_safetensors(file, content)
        return
    data = (
        content.encode("utf-8")
        if isinstance(content, str)
        else safetensors_bytes(content, metadata=_SAFETENSORS_METADATA)
    )
    encrypted = _age.encrypt(data, recipients)  # binary age format (armored=False), as `age` writes
    with open(file.with_name(file.name + AGE_SUFFIX), "wb") as handle:
        handle.write(encrypted)
        handle.flush()
        os.fsync(handle.fileno())


def parse_age_recipients(recipients: object, field: str = "age_recipients") -> list[Any]:
    """The age recipients `recipients` names: a list of 1 to 10 `age1...` X25519 public keys or SSH public
    keys (`ssh-ed25519 AAAA...`, `ssh-rsa AAAA...`), as age and the Tinker API accept them.

    Anything else is an `InvalidInputError` naming `field` and the first bad entry.
    """
    if not isinstance(recipients, list | tuple) or not recipients:
        raise InvalidInputError(
            field, "must be a non-empty list of age recipients (`age1...` keys or SSH public keys)"
        )
    if len(recipients) > MAX_AGE_RECIPIENTS:
        raise InvalidInputError(field, f"names {len(recipients)} recipients; at most {MAX_AGE_RECIPIENTS}")
    parsed: list[Any] = []
    for i, text in enumerate(recipients):
        if not isinstance(text, str):
            raise InvalidInputError(f"{field}[{i}]", f"must be a string, got {type(text).__name__}")
        text = text.strip()
        module = _age.ssh if text.startswith(("ssh-", "ecdsa-", "sk-")) else _age.x25519
        try:
            parsed.append(module.Recipient.from_str(text))
        except (_age.RecipientError, ValueError) as exc:
            shown = text if len(text) <= 80 else text[:77] + "..."
            raise InvalidInputError(
                f"{field}[{i}]",
                f"{shown!r} is not an age recipient (an `age1...` X25519 public key or an SSH public key): {exc}",
            ) from None
    return parsed


def is_encrypted(path: str | Path) -> bool:
    """Whether `path` is an age-encrypted checkpoint directory (its files end in `.age`)."""
    return (Path(path) / (ADAPTER_CONFIG_FILE + AGE_SUFFIX)).is_file()


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


# --- reading -----------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read an EZTinker checkpoint or any plain-LoRA PEFT adapter directory (tensors on the CPU).

    `NotFoundError` if `path` does not exist; `InvalidInputError` (field "adapter_path") if it is not a
    LoRA adapter directory EZTinker can use, naming the problem.

    Layers keep the names the files give them: a Tinker-named head stays `model.unembed_tokens` until
    `with_model_names` (which `restore_into_run` applies) translates it for a model.
    """
    root = Path(path)
    if not root.exists():
        raise NotFoundError(f"no checkpoint at {str(root)!r}")
    if not root.is_dir():
        raise _invalid(root, "is not a directory")
    if is_encrypted(root):
        raise _invalid(root, "is age-encrypted (its files end in .age): decrypt it with `age -d` first")
    config = _read_json(root / ADAPTER_CONFIG_FILE, root, required=True)
    assert config is not None
    _check_peft_config(config, root)
    tensors = _read_adapter_tensors(root)
    r = int(config["r"])
    for module_path, (a, b) in tensors.items():
        # A fused expert weight's factors hold every expert's r ranks (PEFT's target_parameters).
        per_expert = a.shape[0] != r and a.shape[0] % r == 0 and bool(config.get("target_parameters"))
        if (a.shape[0] != r and not per_expert) or b.shape[1] != a.shape[0]:
            raise _invalid(
                root,
                f"layer {module_path} has rank {a.shape[0]} (A {tuple(a.shape)}, B {tuple(b.shape)}) "
                f"but adapter_config.json says r={r}",
            )
    alpha = float(config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # alpha / sqrt(r) == (alpha * sqrt(r)) / r
    metadata = _read_json(root / METADATA_FILE, root, required=False)
    if metadata is None:
        lora_config = _validated_lora_config(
            root,
            {
                "r": r,
                "lora_alpha": alpha,
                "lora_dropout": float(config.get("lora_dropout") or 0.0),
                "target_modules": _target_modules_from(config, tensors),
            },
        )
        return LoadedCheckpoint(
            path=root,
            kind="weights",
            lora_config=lora_config,
            base_model=config.get("base_model_name_or_path"),
            step=0,
            loss_config=None,
            tensors=tensors,
            optimizer=None,
        )

    version = metadata.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise _invalid(
            root,
            f"{METADATA_FILE} has format_version {version!r}; this EZTinker reads up to {FORMAT_VERSION}",
        )
    kind = metadata.get("kind")
    if kind not in ("state", "weights"):
        raise _invalid(root, f"{METADATA_FILE} has kind {kind!r}; expected 'state' or 'weights'")
    lora_config = _validated_lora_config(root, metadata.get("lora_config") or {})
    if lora_config.r != r or not math.isclose(lora_config.lora_alpha, alpha, rel_tol=1e-6):
        raise _invalid(
            root,
            f"{METADATA_FILE} (r={lora_config.r}, lora_alpha={lora_config.lora_alpha}) disagrees with "
            f"{ADAPTER_CONFIG_FILE} (r={r}, lora_alpha={alpha})",
        )
    loss_config = None
    if metadata.get("loss_config") is not None:
        try:
            loss_config = LossFunctionConfig.model_validate(metadata["loss_config"])
        except ValidationError as exc:
            raise _invalid(root, f"{METADATA_FILE} has an invalid loss_config: {exc}") from exc
    step = metadata.get("step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _invalid(root, f"{METADATA_FILE} has step {step!r}; expected an integer >= 0")
    optimizer_name = _recorded_optimizer(root, metadata, kind)
    optimizer = None
    if kind == "state":
        if not (root / OPTIMIZER_FILE).is_file():
            raise _invalid(root, f"is a 'state' checkpoint without {OPTIMIZER_FILE}")
        optimizer = _read_optimizer(root, tensors, optimizer_name)
    created_at = metadata.get("created_at")
    return LoadedCheckpoint(
        path=root,
        kind=kind,
        lora_config=lora_config,
        base_model=metadata.get("base_model", config.get("base_model_name_or_path")),
        step=step,
        loss_config=loss_config,
        tensors=tensors,
        optimizer=optimizer,
        created_at=float(created_at) if isinstance(created_at, int | float) else None,
        optimizer_name=optimizer_name,
    )


def _recorded_optimizer(root: Path, metadata: Mapping[str, Any], kind: str) -> OptimizerName:
    """The saving run's optimizer, from eztinker.json (AdamW for checkpoints older than Dimuon)."""
    config = metadata.get("optimizer_config")
    recorded = config.get("type") if isinstance(config, dict) else None
    state = metadata.get("optimizer") if kind == "state" else None
    name = recorded or state or "adamw"
    if name not in OPTIMIZERS:
        raise _invalid(
            root, f"{METADATA_FILE} records optimizer {name!r}; this EZTinker has {list(OPTIMIZERS)}"
        )
    if state is not None and state != name:
        raise _invalid(root, f"{METADATA_FILE} records optimizer {name!r} but state of {state!r}")
    return name


def _invalid(root: Path, message: str) -> InvalidInputError:
    return InvalidInputError("adapter_path", f"{str(root)!r} {message}")


def _read_json(file: Path, root: Path, *, required: bool) -> dict[str, Any] | None:
    if not file.is_file():
        if required:
            raise _invalid(root, f"has no {file.name}: it is not a PEFT adapter directory")
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _invalid(root, f"has an unreadable {file.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise _invalid(root, f"has a {file.name} that is not a JSON object")
    return data


def _check_peft_config(config: Mapping[str, Any], root: Path) -> None:
    """Refuse every PEFT feature whose maths or saved tensors differ from plain LoRA."""
    peft_type = config.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise _invalid(root, f"is a {peft_type!r} adapter; only LoRA adapters are supported")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise _invalid(root, f"has r={r!r} in {ADAPTER_CONFIG_FILE}; expected a positive integer")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha > 0:
        raise _invalid(root, f"has lora_alpha={alpha!r} in {ADAPTER_CONFIG_FILE}; expected a positive number")
    unsupported = {
        "use_dora": "DoRA (use_dora)",
        "rank_pattern": "per-layer ranks (rank_pattern)",
        "alpha_pattern": "per-layer alphas (alpha_pattern)",
        "modules_to_save": "fully trained extra modules (modules_to_save)",
        "lora_bias": "a bias on lora_B (lora_bias)",
        "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
        "layer_replication": "layer replication (layer_replication)",
        "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
        "use_qalora": "QA-LoRA (use_qalora)",
        "velora_config": "VeLoRA (velora_config)",
        "monteclora_config": "MonteCLoRA (monteclora_config)",
        "use_bdlora": "block-diagonal LoRA (use_bdlora)",
        "arrow_config": "Arrow routing (arrow_config)",
        "kasa_config": "KaSA (kasa_config)",
    }
    for key, feature in unsupported.items():
        if config.get(key):
            raise _invalid(root, f"uses {feature}, which EZTinker does not support; only plain LoRA adapters")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise _invalid(root, f"trains biases (bias={bias!r}); only bias='none' is supported")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(("pissa", "olora", "corda", "loftq", "lora_ga", "mica")):
        raise _invalid(
            root,
            f"was initialised with {init!r}, whose adapter is relative to modified base weights (or is a "
            "LoRA variant); convert it to a plain LoRA adapter first",
        )


def _read_adapter_tensors(root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path -> (A, B), from PEFT's keys (`base_model.model.<path>.lora_A.weight`)."""
    weights_file = root / ADAPTER_WEIGHTS_FILE
    legacy_file = root / LEGACY_ADAPTER_WEIGHTS_FILE
    if weights_file.is_file():
        try:
            state = load_file(str(weights_file), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise _invalid(root, f"has an unreadable {ADAPTER_WEIGHTS_FILE}: {exc}") from exc
    elif legacy_file.is_file():
        try:
            state = torch.load(legacy_file, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses anything but tensors and containers
            raise _invalid(root, f"has an unreadable {LEGACY_ADAPTER_WEIGHTS_FILE}: {exc}") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise _invalid(root, f"has a {LEGACY_ADAPTER_WEIGHTS_FILE} that is not a dict of tensors")
    else:
        raise _invalid(root, f"has no {ADAPTER_WEIGHTS_FILE}")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(state):
        name = key.removeprefix(PEFT_PREFIX)
        match = _KEY_RE.match(name)
        if match is None:
            raise _invalid(
                root,
                f"holds tensor {key!r}, which is not a plain LoRA weight (`<module>.lora_A.weight` or "
                "`<module>.lora_B.weight`): biases, DoRA magnitudes, embeddings and saved modules are not "
                "supported",
            )
        halves.setdefault(match["path"], {})[match["which"]] = state[key]
    if not halves:
        raise _invalid(root, f"has no LoRA weights in {weights_file.name}")
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module_path, pair in halves.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise _invalid(root, f"has no {missing} weight for layer {module_path}")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise _invalid(
                root,
                f"layer {module_path} has A {tuple(a.shape)} and B {tuple(b.shape)}; expected "
                "A (r, in) and B (out, r) (LoRA on convolutions or embeddings is not supported)",
            )
        if not (a.is_floating_point() and b.is_floating_point()):
            raise _invalid(root, f"layer {module_path} has non-floating-point LoRA weights")
        tensors[module_path] = (a, b)
    return tensors


def _target_modules_from(config: Mapping[str, Any], tensors: Mapping[str, Any]) -> list[str]:
    """target_modules for a PEFT adapter, from its saved layers (the ground truth).

    A plain list of layer names (`["q_proj", "v_proj"]`, no layer subset, no exclusions) gives the names
    of the saved layers; anything else (a regex, "all-linear", layers_to_transform, exclude_modules, full
    paths) gives the saved module paths themselves, which select exactly those layers.
    """
    r = config.get("r")
    parameters = config.get("target_parameters") or []
    if parameters:  # fused expert weights: their factors hold E·r ranks; their names come from the config
        tensors = {p: ab for p, ab in tensors.items() if ab[0].shape[0] == r}
        # A linear layer's weight named as a parameter (`mlp.gate_proj.weight`) is that layer.
        parameters = sorted({t.removesuffix(".weight") for t in parameters})
    paths = sorted(tensors)
    targets = config.get("target_modules")
    plain_names = (
        isinstance(targets, list)
        and all(isinstance(t, str) and re.fullmatch(r"[A-Za-z0-9_]+", t) for t in targets)
        and config.get("layers_to_transform") is None
        and not config.get("exclude_modules")
    )
    if plain_names:
        return sorted({p.rsplit(".", 1)[-1] for p in paths}) + parameters
    return paths + parameters


def _validated_lora_config(root: Path, data: Mapping[str, Any]) -> LoRAConfig:
    try:
        return LoRAConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise _invalid(root, f"has a LoRA config EZTinker cannot use: {exc}") from exc


def _read_optimizer(
    root: Path, tensors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], family: OptimizerName = "adamw"
) -> dict[str, dict[str, torch.Tensor]]:
    """`<module path>.lora_A` -> {stat: tensor}, checked against the adapter's layers and shapes."""
    try:
        flat = load_file(str(root / OPTIMIZER_FILE), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise _invalid(root, f"has an unreadable {OPTIMIZER_FILE}: {exc}") from exc
    optimizer: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(flat):
        param_key, _, stat = key.rpartition(".")
        module_path, _, which = param_key.rpartition(".")
        if which not in ("lora_A", "lora_B") or module_path not in tensors:
            raise _invalid(root, f"has optimizer state {key!r} for no LoRA weight of the adapter")
        optimizer.setdefault(param_key, {})[stat] = flat[key]
    for param_key, state in optimizer.items():
        module_path, _, which = param_key.rpartition(".")
        weight = tensors[module_path][0 if which == "lora_A" else 1]
        missing = [s for s in STATE_STATS[family] if s not in state]
        if missing:
            raise _invalid(root, f"has no optimizer {missing[0]} for {param_key}")
        for stat, value in state.items():
            expected = () if stat == "step" else tuple(weight.shape)
            if tuple(value.shape) != expected:
                raise _invalid(
                    root,
                    f"has optimizer {stat} of shape {tuple(value.shape)} for {param_key}; expected {expected}",
                )
    return optimizer


# --- restoring into a run ----------------------------------------------------------------------------


def restore_into_run(run: TrainingRun, loaded: LoadedCheckpoint, *, with_optimizer: bool) -> None:
    """Overwrite `run`'s adapter, step and optimizer state with the checkpoint's, all or nothing.

    The checkpoint must have exactly the run's layers, shapes and scaling, else `InvalidInputError`
    (field "path") naming the first mismatch, and the run is untouched. Accumulated gradients are
    dropped. The optimizer state is the checkpoint's if `with_optimizer` and it has one; else it is
    cleared (the optimizer starts afresh at the next step). State of another optimizer than the run's
    is refused (a run's optimizer is fixed). Tinker's name for the head is accepted.
    """
    loaded = with_layer_paths(with_model_names(loaded, output_head_path(run.base.model)), run)
    _check_compatible(run, loaded)
    params = _named_params(run)
    use_optimizer = with_optimizer and loaded.optimizer is not None
    if use_optimizer and loaded.optimizer_name != run.optimizer_name:
        raise InvalidInputError(
            "path",
            f"checkpoint {str(loaded.path)!r} holds {loaded.optimizer_name} optimizer state, but run "
            f"{run.run_id!r} uses {run.optimizer_name} (fixed when it was created): load its weights only, "
            "or create a run from it",
        )
    # Convert everything first (this is where an out-of-memory would strike), then commit.
    new_weights: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    for module_path, (a, b) in loaded.tensors.items():
        slot = run.slots[module_path]
        new_weights.append((slot.lora_A, a.to(device=slot.lora_A.device, dtype=slot.lora_A.dtype)))
        new_weights.append((slot.lora_B, b.to(device=slot.lora_B.device, dtype=slot.lora_B.dtype)))
    new_states: dict[str, dict[str, torch.Tensor]] = {}
    if use_optimizer:
        assert loaded.optimizer is not None
        groups = {id(p): group for group in run.optimizer.param_groups for p in group["params"]}
        for key, state in loaded.optimizer.items():
            param = params[key]
            if run.optimizer_name == "adamw":
                new_states[key] = _torch_adam_state(param, state, groups.get(id(param), {}))
            else:  # Dimuon's momentum: the parameter's device and dtype
                new_states[key] = {
                    k: v.detach().to(device=param.device, dtype=param.dtype, copy=True)
                    for k, v in state.items()
                }

    with torch.no_grad():
        for param, value in new_weights:
            param.copy_(value)
    for key, param in params.items():
        param.grad = None
        run.optimizer.state.pop(param, None)
        if key in new_states:
            run.optimizer.state[param] = new_states[key]
    run.pending_grad_ops = 0
    run.step = loaded.step


def _check_compatible(run: TrainingRun, loaded: LoadedCheckpoint) -> None:
    def mismatch(message: str) -> InvalidInputError:
        return InvalidInputError(
            "path", f"checkpoint {str(loaded.path)!r} does not fit run {run.run_id!r}: {message}"
        )

    missing = sorted(set(run.slots) - set(loaded.tensors))
    if missing:
        raise mismatch(f"it has no adapter for layer {missing[0]} (run targets {run.target_modules})")
    extra = sorted(set(loaded.tensors) - set(run.slots))
    if extra:
        raise mismatch(f"it has an adapter for layer {extra[0]}, which the run does not adapt")
    for module_path in sorted(run.slots):
        slot = run.slots[module_path]
        a, b = loaded.tensors[module_path]
        for name, saved, live in (("lora_A", a, slot.lora_A), ("lora_B", b, slot.lora_B)):
            if tuple(saved.shape) != tuple(live.shape):
                raise mismatch(
                    f"{module_path}.{name} has shape {tuple(saved.shape)} in the checkpoint and "
                    f"{tuple(live.shape)} in the run (checkpoint r={loaded.lora_config.r}, run r={run.lora_config.r})"
                )
        scaling = loaded.lora_config.lora_alpha / loaded.lora_config.r
        if not math.isclose(scaling, slot.scaling, rel_tol=1e-6):
            raise mismatch(
                f"its scaling lora_alpha/r = {loaded.lora_config.lora_alpha}/{loaded.lora_config.r} differs "
                f"from the run's {run.lora_config.lora_alpha}/{run.lora_config.r}"
            )
    if loaded.optimizer is not None:
        named = _named_params(run)
        for key, state in loaded.optimizer.items():
            param = named.get(key)
            if param is None:
                raise mismatch(f"it has optimizer state for {key}, which the run does not have")
            for stat, value in state.items():
                expected = () if stat == "step" else tuple(param.shape)
                if tuple(value.shape) != expected:
                    raise mismatch(
                        f"its optimizer {stat} for {key} has shape {tuple(value.shape)}, not {expected}"
                    )


def _scalar_dtype(fused: bool) -> torch.dtype:
    """torch.optim's dtype for `step` (`torch.optim.optimizer._get_scalar_dtype`)."""
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _torch_adam_state(
    param: torch.Tensor, saved: Mapping[str, torch.Tensor], group: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The state dict torch's Adam/AdamW would hold for `param`, with the saved values (fresh copies).

    As in `torch.optim.Adam`: `step` is a 0-d tensor on the CPU (on the parameter's device, float32 if
    fused, when the optimizer is fused or capturable); the moments match the parameter's device and dtype.
    """
    fused = bool(group.get("fused"))
    on_device = fused or bool(group.get("capturable"))
    state: dict[str, torch.Tensor] = {}
    for stat, value in saved.items():
        if stat == "step":
            state[stat] = (
                value.detach()
                .reshape(())
                .to(
                    device=param.device if on_device else torch.device("cpu"),
                    dtype=_scalar_dtype(fused),
                    copy=True,
                )
            )
        else:
            state[stat] = value.detach().to(device=param.device, dtype=param.dtype, copy=True)
    return state


# --- listing and deleting ----------------------------------------------------------------------------


def is_temp_name(name: str) -> bool:
    """Whether a directory name is an unfinished save or a deletion in progress (never a checkpoint)."""
    return name.startswith(".") and (_TEMP_MARK in name or _TRASH_MARK in name)


def checkpoint_info(path: str | Path) -> CheckpointInfo:
    """What `path` holds, from its JSON files alone (no tensors are read)."""
    root = Path(path)
    if not root.is_dir():
        raise NotFoundError(f"no checkpoint at {str(root)!r}")
    if is_encrypted(root):  # nothing inside is readable: what the file system says
        return CheckpointInfo(
            path=root,
            kind="weights",
            step=0,
            base_model=None,
            created_at=(root / (ADAPTER_CONFIG_FILE + AGE_SUFFIX)).stat().st_mtime,
            size_bytes=_dir_size(root),
            optimizer_path=None,
        )
    config = _read_json(root / ADAPTER_CONFIG_FILE, root, required=True)
    assert config is not None
    metadata = _read_json(root / METADATA_FILE, root, required=False) or {}
    optimizer_path = root / OPTIMIZER_FILE
    kind: Literal["state", "weights"] = "state" if metadata.get("kind") == "state" else "weights"
    step = metadata.get("step")
    created_at = metadata.get("created_at")
    if not isinstance(created_at, int | float):
        created_at = (root / ADAPTER_CONFIG_FILE).stat().st_mtime
    return CheckpointInfo(
        path=root,
        kind=kind,
        step=step if isinstance(step, int) and not isinstance(step, bool) else 0,
        base_model=metadata.get("base_model", config.get("base_model_name_or_path")),
        created_at=float(created_at),
        size_bytes=_dir_size(root),
        optimizer_path=optimizer_path if kind == "state" and optimizer_path.is_file() else None,
    )


def list_checkpoints(root: str | Path) -> list[CheckpointInfo]:
    """The checkpoints directly inside `root` (oldest first), skipping unfinished saves and deletions.

    A missing `root` holds no checkpoints. Directories without `adapter_config.json`, and ones whose
    JSON cannot be read, are not checkpoints and are skipped.
    """
    base = Path(root)
    if not base.is_dir():
        return []
    found: list[CheckpointInfo] = []
    for entry in sorted(base.iterdir()):
        if is_temp_name(entry.name) or not entry.is_dir() or not _has_adapter_config(entry):
            continue
        with contextlib.suppress(InvalidInputError, OSError):
            found.append(checkpoint_info(entry))
    return sorted(found, key=lambda info: (info.created_at, info.path.name))


def delete_checkpoint(path: str | Path) -> None:
    """Delete the checkpoint directory `path`: renamed to a hidden name first, so it vanishes at once.

    `NotFoundError` if it does not exist; `InvalidInputError` if it is not an adapter directory (this
    function never removes an arbitrary directory).
    """
    target = Path(path)
    if not target.is_dir() or is_temp_name(target.name):
        raise NotFoundError(f"no checkpoint at {str(target)!r}")
    if not _has_adapter_config(target):
        raise InvalidInputError(
            "path", f"{str(target)!r} is not a checkpoint (it has no {ADAPTER_CONFIG_FILE})"
        )
    trash = target.parent / f".{target.name}{_TRASH_MARK}{uuid.uuid4().hex[:12]}"
    try:
        os.rename(target, trash)
    except FileNotFoundError as exc:  # deleted by someone else meanwhile
        raise NotFoundError(f"no checkpoint at {str(target)!r}") from exc
    _fsync(target.parent)
    if trash.is_symlink():  # `path` was a link to a checkpoint: remove the link, not what it points to
        trash.unlink()
    else:
        shutil.rmtree(trash, ignore_errors=True)


def _has_adapter_config(root: Path) -> bool:
    """Whether `root` looks like a checkpoint: it has adapter_config.json, plain or age-encrypted."""
    return (root / ADAPTER_CONFIG_FILE).is_file() or is_encrypted(root)


def remove_stale_temp_dirs(root: str | Path) -> list[Path]:
    """Remove what interrupted saves and deletions left in `root`; returns the removed paths.

    Call it at startup, when no save is under way (an in-flight save's temporary directory would go too).
    """
    base = Path(root)
    if not base.is_dir():
        return []
    removed = []
    for entry in sorted(base.iterdir()):
        if is_temp_name(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


# --- durable writes ----------------------------------------------------------------------------------


def _write_text(file: Path, text: str) -> None:
    with open(file, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _write_safetensors(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(file), metadata=_SAFETENSORS_METADATA)
    _fsync(file)


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to disk (directories: not on Windows)."""
    if os.name == "nt" and path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dir_size(root: Path) -> int:
    return sum(f.stat().st_size for f in root.iterdir() if f.is_file())


# --- export ------------------------------------------------------------------------------------------


def merge_into_base(adapter_dir: str | Path, base_model: str, out_dir: str | Path) -> Path:
    """Write a full Hugging Face model directory: `base_model` with the adapter merged into its weights.

    Every adapted weight W becomes W + (lora_alpha / r)·B·A (transposed for GPT-2's Conv1D), in fp32:
    the merged model computes what the base with the adapter computes (and `PeftModel` with it). The
    adapter may be any directory `read_checkpoint` accepts, in either naming of the head.

    A base that ties its output head to its input embedding (`tie_word_embeddings`) is untied first when
    the adapter changes the head: the head gets its own copy of the weight, and the delta; the input
    embedding keeps the base's values, as in the adapted model. Merging into the shared weight would
    move every input embedding too. The tokenizer is copied along. Written atomically like a checkpoint.
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
        if target.exists():
            target.rmdir()  # empty, checked above
        os.rename(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return target


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
