"""`Checkpoints`: a run's saved checkpoints — saving, replacing, copying, deleting and expiring them.

`service.checkpoints` is the one place a checkpoint's files, its store record and its expiry change
together; loading one into a run is a run op (`Service.load`). Facades and `sampling` subscribe to
`on_deleted` / `on_replaced` to drop what they kept about a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from eztinker.backend import SaveOptions
from eztinker.engine.checkpoint import (
    ADAPTER_CONFIG_FILE,
    CheckpointInfo,
    ModuleNames,
    delete_checkpoint,
    is_encrypted,
    parse_age_recipients,
)
from eztinker.engine.checkpoint.disk import link_tree
from eztinker.engine.errors import ConflictError, InvalidInputError, NotFoundError
from eztinker.models import api
from eztinker.scheduler import Job, when_done
from eztinker.service.results import SaveOutput
from eztinker.store import CheckpointRecord, UnknownRunError

if TYPE_CHECKING:
    from eztinker.service.core import Service

log = logging.getLogger(__name__)

# FacadeState namespace: "<run>/<name>" -> {"run_id", "name", "expires_at" (Unix seconds)}; swept by the service
CHECKPOINT_EXPIRY = "checkpoint_expiry"
# A deleted run's checkpoint directory while it is being removed: `<data dir>/checkpoints/.deleted-<hex>-<run>`
_ASIDE_PREFIX = ".deleted-"
# While `save(overwrite=True)` swaps a checkpoint `<name>`: the new one is written to `.<name>.new-<hex>`, the old
# one renamed to `.<name>.old-<hex>` (`Checkpoints._swap_in`); `_recover_replacements` tidies a crash's leftovers.
_NEW_MARK, _OLD_MARK = ".new-", ".old-"
_REPLACEMENT = re.compile(r"^\.(?P<name>.+)(?P<mark>\.new-|\.old-)[0-9a-f]{12}$")


class Checkpoints:
    """The checkpoints of every run, over the service's store, backend and access checks."""

    def __init__(self, service: Service) -> None:
        self.service = service
        # Called with (run id, name) after a checkpoint is deleted, by a route or when it expired.
        self.on_deleted: list[Callable[[str, str], None]] = []
        # Told (run id, name) when `save(overwrite=True)` has replaced a checkpoint's files with new ones.
        self.on_replaced: list[Callable[[str, str], None]] = []

    def path(self, run_id: str, name: str) -> Path:
        """Where checkpoint `name` of run `run_id` lives (`<data dir>/checkpoints/<run>/<name>`)."""
        return self.service.settings.checkpoint_dir / run_id / name

    def save(
        self,
        run_id: str,
        request: api.SaveRequest,
        owner: str | None,
        *,
        module_names: ModuleNames = "peft",
        age_recipients: list[str] | None = None,
    ) -> Job:
        """Save a checkpoint. `module_names="tinker"` (a Tinker export) names the output head as Tinker
        does; `age_recipients` encrypts every file to them. Both: kind "weights" only.

        `request.overwrite` replaces a checkpoint of that name: the new one is written beside it and swapped in
        once complete (`_swap_in`), so a failed save leaves the old one as it was. The replacement starts
        private (unpublished); its expiry stays the name's until changed."""
        service = self.service
        service.live_run(run_id, owner)
        replacing = service.store.get_checkpoint(run_id, request.name) is not None
        if replacing and not request.overwrite:
            raise ConflictError(
                f"run {run_id!r} already has a checkpoint named {request.name!r}; choose another name, "
                "or save with overwrite"
            )
        if age_recipients is not None:
            parse_age_recipients(age_recipients)  # a bad recipient is refused now, not as a failed job
        options = SaveOptions(
            request.kind, module_names, None if age_recipients is None else tuple(age_recipients)
        )
        if (module_names != "peft" or age_recipients is not None) and request.kind != "weights":
            raise InvalidInputError("kind", "an export (Tinker names, encryption) saves kind 'weights' only")
        final = self.path(run_id, request.name)
        path = final.with_name(f".{request.name}{_NEW_MARK}{uuid.uuid4().hex[:12]}") if replacing else final

        def recorded(info: CheckpointInfo) -> SaveOutput:
            if service.store.get_run(run_id) is None:
                raise _deleted_meanwhile(run_id, request.name, info.path)
            if replacing:
                info = self._swap_in(info, final)
            optimizer_path = str(info.optimizer_path) if info.optimizer_path else None
            record = CheckpointRecord(
                run_id=run_id,
                name=request.name,
                kind=request.kind,
                step=info.step,
                path=str(info.path),
                optimizer_path=optimizer_path,
                size_bytes=info.size_bytes,
                owner=owner,
                created_at=info.created_at,
            )
            try:
                (service.store.replace_checkpoint if replacing else service.store.add_checkpoint)(record)
            except UnknownRunError:  # the run was deleted while this save ran: keep no orphan files
                raise _deleted_meanwhile(run_id, request.name, info.path) from None
            if replacing:
                service.access.forget_checkpoint(run_id, request.name)
                for callback in self.on_replaced:
                    callback(run_id, request.name)
            return SaveOutput(request.name, info.step, str(info.path), optimizer_path, info.size_bytes)

        return service.submit(
            "save", run_id, lambda: when_done(service.backend.save(run_id, path, options), recorded), owner
        )

    @staticmethod
    def _swap_in(info: CheckpointInfo, final: Path) -> CheckpointInfo:
        """Put the complete new checkpoint `info` at `final` in place of the old one: the old directory is
        renamed aside first (each rename is atomic), then removed."""
        aside = final.with_name(f".{final.name}{_OLD_MARK}{uuid.uuid4().hex[:12]}")
        if final.exists():
            os.rename(final, aside)
        try:
            os.rename(info.path, final)
        except OSError:  # the old checkpoint goes back where its record says it is; the new one is dropped
            if aside.exists() and not final.exists():
                os.rename(aside, final)
            _discard(info.path)
            raise
        if aside.exists():
            delete_checkpoint(aside)
        optimizer = None if info.optimizer_path is None else final / info.optimizer_path.name
        return dataclasses.replace(info, path=final, optimizer_path=optimizer)

    def copy(
        self, run_id: str, name: str, owner: str | None, *, new_run_id: str | None = None
    ) -> CheckpointRecord:
        """Copy a checkpoint the caller may read (its own, or a published one) into a new run of the caller's
        (status `copy`: it holds the checkpoint and is never trained). The files are hard links where the
        file system allows, so no bytes are duplicated, and each copy lives as long as its own run does.
        Returns the copy's checkpoint record."""
        service = self.service
        source_run, source = service.access.readable_checkpoint(run_id, name, owner)
        new_run_id = new_run_id or f"copy-{uuid.uuid4().hex[:16]}"
        if service.store.get_run(new_run_id) is not None:
            raise ConflictError(f"run id {new_run_id!r} is already in use; choose another")
        target = self.path(new_run_id, name)
        link_tree(Path(source.path), target)
        now = time.time()
        try:
            if not (target / ADAPTER_CONFIG_FILE).is_file() and not is_encrypted(target):
                raise NotFoundError(  # its files went while they were linked: its run was deleted meanwhile
                    f"run {run_id!r} has no checkpoint named {name!r} (it was deleted while being copied)"
                )
            service.store.add_run(  # the source run's model, configs and size
                dataclasses.replace(
                    source_run,
                    run_id=new_run_id,
                    owner=owner,
                    step=source.step,
                    status="copy",
                    last_loss=None,
                    created_at=now,
                    updated_at=now,
                )
            )
        except BaseException:  # no files without their run (the run id may be another's now: only ours go)
            shutil.rmtree(target, ignore_errors=True)
            with contextlib.suppress(OSError):
                target.parent.rmdir()
            raise
        optimizer = None if source.optimizer_path is None else str(target / Path(source.optimizer_path).name)
        copy = dataclasses.replace(
            source, run_id=new_run_id, path=str(target), optimizer_path=optimizer, owner=owner, created_at=now
        )
        try:
            service.record_run_optimizer(new_run_id, service.run_optimizer(source_run.run_id), owner)
            service.store.add_checkpoint(copy)
        except BaseException:  # no run without its checkpoint: the run is ours, so all of it goes
            service.delete_run(new_run_id, owner)
            raise
        return copy

    def delete(self, run_id: str, name: str, owner: str | None) -> None:
        service = self.service
        self.remove(service.access.checkpoint(run_id, name, owner))

    def remove(self, record: CheckpointRecord) -> None:
        """Delete a checkpoint's files, its store record and its expiry, and tell the facades."""
        service = self.service
        if Path(record.path).exists():
            delete_checkpoint(record.path)
        service.store.delete_checkpoint(record.run_id, record.name)
        service.durable.delete(CHECKPOINT_EXPIRY, f"{record.run_id}/{record.name}")
        service.access.forget_checkpoint(record.run_id, record.name)
        self._notify_deleted(record.run_id, record.name)

    def _notify_deleted(self, run_id: str, name: str) -> None:
        for callback in self.on_deleted:
            try:
                callback(run_id, name)
            except Exception:
                log.exception("a checkpoint-deleted callback failed for %s/%s", run_id, name)

    # --- a deleted run's checkpoints --------------------------------------------------------------------

    def set_aside(self, run_id: str) -> Path | None:
        """Rename run `run_id`'s checkpoint directory aside (one atomic rename; None if it has none): the
        first step of deleting the run. `put_back` undoes it if the run's rows could not be deleted;
        `start_up` finishes or undoes one a crash interrupted."""
        source = self.service.settings.checkpoint_dir / run_id
        aside = source.with_name(f"{_ASIDE_PREFIX}{uuid.uuid4().hex[:12]}-{run_id}")
        try:
            os.rename(source, aside)
        except FileNotFoundError:
            return None
        return aside

    def put_back(self, run_id: str, aside: Path | None) -> None:
        if aside is not None:
            os.rename(aside, self.service.settings.checkpoint_dir / run_id)

    @staticmethod
    def purge(aside: Path | None) -> None:
        """Remove a deleted run's checkpoint files, set aside by `set_aside`."""
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    def start_up(self) -> None:
        """At startup: finish the run deletions a crash cut short (the run's rows are gone: remove its files),
        and undo those whose rows were never deleted (put its files back)."""
        root = self.service.settings.checkpoint_dir
        for aside in root.glob(f"{_ASIDE_PREFIX}*"):
            run_id = aside.name[len(_ASIDE_PREFIX) :].split("-", 1)[-1]
            if self.service.store.get_run(run_id) is not None and not (root / run_id).exists():
                os.rename(aside, root / run_id)
                log.warning(
                    "run %s was not deleted (the server stopped first): its checkpoints are back", run_id
                )
            else:
                self.purge(aside)
        for run_dir in root.glob("*/"):
            _recover_replacements(run_dir)

    def deleted_with_run(self, run_id: str, names: list[str]) -> None:
        """Tell the facades that run `run_id`'s checkpoints `names` went with it."""
        for name in names:
            self._notify_deleted(run_id, name)

    # --- expiry --------------------------------------------------------------------------------------

    def set_expiry(self, run_id: str, name: str, expires_at: float | None, owner: str | None) -> None:
        """When checkpoint `name` of the caller's run `run_id` expires (Unix seconds; None: never). Once it
        has, the sweeper deletes it as `delete` would. The checkpoint may still be being saved."""
        service = self.service
        service.access.run(run_id, owner)
        if expires_at is not None and not math.isfinite(expires_at):  # NaN would compare as due at once
            raise InvalidInputError("ttl_seconds", f"must be a finite number of seconds, got {expires_at!r}")
        key = f"{run_id}/{name}"
        if expires_at is None:
            service.durable.delete(CHECKPOINT_EXPIRY, key)
        else:
            value = {"run_id": run_id, "name": name, "expires_at": float(expires_at)}
            service.durable.put(CHECKPOINT_EXPIRY, key, value, owner=owner)

    def expiries(self, run_id: str | None = None) -> dict[tuple[str, str], float]:
        """(run id, name) -> when that checkpoint expires, for those with an expiry (of one run, or all)."""
        service = self.service
        records = service.durable.records(
            CHECKPOINT_EXPIRY, include_all=True, prefix=None if run_id is None else f"{run_id}/"
        )
        return {(r.value["run_id"], r.value["name"]): r.value["expires_at"] for r in records}

    def sweep_expired(self, now: float | None = None) -> list[tuple[str, str]]:
        """Delete every checkpoint whose expiry is past (files and records, as `delete` does);
        returns their (run id, name). Run by the sweeper thread; callable directly."""
        service = self.service
        now = time.time() if now is None else now
        deleted = []
        for (run_id, name), expires_at in self.expiries().items():
            if expires_at > now:
                continue
            record = service.store.get_checkpoint(run_id, name)
            if record is None:  # deleted already (or its save failed): only the expiry is left
                service.durable.delete(CHECKPOINT_EXPIRY, f"{run_id}/{name}")
                continue
            self.remove(record)
            log.info("checkpoint %s/%s expired and was deleted", run_id, name)
            deleted.append((run_id, name))
        return deleted


