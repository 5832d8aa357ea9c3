"""Checkpoint directories on disk: the atomic, durable write (optionally age-encrypted), deleting, and
what interrupted saves leave behind."""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyrage as _pyrage
import torch
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file

from eztinker.engine.checkpoint.format import (
    _SAFETENSORS_METADATA,
    _TEMP_MARK,
    _TRASH_MARK,
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AGE_SUFFIX,
    METADATA_FILE,
    OPTIMIZER_FILE,
    CheckpointInfo,
    PreparedCheckpoint,
)
from eztinker.engine.errors import ConflictError, InvalidInputError, NotFoundError

if TYPE_CHECKING:
    pass


MAX_AGE_RECIPIENTS = 10  # as the Tinker API allows

_age: Any = _pyrage  # pyrage's extension module ships no type information

# A rename onto an existing empty directory would replace it on POSIX: the existence check and the
# rename happen under this lock, so two saves to one name in this process cannot both succeed.
_RENAME_LOCK = threading.Lock()


def check_checkpoint_path(path: str | Path) -> Path:
    """`path` as a Path if a checkpoint can be created there; `ConflictError` if it exists already."""
    target = Path(path)
    if not target.name or target.name in (".", ".."):
        raise InvalidInputError("path", f"{str(path)!r} does not name a directory to create")
    if os.path.lexists(target):
        raise ConflictError(f"checkpoint {str(target)!r} already exists")
    return target


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


# --- listing and deleting ----------------------------------------------------------------------------


def is_temp_name(name: str) -> bool:
    """Whether a directory name is an unfinished save or a deletion in progress (never a checkpoint)."""
    return name.startswith(".") and (_TEMP_MARK in name or _TRASH_MARK in name)


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


def link_tree(source: Path, target: Path) -> None:
    """Make `target` a copy of directory `source` whose files are hard links (copies across file systems),
    atomically: built under a hidden name, then renamed into place."""
    if os.path.lexists(target):
        raise ConflictError(f"checkpoint {str(target)!r} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.copy-{uuid.uuid4().hex[:12]}")
    try:
        for file in source.rglob("*"):
            dest = temp / file.relative_to(source)
            if file.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(file, dest)
            except OSError:  # another file system, or links not allowed: copy the bytes
                shutil.copy2(file, dest)
        temp.mkdir(exist_ok=True)
        os.rename(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
