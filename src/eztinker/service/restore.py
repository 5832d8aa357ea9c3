"""Restore after a model worker died (Ray backend): the runs it held are re-created from their latest
checkpoint on another worker, while their queued ops fail with the reason (they were sent against state
that is gone). A run with no checkpoint is `lost` until one is loaded.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from eztinker.service.core import Service

log = logging.getLogger(__name__)


def runs_lost(service: Service, worker: str, run_ids: list[str]) -> None:
    """Worker `worker` died with runs `run_ids`: fail their queued ops (sent against state that is
    gone); ops sent from now on run on the restored run."""
    for run_id in run_ids:
        service.scheduler.cancel_queued(
            run_id,
            f"model worker {worker} died before this op ran; run {run_id!r} is being restored from its "
            "last checkpoint on another worker (see its step), resubmit from there",
        )
        service.forget(run_id)


def restore_run(service: Service, run_id: str) -> None:
    """Re-create the run from its latest checkpoint (adapter, optimizer state and step if saved)."""
    try:
        record = service.store.get_run(run_id)
        if record is None:  # deleted meanwhile
            return
        latest = service.latest_checkpoint(run_id)
        if latest is None:
            log.error("run %s had no checkpoint when its worker died; it is lost", run_id)
            service.store.update_run(run_id, status="lost")
            return
        info = service.backend.create_run(service.spec(record, latest.path))
        service.store.update_run(run_id, step=info.step, status="active", num_parameters=info.num_parameters)
        log.warning("run %s restored from checkpoint %r at step %d", run_id, latest.name, info.step)
    except Exception:
        log.exception("could not restore run %s; it is lost until a checkpoint is loaded", run_id)
        service.store.update_run(run_id, status="lost")
    finally:
        service.active.pop(run_id, None)
