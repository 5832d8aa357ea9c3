"""`Service`: runs, jobs, checkpoints and restore, over one `Backend`.

Every facade (native REST, Tinker, OpenAI) calls the service — never the engine — so that each op is
recorded as a job, ordered per run, persisted and accounted in exactly one way. It takes engine types
and the shared schemas of `eztinker.models`, answers with jobs whose results are typed
(`eztinker.service.results`), and knows nothing about HTTP. Its parts: `access` (keys and ownership),
`limits` (what one request and one key may ask), `views` (listings, queue, metrics, health), and
`sampling` (the one way to sample, and sampler snapshots).

Durability: a job is written to the store when it is submitted and when it finishes (two small writes);
runs, checkpoints and per-step metrics are written as they change. Adapter tensors live in memory and in
checkpoints only — after a restart a run is `lost` until a checkpoint is loaded into it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eztinker.backend import BackendHooks, RunSpec, SaveOptions, SchedulerOptions, make_backend
from eztinker.engine import (
    AdamParams,
    Datum,
    DimuonParams,
    Engine,
    ForwardBackwardResult,
    OptimStepResult,
    RunInfo,
    TokenLoss,
    TrainOp,
)
from eztinker.engine.checkpoint import (
    CheckpointInfo,
    ModuleNames,
    delete_checkpoint,
    parse_age_recipients,
    remove_stale_temp_dirs,
)
from eztinker.engine.checkpoint.disk import link_tree
from eztinker.engine.errors import ConflictError, InvalidInputError, NotFoundError
from eztinker.engine.optimizers import OptimizerName, check_step_params
from eztinker.models import LossFunctionConfig, api
from eztinker.scheduler import Batchable, Deferred, Job, JobResult, QueueFullError, when_done
from eztinker.service import restore
from eztinker.service.access import Access
from eztinker.service.errors import RunLostError
from eztinker.service.limits import Limits, train_tokens
from eztinker.service.results import (
    ForwardBackwardOutput,
    OptimStepOutput,
    RunOutput,
    SaveOutput,
    to_json,
)
from eztinker.service.sampling import Sampling
from eztinker.service.views import Views
from eztinker.settings import Settings
from eztinker.store import CheckpointRecord, JobRecord, RunRecord, StepMetricsRecord, Store
from eztinker.store.facade import FacadeState
from eztinker.telemetry import Telemetry

log = logging.getLogger(__name__)

FINISHED_JOBS_KEPT_SECONDS = 600.0  # in memory for fast polls; older results come from the store
RUN_OPTIMIZERS = "run_optimizer"  # FacadeState namespace: run id -> {"type": its optimizer} (non-AdamW runs)
# FacadeState namespace: "<run>/<name>" -> {"run_id", "name", "expires_at" (Unix seconds)}; swept by the service
CHECKPOINT_EXPIRY = "checkpoint_expiry"


_COPY_IS_FROZEN = (
    "run {run_id!r} holds copied weights and cannot be trained; create a new run from its checkpoint "
    "(create_training_client_from_state) to train on"
)


class Service:
    """Runs, jobs, checkpoints and restore over one backend (see the module docstring)."""

    def __init__(self, settings: Settings, *, engine: Engine | None = None) -> None:
        """`settings.worker_pool` picks the backend: models in this process (the default; `engine` is
        the one to use, if given) or on Ray model workers."""
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(settings.resolved_database_url)
        self.telemetry = Telemetry()
        self.access = Access(settings.api_keys, self.store)
        self.limits = Limits(settings, per_key=self.access.enabled)
        bounds = {"workers", "max_queue", "max_queue_per_run", "max_pass_jobs", "pass_token_budget"}
        options = SchedulerOptions(
            **settings.model_dump(include=bounds),
            pass_linger=settings.pass_linger_ms / 1000,
            on_finish=self._job_finished,
            on_pass=self.telemetry.pass_finished,
        )
        hooks = BackendHooks(
            on_first_token=self.telemetry.time_to_first_token.observe,
            on_tokens=self.telemetry.tokens_sampled.inc,
            on_runs_lost=lambda worker, run_ids: restore.runs_lost(self, worker, run_ids),
            restore_run=lambda run_id: restore.restore_run(self, run_id),
        )
        self.backend = make_backend(settings, options, hooks, engine=engine)
        self.scheduler = self.backend.scheduler
        self.telemetry.watch_scheduler(self.scheduler)
        self.telemetry.watch_sampling(self.backend)
        self.telemetry.watch_paging(self.backend.paging_stats)
        # Called with (run id, name) after a checkpoint is deleted, by a route or when it expired (a
        # facade, or `sampling`, drops what it kept about it).
        self.on_checkpoint_deleted: list[Callable[[str, str], None]] = []
        # Told (run id, name) when `save(overwrite=True)` has replaced a checkpoint's files with new ones.
        self.on_checkpoint_replaced: list[Callable[[str, str], None]] = []
        self.views = Views(self)
        self.sampling = Sampling(self)
        self._pending_losses: dict[str, list[tuple[float, int]]] = {}  # run -> (loss, tokens) since last step
        self._lock = threading.Lock()
        self.active: dict[str, RunRecord] = {}  # runs whose adapter is in memory (ownership checks)
        # Each run's optimizer, fixed when it is created: durable (a `lost` run resumes with it), and
        # recorded only for non-AdamW runs; `_optimizers` caches what was read.
        self._durable = FacadeState(self.store)
        self._optimizers: dict[str, OptimizerName] = {}
        self._submitted = 0
        self.started_at = time.time()
        self._stopping = threading.Event()
        self._sweeper: threading.Thread | None = None

    # --- life cycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Import plugins, recover from a previous process, start the backend, preload models."""
        for module in self.settings.plugins:
            importlib.import_module(module)
            log.info("plugin %s imported", module)
        for run_dir in self.settings.checkpoint_dir.glob("*/"):  # leftovers of saves cut short by a crash
            remove_stale_temp_dirs(run_dir)
        alive = self.backend.start()  # runs whose adapters outlived the old process (detached Ray workers)
        lost = self.store.mark_active_runs_lost(keep=alive)
        failed = self.store.fail_inflight_jobs("the server stopped while this job was queued or running")
        if lost or failed:
            log.warning(
                "recovered after restart: %d runs need a checkpoint loaded, %d jobs failed", len(lost), failed
            )
        for name in self.settings.models:
            self.backend.load_model(name)
        self._stopping.clear()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="checkpoint-sweeper", daemon=True)
        self._sweeper.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=30)
            self._sweeper = None
        self.backend.stop()
        self.store.close()

    def _sweep_loop(self) -> None:
        """Every `checkpoint_sweep_seconds` until `stop`: delete the checkpoints that expired."""
        while not self._stopping.wait(self.settings.checkpoint_sweep_seconds):
            try:
                self.sweep_expired_checkpoints()
            except Exception:  # a failed sweep (the database busy, a file in use) is tried again next time
                log.exception("sweeping expired checkpoints failed")

    # --- runs ----------------------------------------------------------------------------------------

    def live_run(self, run_id: str, owner: str | None) -> RunRecord:
        """The caller's run, if its adapter is in memory: checked from memory on the hot path of every op."""
        record = self.active.get(run_id)
        if record is not None and self.access.allows(record.owner, owner):
            return record
        record = self.access.run(run_id, owner)
        if record.status == "copy":
            raise ConflictError(_COPY_IS_FROZEN.format(run_id=run_id))
        if record.status == "lost":
            raise RunLostError(
                f"run {run_id!r} lost its in-memory adapter (the server restarted, or its model worker "
                f"died before the run had a checkpoint); resume it by loading a checkpoint "
                f"(POST /v1/runs/{run_id}/load)"
            )
        self.active[run_id] = record
        return record

    def create_run(self, request: api.CreateRunRequest, owner: str | None, peft: str = "") -> api.Run:
        """Create a run (loading its base model on first use), or from PEFT directory `peft`. Blocking."""
        if request.run_id is not None and self.store.get_run(request.run_id) is not None:
            raise ConflictError(f"run id {request.run_id!r} is already in use; choose another or omit run_id")
        self.limits.check_runs(sum(1 for record in list(self.active.values()) if record.owner == owner))
        source = request.from_checkpoint
        info = self.backend.create_run(
            RunSpec(
                request.base_model,
                request.lora_config,
                request.loss_config,
                run_id=request.run_id,
                adapter_path=peft or None
                if source is None
                else self.access.readable_checkpoint(source.run_id, source.name, owner)[1].path,
                optimizer=request.optimizer,
                with_optimizer=source is None or source.with_optimizer,
            )
        )
        self._set_run_optimizer(info.run_id, info.optimizer, owner)
        now = time.time()
        record = RunRecord(
            run_id=info.run_id,
            base_model=info.base_model,
            lora_config=info.lora_config.model_dump(),
            loss_config=info.loss_config.model_dump(),
            owner=owner,
            step=info.step,
            status="active",
            num_parameters=info.num_parameters,
            last_loss=None,
            created_at=now,
            updated_at=now,
        )
        self.store.add_run(record)
        self.active[record.run_id] = record
        return self.views.get_run(info.run_id, owner)

    def run_optimizer(self, run_id: str) -> OptimizerName:
        """The run's optimizer ("adamw" or "dimuon"), fixed when it was created."""
        name = self._optimizers.get(run_id)
        if name is None:
            record = self._durable.get(RUN_OPTIMIZERS, run_id)
            name = record.value["type"] if record is not None else "adamw"
            self._optimizers[run_id] = name
        return name

    def _set_run_optimizer(self, run_id: str, name: OptimizerName, owner: str | None) -> None:
        if name == "adamw":  # the default: no record (and none left by an earlier run of this id)
            self._durable.delete(RUN_OPTIMIZERS, run_id)
        else:
            self._durable.put(RUN_OPTIMIZERS, run_id, {"type": name}, owner=owner)
        self._optimizers[run_id] = name

    def delete_run(self, run_id: str, owner: str | None) -> None:
        """Forget the run: its adapter is freed; its checkpoints' files stay on disk until deleted."""
        self.access.run(run_id, owner)
        with contextlib.suppress(NotFoundError):  # a lost run has nothing in memory
            self.backend.delete_run(run_id)
        self.store.delete_run(run_id)
        self._durable.delete(RUN_OPTIMIZERS, run_id)
        self._optimizers.pop(run_id, None)
        self.sampling.release(run_ids=[run_id])  # its sessions' snapshots, once no sample uses them
        self.forget(run_id)

    def copy_checkpoint(
        self, run_id: str, name: str, owner: str | None, *, new_run_id: str | None = None
    ) -> CheckpointRecord:
        """Copy a checkpoint the caller may read (its own, or a published one) into a new run of the caller's
        (status `copy`: it holds the checkpoint and is never trained). The files are hard links where the
        file system allows, so no bytes are duplicated, and each copy lives as long as its own run does.
        Returns the copy's checkpoint record."""
        source_run, source = self.access.readable_checkpoint(run_id, name, owner)
        new_run_id = new_run_id or f"copy-{uuid.uuid4().hex[:16]}"
        if self.store.get_run(new_run_id) is not None:
            raise ConflictError(f"run id {new_run_id!r} is already in use; choose another")
        target = self.checkpoint_path(new_run_id, name)
        link_tree(Path(source.path), target)
        now = time.time()
        self.store.add_run(  # the source run's model, configs and size
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
        self._set_run_optimizer(new_run_id, self.run_optimizer(source_run.run_id), owner)
        optimizer = None if source.optimizer_path is None else str(target / Path(source.optimizer_path).name)
        copy = dataclasses.replace(
            source, run_id=new_run_id, path=str(target), optimizer_path=optimizer, owner=owner, created_at=now
        )
        self.store.add_checkpoint(copy)
        return copy

    def forget(self, run_id: str) -> None:
        """Drop what is kept in memory about the run (read again from the store on its next op)."""
        self.active.pop(run_id, None)
        with self._lock:
            self._pending_losses.pop(run_id, None)

    # --- jobs ----------------------------------------------------------------------------------------

    def submit(
        self,
        op: str,
        run_id: str | None,
        fn: Callable[[], JobResult | Deferred],
        owner: str | None,
        *,
        tokens: int = 0,
        batch: Batchable | None = None,
        shared: bool = False,
    ) -> Job:
        """Record the job, then queue it: it is durable before the caller hears its id.

        `tokens` is the job's work (fair share and estimates); `batch` lets it execute together with
        other runs' jobs of its kind (`fn` is how it executes alone).
        """
        job = Job(op=op, run_id=run_id, fn=fn, owner=owner, tokens=tokens, batch=batch, shared=shared)
        counted = self.limits.admit_job(owner)
        if counted:
            job.future.add_done_callback(lambda _: self.limits.job_left(owner))
        self.store.add_job(
            JobRecord(job_id=job.job_id, run_id=run_id, op=op, owner=owner, created_at=job.created_at)
        )
        try:
            self.scheduler.submit(job)
        except QueueFullError as exc:
            self.store.finish_job(job.job_id, status="failed", error=str(exc), error_category="server")
            if counted:
                self.limits.job_left(owner)
            raise
        self._submitted += 1
        if self._submitted % 1000 == 0:  # finished jobs live on in the store; keep memory bounded
            self.scheduler.forget(older_than=time.time() - FINISHED_JOBS_KEPT_SECONDS)
        return job

    def _job_finished(self, job: Job) -> None:
        self.telemetry.job_finished(job)
        self.store.finish_job(
            job.job_id,
            status=job.status,
            result=to_json(job.result),
            error=job.error,
            error_category=job.error_category,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )

    # --- training ops --------------------------------------------------------------------------------

    def forward_backward(
        self,
        run_id: str,
        data: list[Datum],
        loss: LossFunctionConfig | TokenLoss | None,
        owner: str | None,
        *,
        backward: bool = True,
    ) -> Job:
        """`forward_backward` (or `forward`) of engine data; `loss` None: the run's own loss."""
        record = self.live_run(run_id, owner)
        self.limits.check_data(data)
        op = TrainOp(run_id, data, loss, backward)
        self.backend.check_data(op)  # a bad request is refused now, not as a failed job later

        def trained(result: ForwardBackwardResult) -> ForwardBackwardOutput:
            tokens = int(result.metrics.get("num_tokens:sum", 0))
            self.telemetry.tokens_trained.inc(tokens)
            if backward:
                with self._lock:
                    self._pending_losses.setdefault(run_id, []).append((result.loss, tokens))
            return ForwardBackwardOutput(result.loss, [lp.tolist() for lp in result.logprobs], result.metrics)

        def finish(future: Any) -> ForwardBackwardOutput | Deferred:
            return when_done(future, trained)

        batch = Batchable(kind="train", group=record.base_model, request=op, finish=finish)
        name = "forward_backward" if backward else "forward"
        work = lambda: finish(self.backend.forward_backward([op])[0])  # noqa: E731
        return self.submit(name, run_id, work, owner, tokens=train_tokens(data), batch=batch)

    def optimizer_of(self, run_id: str, owner: str | None) -> OptimizerName:
        """The optimizer of the caller's live run `run_id`."""
        self.live_run(run_id, owner)
        return self.run_optimizer(run_id)

    def optim_step(self, run_id: str, params: AdamParams | DimuonParams, owner: str | None) -> Job:
        """`optim_step` with the params of the run's optimizer (other params are refused now)."""
        record = self.live_run(run_id, owner)
        check_step_params(self.run_optimizer(run_id), params, run_id)
        step = (run_id, params)

        def stepped(result: OptimStepResult) -> OptimStepOutput:
            with self._lock:
                pending = self._pending_losses.pop(run_id, [])
            tokens = sum(n for _, n in pending)
            loss = sum(loss for loss, _ in pending) / len(pending) if pending else None
            self.store.add_step_metrics(
                StepMetricsRecord(
                    run_id=run_id,
                    step=result.step,
                    loss=loss,
                    learning_rate=result.learning_rate,
                    grad_norm=result.grad_norm,
                    num_tokens=tokens,
                    time=time.time(),
                )
            )  # (this also sets the run's step and last loss, in the same transaction)
            return OptimStepOutput(result.step, result.grad_norm, result.learning_rate)

        def finish(future: Any) -> OptimStepOutput | Deferred:
            return when_done(future, stepped)

        batch = Batchable(kind="optim", group=record.base_model, request=step, finish=finish)
        work = lambda: finish(self.backend.optim_step([step])[0])  # noqa: E731
        return self.submit("optim_step", run_id, work, owner, batch=batch)

    # --- checkpoints ---------------------------------------------------------------------------------

    def checkpoint_path(self, run_id: str, name: str) -> Path:
        return self.settings.checkpoint_dir / run_id / name

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
        self.live_run(run_id, owner)
        replacing = self.store.get_checkpoint(run_id, request.name) is not None
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
        final = self.checkpoint_path(run_id, request.name)
        path = final.with_name(f".{request.name}.new-{uuid.uuid4().hex[:12]}") if replacing else final

        def recorded(info: CheckpointInfo) -> SaveOutput:
            if replacing:
                info = self._swap_in(info, final)
            optimizer_path = str(info.optimizer_path) if info.optimizer_path else None
            (self.store.replace_checkpoint if replacing else self.store.add_checkpoint)(
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
                self.access.forget_checkpoint(run_id, request.name)
                for callback in self.on_checkpoint_replaced:
                    callback(run_id, request.name)
            return SaveOutput(request.name, info.step, str(info.path), optimizer_path, info.size_bytes)

        return self.submit(
            "save", run_id, lambda: when_done(self.backend.save(run_id, path, options), recorded), owner
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

    def load(self, run_id: str, request: api.LoadRequest, owner: str | None) -> Job:
        """Load a checkpoint into a run — also the way a `lost` run resumes after a restart."""
        record = self.access.run(run_id, owner)
        if record.status == "copy":
            raise ConflictError(_COPY_IS_FROZEN.format(run_id=run_id))
        _, checkpoint = self.access.readable_checkpoint(request.source_run_id or run_id, request.name, owner)

        def loaded(info: RunInfo) -> RunOutput:
            self.store.update_run(run_id, step=info.step, status="active", num_parameters=info.num_parameters)
            self.forget(run_id)  # re-read as active on the next op
            return RunOutput(self.views.get_run(run_id, owner))

        def work() -> RunOutput | Deferred:
            if record.status == "lost":  # rebuild the adapter slot, then fill it from the checkpoint
                self.backend.create_run(self.spec(record))
            future = self.backend.load(run_id, Path(checkpoint.path), with_optimizer=request.with_optimizer)
            return when_done(future, loaded)

        return self.submit("load", run_id, work, owner)

    def spec(self, record: RunRecord, adapter_path: str | None = None) -> RunSpec:
        """Run `record` to create again, with its configs and optimizer (and `adapter_path`'s weights)."""
        return RunSpec(
            record.base_model,
            record.lora_config,
            record.loss_config,
            run_id=record.run_id,
            adapter_path=adapter_path,
            optimizer=self.run_optimizer(record.run_id),
        )

    def delete_checkpoint(self, run_id: str, name: str, owner: str | None) -> None:
        self._remove_checkpoint(self.access.checkpoint(run_id, name, owner))

    def _remove_checkpoint(self, record: CheckpointRecord) -> None:
        """Delete a checkpoint's files, its store record and its expiry, and tell the facades."""
        if Path(record.path).exists():
            delete_checkpoint(record.path)
        self.store.delete_checkpoint(record.run_id, record.name)
        self._durable.delete(CHECKPOINT_EXPIRY, f"{record.run_id}/{record.name}")
        self.access.forget_checkpoint(record.run_id, record.name)
        for callback in self.on_checkpoint_deleted:
            try:
                callback(record.run_id, record.name)
            except Exception:
                log.exception("a checkpoint-deleted callback failed for %s/%s", record.run_id, record.name)

    # --- checkpoint expiry ---------------------------------------------------------------------------

    def set_checkpoint_expiry(
        self, run_id: str, name: str, expires_at: float | None, owner: str | None
    ) -> None:
        """When checkpoint `name` of the caller's run `run_id` expires (Unix seconds; None: never). Once it
        has, the sweeper deletes it as `delete_checkpoint` would. The checkpoint may still be being saved."""
        self.access.run(run_id, owner)
        key = f"{run_id}/{name}"
        if expires_at is None:
            self._durable.delete(CHECKPOINT_EXPIRY, key)
        else:
            value = {"run_id": run_id, "name": name, "expires_at": float(expires_at)}
            self._durable.put(CHECKPOINT_EXPIRY, key, value, owner=owner)

    def checkpoint_expiries(self, run_id: str | None = None) -> dict[tuple[str, str], float]:
        """(run id, name) -> when that checkpoint expires, for those with an expiry (of one run, or all)."""
        records = self._durable.records(
            CHECKPOINT_EXPIRY, include_all=True, prefix=None if run_id is None else f"{run_id}/"
        )
        return {(r.value["run_id"], r.value["name"]): r.value["expires_at"] for r in records}

    def sweep_expired_checkpoints(self, now: float | None = None) -> list[tuple[str, str]]:
        """Delete every checkpoint whose expiry is past (files and records, as `delete_checkpoint` does);
        returns their (run id, name). Run by the sweeper thread; callable directly."""
        now = time.time() if now is None else now
        deleted = []
        for (run_id, name), expires_at in self.checkpoint_expiries().items():
            if expires_at > now:
                continue
            record = self.store.get_checkpoint(run_id, name)
            if record is None:  # deleted already (or its save failed): only the expiry is left
                self._durable.delete(CHECKPOINT_EXPIRY, f"{run_id}/{name}")
                continue
            self._remove_checkpoint(record)
            log.info("checkpoint %s/%s expired and was deleted", run_id, name)
            deleted.append((run_id, name))
        return deleted
