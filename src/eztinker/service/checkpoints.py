"""`Checkpoints`: a run's saved checkpoints — saving, replacing, copying, deleting and expiring them.

`service.checkpoints` is the one place a checkpoint's files, its store record and its expiry change
together; loading one into a run is a run op (`Service.load`). Facades and `sampling` subscribe to
`on_deleted` / `on_replaced` to drop what they kept about a checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from eztinker.backend import SaveOptions
from eztinker.engine.checkpoint import CheckpointInfo, ModuleNames, delete_checkpoint, parse_age_recipients
from eztinker.engine.checkpoint.disk import link_tree
from eztinker.engine.errors import ConflictError, InvalidInputError
from eztinker.models import api
from eztinker.scheduler import Job, when_done
from eztinker.service.results import SaveOutput
from eztinker.store import CheckpointRecord

if TYPE_CHECKING:
    from eztinker.service.core import Service

log = logging.getLogger(__name__)

# FacadeState namespace: "<run>/<name>" -> {"run_id", "name", "expires_at" (Unix seconds)}; swept by the service
CHECKPOINT_EXPIRY = "checkpoint_expiry"


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
        path = final.with_name(f".{request.name}.new-{uuid.uuid4().hex[:12]}") if replacing else final

        def recorded(info: CheckpointInfo) -> SaveOutput:
            if replacing:
                info = self._swap_in(info, final)
            optimizer_path = str(info.optimizer_path) if info.optimizer_path else None
            (service.store.replace_checkpoint if replacing else service.store.add_checkpoint)(
                CheckpointRecord(
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
            )
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
        aside = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:12]}")
        if final.exists():
            os.rename(final, aside)
        os.rename(info.path, final)
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
        service.record_run_optimizer(new_run_id, service.run_optimizer(source_run.run_id), owner)
        optimizer = None if source.optimizer_path is None else str(target / Path(source.optimizer_path).name)
        copy = dataclasses.replace(
            source, run_id=new_run_id, path=str(target), optimizer_path=optimizer, owner=owner, created_at=now
        )
        service.store.add_checkpoint(copy)
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
        for callback in self.on_deleted:
            try:
                callback(record.run_id, record.name)
            except Exception:
                log.exception("a checkpoint-deleted callback failed for %s/%s", record.run_id, record.name)

    # --- expiry --------------------------------------------------------------------------------------

    def set_expiry(self, run_id: str, name: str, expires_at: float | None, owner: str | None) -> None:
        """When checkpoint `name` of the caller's run `run_id` expires (Unix seconds; None: never). Once it
        has, the sweeper deletes it as `delete` would. The checkpoint may still be being saved."""
        service = self.service
        service.access.run(run_id, owner)
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
