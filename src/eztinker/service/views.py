"""`Views`: what callers read — runs, checkpoints, jobs, the queue, metrics, models, health — each
filtered by the one ownership check, and the checkpoint archives they download. Nothing here changes
state."""

from __future__ import annotations

import contextlib
import dataclasses
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from eztinker import __version__
from eztinker.engine import SamplerInfo
from eztinker.engine.errors import NotFoundError
from eztinker.models import api
from eztinker.scheduler import Job
from eztinker.service.results import Result, decode
from eztinker.store import CheckpointRecord, RunRecord

if TYPE_CHECKING:
    from eztinker.service.core import Service


@dataclass(frozen=True)
class JobView:
    """A job as a facade answers for it: live, or read back from the store; `result` typed."""

    job_id: str
    op: str
    run_id: str | None
    status: Literal["queued", "running", "completed", "failed"]
    result: Result | dict[str, Any] | None
    error: str | None
    error_category: Literal["user", "server"] | None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    queue_position: int | None = None
    estimated_start: float | None = None
    pass_size: int | None = None


class Views:
    """The reads of one service (see the module docstring)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    # --- runs and checkpoints ------------------------------------------------------------------------

    def get_run(self, run_id: str, owner: str | None) -> api.Run:
        return self._run(self.service.access.run(run_id, owner))

    def checkpoint_run(self, run_id: str, name: str, owner: str | None) -> api.Run:
        """The run a checkpoint the caller may read (its own, or a published one) was saved from."""
        return self._run(self.service.access.readable_checkpoint(run_id, name, owner)[0])

    def list_runs(self, owner: str | None) -> list[api.Run]:
        return [run for run, _ in self.runs_with_owners(owner)]

    def runs_with_owners(self, owner: str | None) -> list[tuple[api.Run, str | None]]:
        """The caller's runs (every run without keys), each with its owner id (None: made without auth)."""
        service = self.service
        return [(self._run(r), r.owner) for r in service.store.list_runs(**service.access.listing(owner))]

    def _run(self, record: RunRecord) -> api.Run:
        optimizer = self.service.run_optimizer(record.run_id)
        fields = {
            **dataclasses.asdict(record),
            "loss_config": record.loss_config or {},
            "optimizer": optimizer,
        }
        return api.Run.model_validate(fields)

    def list_checkpoints(self, run_id: str | None, owner: str | None) -> list[api.Checkpoint]:
        """The checkpoints of run `run_id`, or (None) all of the caller's, oldest first."""
        service = self.service
        if run_id is not None:
            service.access.run(run_id, owner)
        records = service.store.list_checkpoints(run_id=run_id, **service.access.listing(owner))
        return [_checkpoint(c) for c in records]

    def metrics(self, run_id: str, owner: str | None) -> api.RunMetrics:
        self.service.access.run(run_id, owner)
        history = [
            api.StepMetrics.model_validate(dataclasses.asdict(m))
            for m in self.service.store.get_step_metrics(run_id)
        ]
        return api.RunMetrics(run_id=run_id, history=history)

    def checkpoint_archive(self, run_id: str, name: str, owner: str | None) -> Path:
        """A .tar.gz of the checkpoint directory in a temporary file (the caller deletes it)."""
        _, record = self.service.access.readable_checkpoint(run_id, name, owner)
        return _tar(record.path, name, prefix=f"{run_id}-{name}-")

    def merged_checkpoint_archive(self, run_id: str, name: str, owner: str | None) -> Path:
        """A .tar.gz of the checkpoint merged into its run's base model: a full Hugging Face model directory.

        Blocking, and as heavy as loading the base model once more in fp32; the caller deletes the file.
        """
        from eztinker.engine.checkpoint import merge_into_base

        run, checkpoint = self.service.access.readable_checkpoint(run_id, name, owner)
        with tempfile.TemporaryDirectory(prefix="eztinker-merge-") as scratch:
            merged = merge_into_base(checkpoint.path, run.base_model, Path(scratch) / f"{name}-merged")
            return _tar(merged, merged.name, prefix=f"{run_id}-{name}-merged-")

    # --- jobs and the queue --------------------------------------------------------------------------

    def get_job(self, job_id: str, owner: str | None) -> JobView:
        service = self.service
        job = service.scheduler.get(job_id)
        if job is not None:
            service.access.require(job.owner, owner, f"no job {job_id!r}")
            entry = (
                None if job.done else next((e for e in service.scheduler.snapshot() if e.job is job), None)
            )
            return _job_view(
                job,
                job.result,
                queue_position=entry.position if entry else None,
                estimated_start=entry.estimated_start if entry else None,
                pass_size=job.pass_size,
            )
        record = service.store.get_job(job_id)
        if record is None:
            raise NotFoundError(f"no job {job_id!r}")
        service.access.require(record.owner, owner, f"no job {job_id!r}")
        return _job_view(record, decode(record.op, record.result))

    def queue(self, owner: str | None) -> api.QueueView:
        """Running and queued jobs in start order with estimates (with auth on: only the caller's jobs)."""
        scheduler, access = self.service.scheduler, self.service.access
        stats = scheduler.stats()
        jobs = [
            api.QueuedJob(
                **{name: getattr(e.job, name) for name in _QUEUED},
                status="running" if e.position is None else "queued",
                position=e.position,
                estimated_start=e.estimated_start,
            )
            for e in scheduler.snapshot()
            if access.allows(e.job.owner, owner)
        ]
        return api.QueueView(**dataclasses.asdict(stats), jobs=jobs)

    # --- models and samplers -------------------------------------------------------------------------

    def list_models(self, owner: str | None) -> list[dict[str, Any]]:
        """Base models, the caller's live runs and sampler snapshots, as OpenAI model entries."""
        service = self.service
        started = int(service.started_at)
        models = [
            {"id": name, "kind": "base_model", "base_model": name, "created": started}
            for name in dict.fromkeys([*service.settings.models, *service.backend.loaded_models])
        ]
        for run in self.list_runs(owner):
            if run.status == "active":
                models.append(
                    {
                        "id": run.run_id,
                        "kind": "run",
                        "base_model": run.base_model,
                        "created": int(run.created_at),
                    }
                )
        for info in self.visible_samplers(owner):
            models.append(
                {"id": info.sampler_id, "kind": "sampler", "base_model": info.base_model, "created": started}
            )
        return models

    def visible_samplers(self, owner: str | None) -> list[SamplerInfo]:
        """Sampler snapshots in memory: all of them without auth; with auth, those the caller took."""
        access = self.service.access
        return [i for i in self.service.backend.list_samplers() if access.allows_sampler(i, owner)]

    def token_texts(self, base_model: str, tokens: list[int]) -> list[str]:
        """The text of each token in the tokenizer of `base_model`, which must be loaded already."""
        backend = self.service.backend
        if base_model not in backend.loaded_models:
            raise NotFoundError(f"base model {base_model!r} is not loaded")
        tokenizer = backend.tokenizer(base_model)
        return [str(tokenizer.decode([token])) for token in tokens]

    # --- the server ----------------------------------------------------------------------------------

    def health(self) -> api.Health:
        backend = self.service.backend
        return api.Health(
            version=__version__,
            device=backend.status().device,
            loaded_models=backend.loaded_models,
            queue_depth=self.service.scheduler.queue_depth,
        )

    def server_stats(self) -> dict[str, Any]:
        """Device, memory, uptime and token totals, for the dashboard's server page."""
        service = self.service
        registry = service.telemetry.registry
        return {
            "uptime_seconds": time.time() - service.started_at,
            "auth_enabled": service.access.enabled,
            "memory": _memory(),
            "tokens_trained": registry.get_sample_value("eztinker_tokens_trained_total") or 0.0,
            "tokens_sampled": registry.get_sample_value("eztinker_tokens_sampled_total") or 0.0,
            "active_runs": len(service.active),
            "workers": [
                {**dataclasses.asdict(w), "models": list(w.models)} for w in service.backend.status().workers
            ],
            "paging": _paging(service),
        }


