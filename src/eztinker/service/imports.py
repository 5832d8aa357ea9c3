"""Importing an existing PEFT LoRA adapter as a new run that keeps training (`POST /v1/runs/import`,
`eztinker runs import DIR --base-model M`).

The client and the server may be on different machines, so the adapter travels as a tar archive (plain or
gzip-compressed) of its directory: `adapter_config.json` and `adapter_model.safetensors` (or an old-style
`adapter_model.bin`), at the archive's root or inside one top-level directory. Other members are ignored
(an EZTinker checkpoint's optimizer state and step too: an import starts at step 0 with a fresh
optimizer); links, devices and paths that climb out are refused.

The adapter is read and checked by the engine's own PEFT reader (`read_checkpoint`, the one that loads
checkpoints): LoRA variants whose maths differ are refused, naming the feature. What the caller states is
checked against `adapter_config.json` — `base_model` (the same name, or the same last path component:
`Qwen/Qwen3-8B` matches `/models/Qwen3-8B`), and, if given, `lora_rank` and `target_modules` — and a
mismatch is refused (`InvalidInputError` naming the field, 422). The run is then created from the
directory as `create_run` does from a checkpoint, and the adapter is kept as the run's checkpoint
`imported` (kind `weights`), so the run can be resumed from it after a restart.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from eztinker.engine.checkpoint import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    LEGACY_ADAPTER_WEIGHTS_FILE,
    read_checkpoint,
)
from eztinker.engine.checkpoint.format import _TEMP_MARK
from eztinker.engine.errors import InvalidInputError
from eztinker.models import api
from eztinker.store import CheckpointRecord

if TYPE_CHECKING:
    from eztinker.service.core import Service

IMPORTED = "imported"  # the checkpoint an imported run keeps its adapter as
ADAPTER_FILES = frozenset({ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, LEGACY_ADAPTER_WEIGHTS_FILE})


def unpack_adapter(archive: bytes, target: Path) -> Path:
    """The adapter files of a tar archive (see the module) written into the new directory `target`."""
    try:
        tar = tarfile.open(fileobj=io.BytesIO(archive), mode="r:*")  # noqa: SIM115 (closed below)
    except (tarfile.TarError, EOFError) as exc:
        raise InvalidInputError("archive", f"the body is not a tar archive (plain or gzip): {exc}") from None
    members: dict[str, tarfile.TarInfo] = {}
    with tar:
        try:
            infos = tar.getmembers()
        except (tarfile.TarError, EOFError) as exc:
            raise InvalidInputError("archive", f"the tar archive is damaged: {exc}") from None
        for info in infos:
            parts = PurePosixPath(info.name).parts
            if info.name.startswith("/") or ".." in parts:
                raise InvalidInputError("archive", f"member {info.name!r} climbs out of the archive")
            if info.isdir() or not parts or parts[-1] not in ADAPTER_FILES or len(parts) > 2:
                continue
            if not info.isfile():
                raise InvalidInputError("archive", f"member {info.name!r} is a link or device, not a file")
            if parts[-1] in members:
                raise InvalidInputError("archive", f"the archive holds more than one {parts[-1]}")
            members[parts[-1]] = info
        if ADAPTER_CONFIG_FILE not in members:
            raise InvalidInputError(
                "archive", f"the archive holds no {ADAPTER_CONFIG_FILE}: it is not a PEFT adapter directory"
            )
        if ADAPTER_WEIGHTS_FILE not in members and LEGACY_ADAPTER_WEIGHTS_FILE not in members:
            raise InvalidInputError("archive", f"the archive holds no {ADAPTER_WEIGHTS_FILE}")
        target.mkdir(parents=True)
        for name, info in members.items():
            source = tar.extractfile(info)
            assert source is not None  # a regular file
            with source, open(target / name, "wb") as out:
                shutil.copyfileobj(source, out)
    return target


def _same_model(stated: str, adapter: str) -> bool:
    return (
        stated == adapter or PurePosixPath(stated.rstrip("/")).name == PurePosixPath(adapter.rstrip("/")).name
    )


def import_adapter(
    service: Service,
    archive: bytes,
    owner: str | None,
    *,
    base_model: str,
    lora_rank: int | None = None,
    target_modules: list[str] | None = None,
    run_id: str | None = None,
) -> api.Run:
    """A new run of the caller's holding the adapter in `archive`, trained from there. Blocking."""
    root = service.settings.checkpoint_dir
    staging = root / f".import{_TEMP_MARK}{uuid.uuid4().hex[:12]}"
    try:
        unpack_adapter(archive, staging)
        loaded = read_checkpoint(staging)
        config = loaded.lora_config
        if loaded.base_model and not _same_model(base_model, loaded.base_model):
            raise InvalidInputError(
                "base_model",
                f"the adapter was trained on {loaded.base_model!r} (adapter_config.json's "
                f"base_model_name_or_path), not {base_model!r}",
            )
        if lora_rank is not None and lora_rank != config.r:
            raise InvalidInputError(
                "lora_rank", f"the adapter has rank r={config.r} (adapter_config.json), not {lora_rank}"
            )
        adapter_targets = sorted(config.target_modules or [])
        if target_modules is not None and sorted(set(target_modules)) != sorted(set(adapter_targets)):
            raise InvalidInputError(
                "target_modules",
                f"the adapter adapts {adapter_targets} (adapter_config.json), not {sorted(set(target_modules))}",
            )
        request = api.CreateRunRequest(base_model=base_model, lora_config=config, run_id=run_id)
        run = service.create_run(request, owner, peft=str(staging))
        try:
            final = service.checkpoints.path(run.run_id, IMPORTED)
            final.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(final)
            service.store.add_checkpoint(
                CheckpointRecord(
                    run_id=run.run_id,
                    name=IMPORTED,
                    kind="weights",
                    step=0,
                    path=str(final),
                    size_bytes=sum(f.stat().st_size for f in final.iterdir() if f.is_file()),
                    owner=owner,
                    created_at=time.time(),
                )
            )
        except BaseException:  # an imported run always holds its import: none is kept without it
            service.delete_run(run.run_id, owner)
            raise
        return service.views.get_run(run.run_id, owner)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
