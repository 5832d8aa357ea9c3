"""Reading a checkpoint or any plain-LoRA PEFT adapter, validated before anything is used; and listing
the checkpoints of a directory from their JSON files alone."""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from eztinker.engine.checkpoint.disk import _dir_size, _has_adapter_config, is_encrypted, is_temp_name
from eztinker.engine.checkpoint.format import (
    _KEY_RE,
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AGE_SUFFIX,
    FORMAT_VERSION,
    LEGACY_ADAPTER_WEIGHTS_FILE,
    METADATA_FILE,
    OPTIMIZER_FILE,
    PEFT_PREFIX,
    CheckpointInfo,
    LoadedCheckpoint,
)
from eztinker.engine.errors import InvalidInputError, NotFoundError
from eztinker.engine.optimizers import OPTIMIZERS, STATE_STATS, OptimizerName
from eztinker.models import LoRAConfig, LossFunctionConfig

if TYPE_CHECKING:
    pass


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
