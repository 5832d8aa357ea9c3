"""`Service`: runs, jobs, checkpoints and restore, over one `Backend`.

Every facade (native REST, Tinker, OpenAI) calls the service — never the engine — so that each op is
recorded as a job, ordered per run, persisted and accounted in exactly one way. It takes engine types
and the shared schemas of `eztinker.models`, answers with jobs whose results are typed
(`eztinker.service.results`), and knows nothing about HTTP. Its parts: `access` (keys and ownership),
`limits` (what one request and one key may ask), `checkpoints` (saving, copying, deleting and expiring
them), `views` (listings, queue, metrics, health), and `sampling` (the one way to sample, and sampler
snapshots).

Durability: a job is written to the store when it is submitted and when it finishes (two small writes);
runs, checkpoints and per-step metrics are written as they change. Adapter tensors live in memory and in
checkpoints only — after a restart a run is `lost` until a checkpoint is loaded into it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from eztinker.backend import BackendHooks, RunSpec, SchedulerOptions, make_backend
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
from eztinker.engine.checkpoint import is_encrypted, remove_stale_temp_dirs
from eztinker.engine.errors import ConflictError, NotFoundError
from eztinker.engine.optimizers import OptimizerName, check_step_params
from eztinker.models import LossFunctionConfig, api
from eztinker.scheduler import Batchable, Deferred, Job, JobResult, QueueFullError, when_done
from eztinker.service import restore
from eztinker.service.access import PUBLIC_CHECKPOINTS, Access
from eztinker.service.checkpoints import CHECKPOINT_EXPIRY, Checkpoints
from eztinker.service.errors import RunLostError
from eztinker.service.limits import Limits, train_tokens
from eztinker.service.loss_config import check_loss_config
from eztinker.service.results import (
    ForwardBackwardOutput,
    OptimStepOutput,
    RunOutput,
    to_json,
)
from eztinker.service.sampling import Sampling
from eztinker.service.views import Views
from eztinker.settings import Settings
from eztinker.store import CheckpointRecord, JobRecord, RunRecord, StepMetricsRecord, Store
from eztinker.store.facade import FacadeState, delete_in
from eztinker.telemetry import Telemetry

log = logging.getLogger(__name__)

FINISHED_JOBS_KEPT_SECONDS = 600.0  # in memory for fast polls; older results come from the store
RUN_OPTIMIZERS = "run_optimizer"  # FacadeState namespace: run id -> {"type": its optimizer} (non-AdamW runs)


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
        self.checkpoints = Checkpoints(self)
        self.views = Views(self)
        self.sampling = Sampling(self)
        self._pending_losses: dict[str, list[tuple[float, int]]] = {}  # run -> (loss, tokens) since last step
        self._lock = threading.Lock()
        self.active: dict[str, RunRecord] = {}  # runs whose adapter is in memory (ownership checks)
        # Each run's optimizer, fixed when it is created: durable (a `lost` run resumes with it), and
        # recorded only for non-AdamW runs; `_optimizers` caches what was read.
        self.durable = FacadeState(self.store)
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
        self.checkpoints.start_up()  # finish (or undo) run deletions a crash cut short
        remove_stale_temp_dirs(self.settings.checkpoint_dir)  # an import's staging directory
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
                self.checkpoints.sweep_expired()
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
                f"died before the run had a checkpoint); {self._resume_hint(run_id)}"
            )
        self.active[run_id] = record
        return record

    def create_run(self, request: api.CreateRunRequest, owner: str | None, peft: str = "") -> api.Run:
        """Create a run (loading its base model on first use), or from PEFT directory `peft`. Blocking."""
        if request.run_id is not None and self.store.get_run(request.run_id) is not None:
            raise ConflictError(f"run id {request.run_id!r} is already in use; choose another or omit run_id")
        self.limits.check_runs(sum(1 for record in list(self.active.values()) if record.owner == owner))
        check_loss_config(request.loss_config)  # a bad parameter is refused now, not by every later op
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
        self.record_run_optimizer(info.run_id, info.optimizer, owner)
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
            record = self.durable.get(RUN_OPTIMIZERS, run_id)
            name = record.value["type"] if record is not None else "adamw"
            self._optimizers[run_id] = name
        return name

    def record_run_optimizer(self, run_id: str, name: OptimizerName, owner: str | None) -> None:
        """Fix run `run_id`'s optimizer (durably: a `lost` run resumes with it)."""
        if name == "adamw":  # the default: no record (and none left by an earlier run of this id)
            self.durable.delete(RUN_OPTIMIZERS, run_id)
        else:
            self.durable.put(RUN_OPTIMIZERS, run_id, {"type": name}, owner=owner)
        self._optimizers[run_id] = name

    def delete_run(self, run_id: str, owner: str | None) -> None:
        """Delete the run and everything saved of it: its adapter, its checkpoints (files and records,
        published ones too — they are gone for every key — with their expiries), its metrics and its held
        sampler snapshots. Copies of its checkpoints (`Checkpoints.copy`) stay: their files are their own.
        The job history stays.

        Atomic: the run's checkpoint directory is renamed aside, then every row of the run goes in one
        transaction, then the files; a failure puts the directory back, and a crash in between is finished
        (or undone) at the next start."""
        self.access.run(run_id, owner)
        # Its queued ops were sent against this run: they must not run on a later run of the same id.
        self.scheduler.cancel_queued(
            run_id, f"run {run_id!r} was deleted before this op ran", category="user"
        )
        with contextlib.suppress(NotFoundError):  # a lost run has nothing in memory
            self.backend.delete_run(run_id)
        names = [c.name for c in self.store.list_checkpoints(run_id=run_id, include_all=True)]
        aside = self.checkpoints.set_aside(run_id)
        try:
            self.store.delete_run(run_id, also=lambda session: self._delete_run_state(session, run_id))
        except BaseException:
            self.checkpoints.put_back(run_id, aside)
            raise
        self.checkpoints.purge(aside)
        self._optimizers.pop(run_id, None)
        self.checkpoints.deleted_with_run(run_id, names)
        self.sampling.release(run_ids=[run_id])  # its sessions' snapshots, once no sample uses them
        self.forget(run_id)

    @staticmethod
    def _delete_run_state(session: Session, run_id: str) -> None:
        """The service's own records of run `run_id` (optimizer; its checkpoints' publication and expiry),
        deleted in the transaction that deletes the run."""
        delete_in(session, RUN_OPTIMIZERS, [run_id])
        delete_in(session, CHECKPOINT_EXPIRY, prefix=f"{run_id}/")
        delete_in(session, PUBLIC_CHECKPOINTS, prefix=f"{run_id}/")

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
        try:
            self.store.add_job(
                JobRecord(job_id=job.job_id, run_id=run_id, op=op, owner=owner, created_at=job.created_at)
            )
        except BaseException:  # never queued: its place in the key's quota is free again
            if counted:
                self.limits.job_left(owner)
            raise
        if counted:
            job.future.add_done_callback(lambda _: self.limits.job_left(owner))
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
        if isinstance(loss, LossFunctionConfig):
            check_loss_config(loss)
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
        check_step_params(self.run_optimizer(run_id), params, run_id, rank=_lora_rank(record))
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

    def load(self, run_id: str, request: api.LoadRequest, owner: str | None) -> Job:
        """Load a checkpoint into a run — also the way a `lost` run resumes after a restart."""
        record = self.access.run(run_id, owner)
        if record.status == "copy":
            raise ConflictError(_COPY_IS_FROZEN.format(run_id=run_id))
        _, checkpoint = self.access.readable_checkpoint(request.source_run_id or run_id, request.name, owner)

        def loaded(info: RunInfo) -> RunOutput:
            if not self.store.update_run(
                run_id, step=info.step, status="active", num_parameters=info.num_parameters
            ):  # deleted while it loaded: free what the load rebuilt, so the id is free again
                self._free(run_id)
                raise NotFoundError(f"run {run_id!r} was deleted while the checkpoint was loading into it")
            self.forget(run_id)  # re-read as active on the next op
            return RunOutput(self.views.get_run(run_id, owner))

        def work() -> RunOutput | Deferred:
            rebuilt = record.status == "lost" and self._rebuild_lost(run_id, record)
            future = self.backend.load(run_id, Path(checkpoint.path), with_optimizer=request.with_optimizer)
            if rebuilt:  # a failed load leaves the run lost, as it was: free the slot it rebuilt (this
                # callback is registered first, so it runs before the job is failed and a retry can start)
                future.add_done_callback(lambda done: self._free(run_id) if done.exception() else None)
            return when_done(future, loaded)

        return self.submit("load", run_id, work, owner)

    def _rebuild_lost(self, run_id: str, record: RunRecord) -> bool:
        """Rebuild lost run `run_id`'s adapter slot for a load to fill; False if it has one already (an
        earlier load of the same queue restored it)."""
        if self.store.get_run(run_id) is None:
            raise NotFoundError(f"no run {run_id!r} (it was deleted before the load ran)")
        try:
            self.backend.create_run(self.spec(record))
        except ConflictError:
            return False
        return True

    def _free(self, run_id: str) -> None:
        with contextlib.suppress(NotFoundError):
            self.backend.delete_run(run_id)

    def latest_checkpoint(self, run_id: str) -> CheckpointRecord | None:
        """The checkpoint a restored run resumes from: its newest `state` checkpoint (adapter, optimizer
        and step), else its newest one the server can read (weights only: the optimizer starts afresh);
        None if it has neither. A newer weights-only save never hides a state checkpoint."""
        checkpoints = self.store.list_checkpoints(run_id=run_id, include_all=True)
        states = [c for c in checkpoints if c.kind == "state"]
        readable = states or [c for c in checkpoints if not is_encrypted(c.path)]
        return max(readable, key=lambda c: (c.created_at, c.step)) if readable else None

    def _resume_hint(self, run_id: str) -> str:
        """How lost run `run_id` resumes: by loading the checkpoint `latest_checkpoint` picks."""
        latest = self.latest_checkpoint(run_id)
        if latest is None:
            return (
                "it has no checkpoint: load one of another run's into it (source_run_id), or start a new run"
            )
        what = "" if latest.kind == "state" else " (weights only: its optimizer state starts afresh)"
        return (
            f"resume it by loading a checkpoint: its latest is {latest.name!r} (step {latest.step}){what}, "
            f'POST /v1/runs/{run_id}/load {{"name": "{latest.name}"}}, or '
            f"client.load_checkpoint({run_id!r}, {latest.name!r})"
        )

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


def _lora_rank(record: RunRecord) -> int | None:
    """The run's LoRA rank, from its stored config (None if the record lacks one)."""
    rank = record.lora_config.get("r") if isinstance(record.lora_config, dict) else None
    return rank if isinstance(rank, int) else None