def _deleted_meanwhile(run_id: str, name: str, path: Path) -> NotFoundError:
    """The error of a save whose run was deleted while it ran, once its files are discarded."""
    _discard(path)
    return NotFoundError(
        f"run {run_id!r} was deleted while checkpoint {name!r} was being saved; nothing was kept"
    )


def _discard(path: Path) -> None:
    """Remove the files of a checkpoint no record will index, and its run's directory if that is now empty."""
    with contextlib.suppress(OSError, NotFoundError, InvalidInputError):  # best effort: a hidden leftover
        delete_checkpoint(path)
    with contextlib.suppress(OSError):  # not empty (another save of the deleted run): removed with it
        path.parent.rmdir()


def _recover_replacements(run_dir: Path) -> None:
    """At startup: what `save(overwrite=True)` left when the server stopped mid-swap. A new checkpoint not
    swapped in is dropped (its save never finished: the record still names the old one); an old one renamed
    aside goes back if nothing took its place, else it is removed."""
    for entry in run_dir.iterdir():
        match = _REPLACEMENT.match(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        final = run_dir / match["name"]
        if match["mark"] == _OLD_MARK and not final.exists():
            os.rename(entry, final)
            log.warning("checkpoint %s: the save replacing it did not finish; the old one is back", final)
        else:
            shutil.rmtree(entry, ignore_errors=True)