def _paging(service: Service) -> dict[str, Any] | None:
    """Adapter paging's runs per tier and page-in time (None: the backend does not page)."""
    stats = service.backend.paging_stats()
    return None if stats is None else dataclasses.asdict(stats)


def _memory() -> list[dict[str, Any]]:
    """This process's devices and host: what is allocated, reserved, used, and in all."""
    memory: list[dict[str, Any]] = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            memory.append(
                {
                    "name": f"cuda:{index} {torch.cuda.get_device_name(index)}",
                    "allocated_bytes": torch.cuda.memory_allocated(index),
                    "reserved_bytes": torch.cuda.memory_reserved(index),
                    "used_bytes": total - free,
                    "total_bytes": total,
                }
            )
    with contextlib.suppress(ImportError):  # psutil comes with accelerate; host memory is a nicety
        import psutil

        system = psutil.virtual_memory()
        memory.append(
            {
                "name": "host",
                "allocated_bytes": psutil.Process().memory_info().rss,  # this server process
                "reserved_bytes": None,
                "used_bytes": system.total - system.available,
                "total_bytes": system.total,
            }
        )
    return memory


def _tar(source: str | Path, arcname: str, *, prefix: str) -> Path:
    """`source` as a .tar.gz in a new temporary file, named `arcname` inside."""
    handle, archive = tempfile.mkstemp(prefix=prefix, suffix=".tar.gz")
    try:
        with open(handle, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            tar.add(source, arcname=arcname)
    except BaseException as exc:  # no half archive left in the temporary directory
        Path(archive).unlink(missing_ok=True)
        if isinstance(exc, FileNotFoundError):  # deleted while (or before) it was read
            raise NotFoundError(f"checkpoint {arcname!r} has no files any more (it was deleted)") from None
        raise
    return Path(archive)


_QUEUED = ("job_id", "op", "run_id", "tokens", "created_at", "started_at")
_SHARED = (
    "job_id",
    "op",
    "run_id",
    "status",
    "error",
    "error_category",
    "created_at",
    "started_at",
    "finished_at",
)


def _job_view(source: Job | Any, result: Any, **extra: Any) -> JobView:
    """A job from the live job or its stored record (they share these fields)."""
    return JobView(**{name: getattr(source, name) for name in _SHARED}, result=result, **extra)


def _checkpoint(record: CheckpointRecord) -> api.Checkpoint:
    return api.Checkpoint.model_validate({**dataclasses.asdict(record), "adapter_path": record.path})
