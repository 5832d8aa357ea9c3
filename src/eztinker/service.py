"""The service: where the engine, the job scheduler and the durable store meet.

Every facade (native REST, Tinker, OpenAI) calls this — never the engine directly — so that each op is
recorded as a job, ordered per run, persisted, and accounted in metrics in exactly one way. It speaks
engine types and the shared schemas in `eztinker.models`; it knows nothing about HTTP.

Durability: a job is written to the store when it is submitted and when it finishes (two small writes);
runs, checkpoints and per-step metrics are written as they change. Adapter tensors live in memory and in
checkpoints only — after a restart a run is `lost` until a checkpoint is loaded into it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from eztinker import __version__
from eztinker.access import Access
from eztinker.engine import (
    AdamParams,
    Datum,
    DimuonParams,
    Engine,
    EngineConfig,
    ForwardBackwardResult,
    OptimStepResult,
    RunInfo,
    SamplerInfo,
    SamplingParams,
    TokenLoss,
    TrainOp,
)
from eztinker.engine.batcher import SamplingEngines
from eztinker.engine.checkpoint import (
    CheckpointInfo,
    ModuleNames,
    delete_checkpoint,
    parse_age_recipients,
    remove_stale_temp_dirs,
)
from eztinker.engine.errors import ComputeError, ConflictError, InvalidInputError, NotFoundError
from eztinker.engine.optimizers import OptimizerName, check_step_params
from eztinker.engine.sampler import SampleRequest
from eztinker.engine.types import SampledSequence, SampleResult
from eztinker.models import LossFunctionConfig, api
from eztinker.scheduler import Batchable, Deferred, Job, QueueFullError, Scheduler
from eztinker.scheduler.jobs import Completion, PassRunner
from eztinker.settings import Settings
from eztinker.store import CheckpointRecord, JobRecord, RunRecord, StepMetricsRecord, Store
from eztinker.store.facade import FacadeState
from eztinker.telemetry import SamplingRows, Telemetry

if TYPE_CHECKING:
    from eztinker.distributed import WorkerPool

log = logging.getLogger(__name__)

FINISHED_JOBS_KEPT_SECONDS = 600.0  # in memory for fast polls; older results come from the store
RUN_OPTIMIZERS = "run_optimizer"  # FacadeState namespace: run id -> {"type": its optimizer} (non-AdamW runs)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelTarget:
    """What a sampling request runs on: a base model, and the adapter (run or snapshot) on it, if any."""

    base_model: str
    adapter: str | None
    run_id: str | None  # set when the adapter is a live run: the job is then ordered with the run's ops


class QuotaExceededError(Exception):
    """The caller holds as much of a resource as one API key may (HTTP 429, without Retry-After)."""


class RunLostError(ConflictError):
    """The run's adapter is not in memory (the server restarted, or its worker died before any
    checkpoint): load a checkpoint to resume it."""


class Service:
    """Runs, jobs, checkpoints and metrics over one `Engine`."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        """`settings.worker_pool` says where models live: in this process (an `Engine`, the default) or
        on Ray model workers (a `WorkerPool`, which offers the same methods); the rest is the same."""
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(settings.resolved_database_url)
        self.telemetry = Telemetry()
        self.pool: WorkerPool | None = None
        self.sampling: SamplingEngines | None = None
        self.engine: Engine | WorkerPool
        runners: dict[str, PassRunner]
        if settings.worker_pool == "ray":
            from eztinker.distributed import WorkerPool  # Ray is imported only in this mode

            self.engine = self.pool = WorkerPool(settings, on_worker_lost=self._worker_lost)
            sampling_rows: SamplingRows = self.pool
            runners = {}  # each worker co-batches its own runs' ops
        else:
            self.engine = engine or Engine(
                EngineConfig(
                    device=settings.device,
                    dtype=_DTYPES[settings.dtype] if settings.dtype else None,
                    token_budget=settings.token_budget,
                )
            )
            self.sampling = SamplingEngines(
                self.engine.base_model,
                on_first_token=self.telemetry.time_to_first_token.observe,
                on_tokens=self.telemetry.tokens_sampled.inc,
            )
            sampling_rows = self.sampling
            # Several runs' training ops execute as one pass: rows routed per run to its own adapter.
            runners = {
                "train": self.engine.forward_backward_many,
                "optim": self.engine.optim_step_many,
                "sample": lambda requests: [None] * len(requests),  # each job's `finish` hands it over
            }
        self.scheduler = Scheduler(
            workers=settings.workers,
            max_queue=settings.max_queue,
            max_queue_per_run=settings.max_queue_per_run,
            max_pass_jobs=settings.max_pass_jobs,
            pass_token_budget=settings.pass_token_budget,
            pass_linger=settings.pass_linger_ms / 1000,
            runners=runners,
            on_finish=self._job_finished,
            on_pass=self.telemetry.pass_finished,
            background=self.sampling,
        )
        self.telemetry.watch_scheduler(self.scheduler)
        self.telemetry.watch_sampling(sampling_rows)
        self.access = Access(settings.api_keys)  # the one ownership check (see eztinker.access)
        self._pending_losses: dict[str, list[tuple[float, int]]] = {}  # run -> (loss, tokens) since last step
        self._lock = threading.Lock()
        self._active: dict[str, RunRecord] = {}  # runs whose adapter is in memory (ownership checks)
        self._sampler_owners: dict[str, str | None] = {}  # sampler snapshot -> the key that took it
        self._jobs_per_owner: dict[str | None, int] = {}  # queued or running jobs, with API keys on
        # Each run's optimizer, fixed when it is created: durable (a `lost` run resumes with it), and
        # recorded only for non-AdamW runs; `_optimizers` caches what was read.
        self._durable = FacadeState(self.store)
        self._optimizers: dict[str, OptimizerName] = {}
        self._submitted = 0
        self.started_at = time.time()

    # --- life cycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Import plugins, recover from a previous process, preload models, start the workers."""
        for module in self.settings.plugins:
            importlib.import_module(module)
            log.info("plugin %s imported", module)
        for run_dir in self.settings.checkpoint_dir.glob("*/"):  # leftovers of saves cut short by a crash
            remove_stale_temp_dirs(run_dir)
        # Runs whose adapters outlived the old process (on detached Ray workers) stay active.
        alive = self.pool.adopt_runs() if self.pool is not None else set()
        lost = self.store.mark_active_runs_lost(keep=alive)
        failed = self.store.fail_inflight_jobs("the server stopped while this job was queued or running")
        if lost or failed:
            log.warning(
                "recovered after restart: %d runs need a checkpoint loaded, %d jobs failed", len(lost), failed
            )
        for name in self.settings.models:
            self.engine.load_model(name)
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()
        if self.sampling is not None:
            self.sampling.abort(ComputeError("the server shut down before the sample finished"))
        if self.pool is not None:
            self.pool.stop()
        self.store.close()

    # --- auth and ownership --------------------------------------------------------------------------

    @property
    def auth_enabled(self) -> bool:
        return self.access.enabled

    def owner_for_key(self, key: str | None) -> str | None:
        """The owner id of a request: its key's hash (None when auth is off). Raises if the key is bad."""
        return self.access.owner_for_key(key)

    def _run_record(self, run_id: str, owner: str | None) -> RunRecord:
        record = self.store.get_run(run_id)
        if record is None:
            raise NotFoundError(f"no run {run_id!r}")
        self.access.require(record.owner, owner, f"no run {run_id!r}")
        return record

    def _live_run(self, run_id: str, owner: str | None) -> RunRecord:
        """The run, if it is active in this process: checked from memory on the hot path of every op."""
        record = self._active.get(run_id)
        if record is not None and self.access.allows(record.owner, owner):
            return record
        record = self._run_record(run_id, owner)
        if record.status == "lost":
            raise RunLostError(
                f"run {run_id!r} lost its in-memory adapter (the server restarted, or its model worker "
                f"died before the run had a checkpoint); resume it by loading a checkpoint "
                f"(POST /v1/runs/{run_id}/load)"
            )
        self._active[run_id] = record
        return record

    # --- runs ----------------------------------------------------------------------------------------

    def create_run(self, request: api.CreateRunRequest, owner: str | None) -> api.Run:
        """Create a run (loading its base model on first use). Blocking: call it off the event loop."""
        if request.run_id is not None and self.store.get_run(request.run_id) is not None:
            raise ConflictError(f"run id {request.run_id!r} is already in use; choose another or omit run_id")
        live = sum(1 for record in list(self._active.values()) if record.owner == owner)
        if self.auth_enabled and live >= self.settings.max_runs_per_key:
            raise QuotaExceededError(
                f"this API key already has {live} live runs (the limit is {self.settings.max_runs_per_key}); "
                "delete runs you no longer train"
            )
        adapter_path = None
        if request.from_checkpoint is not None:
            adapter_path = self._checkpoint(
                request.from_checkpoint.run_id, request.from_checkpoint.name, owner
            ).path
        info = self.engine.create_run(
            request.base_model,
            request.lora_config,
            request.loss_config,
            run_id=request.run_id,
            adapter_path=adapter_path,
            optimizer=request.optimizer,
            with_optimizer=request.from_checkpoint is None or request.from_checkpoint.with_optimizer,
        )
        self._set_run_optimizer(info.run_id, info.optimizer, owner)
        now = time.time()
        self._add_run_record(
            RunRecord(
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
        )
        return self.get_run(info.run_id, owner)

    def _add_run_record(self, record: RunRecord) -> None:
        self.store.add_run(record)
        self._active[record.run_id] = record

    def get_run(self, run_id: str, owner: str | None) -> api.Run:
        return self._run_view(self._run_record(run_id, owner))

    def list_runs(self, owner: str | None) -> list[api.Run]:
        records = self.store.list_runs(owner) if self.auth_enabled else self.store.list_runs(include_all=True)
        return [self._run_view(r) for r in records]

    def _run_view(self, record: RunRecord) -> api.Run:
        return _run_model(record).model_copy(update={"optimizer": self.run_optimizer(record.run_id)})

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
        self._run_record(run_id, owner)
        with contextlib.suppress(NotFoundError):  # a lost run has nothing in memory
            self.engine.delete_run(run_id)
        self.store.delete_run(run_id)
        self._durable.delete(RUN_OPTIMIZERS, run_id)
        self._optimizers.pop(run_id, None)
        self._active.pop(run_id, None)
        self._pending_losses.pop(run_id, None)

    # --- ops as jobs ---------------------------------------------------------------------------------

    def submit(
        self,
        op: str,
        run_id: str | None,
        fn: Callable[[], dict[str, Any] | Deferred],
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
        if self.auth_enabled:
            with self._lock:
                in_flight = self._jobs_per_owner.get(owner, 0)
                if in_flight >= self.settings.max_jobs_per_key:
                    raise QueueFullError(
                        f"this API key has {in_flight} jobs queued or running (the limit is "
                        f"{self.settings.max_jobs_per_key}); wait for some to finish",
                        retry_after=1.0,
                    )
                self._jobs_per_owner[owner] = in_flight + 1
            job.future.add_done_callback(lambda _: self._job_left(owner))
        self.store.add_job(
            JobRecord(job_id=job.job_id, run_id=run_id, op=op, owner=owner, created_at=job.created_at)
        )
        try:
            self.scheduler.submit(job)
        except QueueFullError as exc:
            self.store.finish_job(job.job_id, status="failed", error=str(exc), error_category="server")
            raise
        self._submitted += 1
        if self._submitted % 1000 == 0:  # finished jobs live on in the store; keep memory bounded
            self.scheduler.forget(older_than=time.time() - FINISHED_JOBS_KEPT_SECONDS)
        return job

    def _job_left(self, owner: str | None) -> None:
        with self._lock:
            left = self._jobs_per_owner.get(owner, 1) - 1
            if left > 0:
                self._jobs_per_owner[owner] = left
            else:
                self._jobs_per_owner.pop(owner, None)

    def _job_finished(self, job: Job) -> None:
        self.telemetry.job_finished(job)
        self.store.finish_job(
            job.job_id,
            status=job.status,
            result=job.result,
            error=job.error,
            error_category=job.error_category,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )

    def _engine_job(
        self, run_id: str, method: str, *args: Any, then: Callable[[Any], dict[str, Any]], **kwargs: Any
    ) -> dict[str, Any] | Deferred:
        """A job's engine call, `then(engine.<method>(*args, **kwargs))`: at once on the local engine, or
        (with a worker pool) on the run's worker, completing the job when its answer comes back."""
        if self.pool is None:
            return then(getattr(self.engine, method)(*args, **kwargs))
        pool = self.pool

        def start(complete: Completion) -> None:
            def done(future: Any) -> None:
                try:
                    complete(then(future.result()))
                except Exception as exc:
                    complete(exc)

            pool.call_async(run_id, method, *args, **kwargs).add_done_callback(done)

        return Deferred(start)

    def _local(self, batch: Batchable) -> Batchable | None:
        """Co-batching happens where the model is: here, or (with a worker pool) on the run's worker."""
        return batch if self.pool is None else None

    def check_sampling_limits(
        self, requests: list[SampleRequest], *, n_field: str = "n", prompt_field: str = "prompt"
    ) -> None:
        """Refuse (422 naming the field) a sampling request over the server's `max_samples` or
        `max_sequence_tokens` (prompt plus its max tokens) limits — before anything is queued."""
        for request in requests:
            if request.num_samples > self.settings.max_samples:
                raise InvalidInputError(
                    n_field,
                    f"asks for {request.num_samples} samples; one request may ask for at most "
                    f"{self.settings.max_samples} on this server",
                )
            length = len(request.prompt) + (request.params.max_tokens or 0)
            if length > self.settings.max_sequence_tokens:
                raise InvalidInputError(
                    prompt_field,
                    f"the prompt ({len(request.prompt)} tokens) plus max tokens ({request.params.max_tokens}) "
                    f"make {length}; a sequence may have at most {self.settings.max_sequence_tokens} on "
                    "this server",
                )

    def _worker_lost(self, worker: str, run_ids: list[str]) -> None:
        """Worker `worker` died with runs `run_ids`: fail their queued ops, restore them elsewhere.

        Their running ops fail with the worker; queued ones were sent against state that is gone, so
        they fail too (with this reason), and ops sent from now on run on the restored run.
        """
        for run_id in run_ids:
            self.scheduler.cancel_queued(
                run_id,
                f"model worker {worker} died before this op ran; run {run_id!r} is being restored from its "
                "last checkpoint on another worker (see its step), resubmit from there",
            )
            with self._lock:
                self._pending_losses.pop(run_id, None)
            self._active.pop(run_id, None)
        threading.Thread(
            target=self._restore_runs, args=(run_ids,), name="eztinker-restore", daemon=True
        ).start()

    def _restore_runs(self, run_ids: list[str]) -> None:
        assert self.pool is not None
        for run_id in run_ids:
            try:
                self._restore_run(run_id)
            except Exception:
                log.exception("could not restore run %s; it is lost until a checkpoint is loaded", run_id)
                self.store.update_run(run_id, status="lost")
            finally:
                self._active.pop(run_id, None)
                self.pool.restored(run_id)

    def _restore_run(self, run_id: str) -> None:
        """Re-create the run from its latest checkpoint (adapter, optimizer state and step if saved)."""
        record = self.store.get_run(run_id)
        if record is None:  # deleted meanwhile
            return
        checkpoints = self.store.list_checkpoints(run_id=run_id, include_all=True)
        if not checkpoints:
            log.error("run %s had no checkpoint when its worker died; it is lost", run_id)
            self.store.update_run(run_id, status="lost")
            return
        latest = max(checkpoints, key=lambda c: (c.created_at, c.step))
        info = self.engine.create_run(
            record.base_model,
            record.lora_config,
            record.loss_config,
            run_id=run_id,
            adapter_path=latest.path,
            optimizer=self.run_optimizer(run_id),
        )
        self.store.update_run(run_id, step=info.step, status="active", num_parameters=info.num_parameters)
        log.warning("run %s restored from checkpoint %r at step %d", run_id, latest.name, info.step)

    def forward_backward(
        self, run_id: str, request: api.ForwardBackwardRequest, owner: str | None, *, backward: bool = True
    ) -> Job:
        data, loss = _to_engine_data(request)
        try:
            return self.forward_backward_data(run_id, data, loss, owner, backward=backward)
        except InvalidInputError as exc:
            if request.loss_fn is not None:
                raise
            raise InvalidInputError(_native_field(exc.field), exc.message) from None

    def forward_backward_data(
        self,
        run_id: str,
        data: list[Datum],
        loss: LossFunctionConfig | TokenLoss | None,
        owner: str | None,
        *,
        backward: bool = True,
    ) -> Job:
        """`forward_backward` (or `forward`) on engine data; the job's result is an `api.ForwardBackwardOutput`."""
        record = self._live_run(run_id, owner)
        for i, datum in enumerate(data):
            if len(datum.tokens) > self.settings.max_sequence_tokens:
                raise InvalidInputError(
                    f"data[{i}].tokens",
                    f"has {len(datum.tokens)} tokens; a sequence may have at most "
                    f"{self.settings.max_sequence_tokens} on this server",
                )
        tokens = sum(len(d.tokens) for d in data)
        if tokens > self.settings.max_tokens_per_op:
            raise InvalidInputError(
                "data",
                f"has {tokens} tokens; one op takes at most {self.settings.max_tokens_per_op} (split it)",
            )
        self.engine.check_data(run_id, data, loss)  # a bad request is refused now, not as a failed job later
        request = TrainOp(run_id, data, loss, backward)

        def work() -> dict[str, Any] | Deferred:
            return self._engine_job(
                run_id, "forward_backward_many", [request], then=lambda outs: finish(outs[0])
            )

        def finish(result: ForwardBackwardResult | Exception) -> dict[str, Any]:
            if isinstance(result, Exception):
                raise result
            tokens = int(result.metrics.get("num_tokens:sum", 0))
            self.telemetry.tokens_trained.inc(tokens)
            if backward:
                with self._lock:
                    self._pending_losses.setdefault(run_id, []).append((result.loss, tokens))
            return api.ForwardBackwardOutput(
                loss=result.loss, logprobs=[lp.tolist() for lp in result.logprobs], metrics=result.metrics
            ).model_dump()

        op = "forward_backward" if backward else "forward"
        batch = Batchable(kind="train", group=record.base_model, request=request, finish=finish)
        return self.submit(op, run_id, work, owner, tokens=tokens, batch=self._local(batch))

    def optim_step(self, run_id: str, request: api.OptimStepRequest, owner: str | None) -> Job:
        """A native optim_step: its body read as a step of the run's optimizer (see `api.OptimStepRequest`)."""
        self._live_run(run_id, owner)
        optimizer = self.run_optimizer(run_id)
        if request.optimizer is not None and request.optimizer != optimizer:
            raise InvalidInputError(
                "optimizer",
                f"is {request.optimizer!r}, but run {run_id!r} uses {optimizer} (fixed when it was created)",
            )
        return self.optim_step_params(run_id, _step_params(request, optimizer), owner)

    def optim_step_params(self, run_id: str, params: AdamParams | DimuonParams, owner: str | None) -> Job:
        """`optim_step` with engine params, which must be of the run's optimizer (refused now if not)."""
        record = self._live_run(run_id, owner)
        check_step_params(self.run_optimizer(run_id), params, run_id)

        def work() -> dict[str, Any] | Deferred:
            return self._engine_job(
                run_id, "optim_step_many", [(run_id, params)], then=lambda outs: finish(outs[0])
            )

        def finish(result: OptimStepResult | Exception) -> dict[str, Any]:
            if isinstance(result, Exception):
                raise result
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
            return api.OptimStepOutput(
                step=result.step, grad_norm=result.grad_norm, learning_rate=result.learning_rate
            ).model_dump()

        batch = Batchable(kind="optim", group=record.base_model, request=(run_id, params), finish=finish)
        return self.submit("optim_step", run_id, work, owner, batch=self._local(batch))

    def sample(self, run_id: str | None, request: api.SampleRequest, owner: str | None) -> Job:
        """Sample from a run's live adapter, a sampler snapshot, or a base model (run_id None)."""
        base_model: str | None = None
        if run_id is not None:
            self._live_run(run_id, owner)
        elif request.sampler_id is not None:
            self.require_sampler(request.sampler_id, owner)
        else:
            base_model = request.base_model or self.default_base_model()
        params = SamplingParams(
            max_tokens=request.max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            stop=request.stop,
            seed=request.seed,
        )
        adapter = run_id if run_id is not None else request.sampler_id
        prepared: dict[str, Any] = {}

        def engine_request(prompt: list[int]) -> SampleRequest:
            return SampleRequest(
                prompt=prompt,
                params=params,
                num_samples=request.n,
                adapter=adapter,
                prompt_logprobs=request.prompt_logprobs,
            )

        # Checked now; a text prompt's length only once it is tokenized, when the job starts.
        self.check_sampling_limits([engine_request(list(request.prompt_tokens or []))])

        def prepare() -> tuple[str, list[SampleRequest]]:
            name = base_model if base_model is not None else self._base_name(run_id, request.sampler_id)
            tokenizer = self.engine.tokenizer(name)
            prompt = request.prompt_tokens or tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
            prepared.update(tokenizer=tokenizer, prompt=list(prompt))
            one = engine_request(list(prompt))
            self.check_sampling_limits([one])
            return name, [one]

        def finish(results: list[SampleResult]) -> dict[str, Any]:
            (result,) = results
            tokenizer = prepared["tokenizer"]
            return api.SampleOutput(
                samples=[
                    api.Sample(
                        text=_decode(tokenizer, s.tokens),
                        tokens=s.tokens,
                        logprobs=s.logprobs,
                        stop_reason=s.stop_reason,
                    )
                    for s in result.sequences
                ],
                prompt_tokens=prepared["prompt"],
                prompt_logprobs=result.prompt_logprobs,
            ).model_dump()

        tokens = len(request.prompt_tokens or request.prompt or "") + request.n * (
            request.max_new_tokens or 0
        )
        return self._submit_sampling("sample", run_id, prepare, finish, owner, tokens)

    def save_sampler(self, run_id: str, sampler_id: str, owner: str | None) -> Job:
        """Snapshot the run's adapter (in order with its other ops) as sampler `sampler_id`."""
        self._live_run(run_id, owner)
        self._claim_sampler(sampler_id, owner)

        def work() -> dict[str, Any] | Deferred:
            return self._engine_job(run_id, "save_sampler", run_id, sampler_id, then=sampler_json)

        def sampler_json(info: SamplerInfo) -> dict[str, Any]:
            return {"sampler_id": info.sampler_id, "base_model": info.base_model, "step": info.step}

        return self.submit("save_sampler", run_id, work, owner)

    def sampler_from_checkpoint(self, run_id: str, name: str, sampler_id: str, owner: str | None) -> str:
        """Load a checkpoint's adapter as sampler snapshot `sampler_id`; returns its base model. Blocking."""
        record = self._run_record(run_id, owner)
        checkpoint = self._checkpoint(run_id, name, owner)
        self._claim_sampler(sampler_id, owner)
        scratch = f"{sampler_id}.loading"
        self.engine.create_run(record.base_model, adapter_path=checkpoint.path, run_id=scratch)
        try:
            return self.engine.save_sampler(scratch, sampler_id).base_model
        finally:
            self.engine.delete_run(scratch)

    def sampler_base_model(self, sampler_id: str, owner: str | None) -> str | None:
        """The base model of the caller's sampler snapshot `sampler_id`; None if it has no such snapshot."""
        for info in self.engine.list_samplers():
            if info.sampler_id == sampler_id and self.access.allows(self._sampler_owner(info), owner):
                return info.base_model
        return None

    def require_sampler(self, sampler_id: str, owner: str | None) -> None:
        """Raise `NotFoundError` unless `sampler_id` is a sampler snapshot of the caller's."""
        if self.sampler_base_model(sampler_id, owner) is None:
            raise NotFoundError(f"no sampler {sampler_id!r}")

    def _sampler_owner(self, info: SamplerInfo) -> str | None:
        """Who took a snapshot: recorded when it was taken; else (a worker adopted after a restart) the
        owner of the run it was taken from."""
        if info.sampler_id in self._sampler_owners:
            return self._sampler_owners[info.sampler_id]
        record = self.store.get_run(info.run_id) if info.run_id else None
        return record.owner if record is not None else None

    def _claim_sampler(self, sampler_id: str, owner: str | None) -> None:
        """Record `owner` as the owner of the snapshot about to be taken as `sampler_id`."""
        with self._lock:
            if self._sampler_owners.setdefault(sampler_id, owner) != owner:
                raise ConflictError(f"sampler id {sampler_id!r} is already in use")

    def default_lora_targets(self, base_model: str) -> list[str]:
        """The module paths a run on `base_model` adapts by default (loads the model). Blocking."""
        return self.engine.default_targets(base_model)

    def _base_name(self, run_id: str | None, sampler_id: str | None) -> str:
        if run_id is not None:
            return self.engine.run_info(run_id).base_model
        for info in self.engine.list_samplers():
            if info.sampler_id == sampler_id:
                return info.base_model
        raise NotFoundError(f"no sampler {sampler_id!r}")

    def default_base_model(self) -> str:
        if self.settings.models:
            return self.settings.models[0]
        if self.engine.loaded_models:
            return self.engine.loaded_models[0]
        raise InvalidInputError(
            "base_model", "no base model is loaded: pass base_model, or start the server with --model NAME"
        )

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
        does; `age_recipients` encrypts every file to them. Both: kind "weights" only."""
        self._live_run(run_id, owner)
        if self.store.get_checkpoint(run_id, request.name) is not None:
            raise ConflictError(
                f"run {run_id!r} already has a checkpoint named {request.name!r}; choose another name"
            )
        export: dict[str, Any] = {}
        if module_names != "peft":
            export["module_names"] = module_names
        if age_recipients is not None:
            parse_age_recipients(age_recipients)  # a bad recipient is refused now, not as a failed job
            export["age_recipients"] = list(age_recipients)
        if export and request.kind != "weights":
            raise InvalidInputError("kind", "an export (Tinker names, encryption) saves kind 'weights' only")
        path = self.checkpoint_path(run_id, request.name)

        def work() -> dict[str, Any] | Deferred:
            path.parent.mkdir(parents=True, exist_ok=True)
            method = "save_state" if request.kind == "state" else "save_weights"
            return self._engine_job(run_id, method, run_id, path, then=recorded, **export)

        def recorded(info: CheckpointInfo) -> dict[str, Any]:
            self.store.add_checkpoint(
                CheckpointRecord(
                    run_id=run_id,
                    name=request.name,
                    kind=request.kind,
                    step=info.step,
                    path=str(info.path),
                    optimizer_path=str(info.optimizer_path) if info.optimizer_path else None,
                    size_bytes=info.size_bytes,
                    owner=owner,
                    created_at=info.created_at,
                )
            )
            return api.SaveOutput(
                name=request.name,
                step=info.step,
                adapter_path=str(info.path),
                optimizer_path=str(info.optimizer_path) if info.optimizer_path else None,
            ).model_dump()

        return self.submit("save", run_id, work, owner)

    def _checkpoint(self, run_id: str, name: str, owner: str | None) -> CheckpointRecord:
        self._run_record(run_id, owner)
        record = self.store.get_checkpoint(run_id, name)
        if record is None:
            raise NotFoundError(f"run {run_id!r} has no checkpoint named {name!r}")
        return record

    def load(self, run_id: str, request: api.LoadRequest, owner: str | None) -> Job:
        """Load a checkpoint into a run — also the way a `lost` run resumes after a restart."""
        record = self._run_record(run_id, owner)
        checkpoint = self._checkpoint(request.source_run_id or run_id, request.name, owner)

        def work() -> dict[str, Any] | Deferred:
            if record.status == "lost":  # rebuild the adapter slot, then fill it from the checkpoint
                self.engine.create_run(
                    record.base_model,
                    record.lora_config,
                    record.loss_config,
                    run_id=run_id,
                    optimizer=self.run_optimizer(run_id),
                )
            return self._engine_job(
                run_id,
                "load_state",
                run_id,
                checkpoint.path,
                with_optimizer=request.with_optimizer,
                then=loaded,
            )

        def loaded(info: RunInfo) -> dict[str, Any]:
            self.store.update_run(run_id, step=info.step, status="active", num_parameters=info.num_parameters)
            self._active.pop(run_id, None)  # re-read as active on the next op
            with self._lock:
                self._pending_losses.pop(run_id, None)
            return self.get_run(run_id, owner).model_dump()

        return self.submit("load", run_id, work, owner)

    def list_checkpoints(self, run_id: str | None, owner: str | None) -> list[api.Checkpoint]:
        """The checkpoints of run `run_id`, or (None) all of the caller's, oldest first."""
        if run_id is not None:
            self._run_record(run_id, owner)
        records = self.store.list_checkpoints(run_id=run_id, owner=owner, include_all=not self.auth_enabled)
        return [_checkpoint_model(c) for c in records]

    def checkpoint_archive(self, run_id: str, name: str, owner: str | None) -> Path:
        """A .tar.gz of the checkpoint directory in a temporary file (the caller deletes it)."""
        import tarfile
        import tempfile

        record = self._checkpoint(run_id, name, owner)
        handle, archive = tempfile.mkstemp(prefix=f"{run_id}-{name}-", suffix=".tar.gz")
        with open(handle, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            tar.add(record.path, arcname=name)
        return Path(archive)

    def delete_checkpoint(self, run_id: str, name: str, owner: str | None) -> None:
        record = self._checkpoint(run_id, name, owner)
        if Path(record.path).exists():
            delete_checkpoint(record.path)
        self.store.delete_checkpoint(run_id, name)

    # --- reading -------------------------------------------------------------------------------------

    def get_job(self, job_id: str, owner: str | None) -> api.Job:
        job = self.scheduler.get(job_id)
        if job is not None:
            self.access.require(job.owner, owner, f"no job {job_id!r}")
            entry = (
                next((e for e in self.scheduler.snapshot() if e.job is job), None) if not job.done else None
            )
            return _job_model(
                job,
                queue_position=entry.position if entry else None,
                estimated_start=entry.estimated_start if entry else None,
                pass_size=job.pass_size,
            )
        record = self.store.get_job(job_id)
        if record is None:
            raise NotFoundError(f"no job {job_id!r}")
        self.access.require(record.owner, owner, f"no job {job_id!r}")
        return _job_model(record)

    def queue(self, owner: str | None) -> api.QueueView:
        """Running and queued jobs in start order with estimates (with auth on: only the caller's jobs)."""
        stats = self.scheduler.stats()
        jobs = [
            api.QueuedJob(
                job_id=e.job.job_id,
                op=e.job.op,
                run_id=e.job.run_id,
                status="running" if e.position is None else "queued",
                tokens=e.job.tokens,
                created_at=e.job.created_at,
                started_at=e.job.started_at,
                position=e.position,
                estimated_start=e.estimated_start,
            )
            for e in self.scheduler.snapshot()
            if self.access.allows(e.job.owner, owner)
        ]
        return api.QueueView(
            queue_depth=stats.queue_depth,
            running=stats.running,
            passes=stats.passes,
            jobs_per_pass=stats.jobs_per_pass,
            utilisation=stats.utilisation,
            tokens_per_second=stats.tokens_per_second,
            jobs=jobs,
        )

    def metrics(self, run_id: str, owner: str | None) -> api.RunMetrics:
        self._run_record(run_id, owner)
        history = [
            api.StepMetrics(
                step=m.step,
                loss=m.loss,
                learning_rate=m.learning_rate,
                grad_norm=m.grad_norm,
                num_tokens=m.num_tokens,
                time=m.time,
            )
            for m in self.store.get_step_metrics(run_id)
        ]
        return api.RunMetrics(run_id=run_id, history=history)

    def health(self) -> api.Health:
        device = self.engine.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return api.Health(
            version=__version__,
            device=device,
            loaded_models=self.engine.loaded_models,
            queue_depth=self.scheduler.queue_depth,
        )

    # --- Tinker facade: sampling with every extra the wire asks for -----------------------------------

    def sample_request(
        self,
        request: SampleRequest,
        owner: str | None,
        *,
        base_model: str | None = None,
        echo: dict[str, Any] | None = None,
    ) -> Job:
        """Sample one engine `SampleRequest` (its `adapter` a sampler snapshot, or None with `base_model`).

        The job's result is JSON: the sequences (with top-k where asked) and the prompt extras, plus `echo`
        — request details a facade needs to encode the result again later (kept with the job's result).
        """
        self.check_sampling_limits([request], n_field="num_samples")
        if request.adapter is not None:
            self.require_sampler(request.adapter, owner)

        def prepare() -> tuple[str, list[SampleRequest]]:
            name = base_model if request.adapter is None else self._base_name(None, request.adapter)
            return (name if name is not None else self.default_base_model()), [request]

        def finish(results: list[SampleResult]) -> dict[str, Any]:
            (result,) = results
            alt = result.prompt_alt_tokens
            return {
                "sequences": [_sequence_json(s) for s in result.sequences],
                "prompt_logprobs": result.prompt_logprobs,
                "topk_prompt_logprobs": result.topk_prompt_logprobs,
                "target_prompt_logprobs": result.target_prompt_logprobs,
                "prompt_alt_tokens": None
                if alt is None
                else {"tokens": alt.tokens, "logprobs": alt.logprobs},
                **(echo or {}),
            }

        tokens = len(request.prompt) + request.num_samples * (request.params.max_tokens or 0)
        return self._submit_sampling("sample", None, prepare, finish, owner, tokens)

    # --- OpenAI facade: models named by base model, run id or sampler snapshot -----------------------

    def resolve_model(self, name: str, owner: str | None) -> ModelTarget:
        """What an OpenAI `model` names: a loaded or configured base model, a live run, or a snapshot."""
        if name in self.engine.loaded_models or name in self.settings.models:
            return ModelTarget(base_model=name, adapter=None, run_id=None)
        record = self._active.get(name) or self.store.get_run(name)
        if record is not None and self.access.allows(record.owner, owner):
            self._live_run(name, owner)  # a lost run is refused with the way to resume it
            return ModelTarget(base_model=record.base_model, adapter=name, run_id=name)
        for info in self.visible_samplers(owner):
            if info["sampler_id"] == name:
                return ModelTarget(base_model=info["base_model"], adapter=name, run_id=None)
        raise NotFoundError(
            f"the model {name!r} does not exist: name a base model, a run id or a sampler id (GET /v1/models)"
        )

    def list_models(self, owner: str | None) -> list[dict[str, Any]]:
        """Base models, the caller's live runs and sampler snapshots, as OpenAI model entries."""
        models: list[dict[str, Any]] = []
        for name in dict.fromkeys([*self.settings.models, *self.engine.loaded_models]):
            models.append(
                {"id": name, "kind": "base_model", "base_model": name, "created": int(self.started_at)}
            )
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
                {
                    "id": info["sampler_id"],
                    "kind": "sampler",
                    "base_model": info["base_model"],
                    "created": int(self.started_at),
                }
            )
        return models

    def tokenizer(self, base_model: str) -> Any:
        """The tokenizer of `base_model` (loading the model on first use). Blocking."""
        return self.engine.tokenizer(base_model)

    def generate(
        self,
        target: ModelTarget,
        requests: list[SampleRequest],
        owner: str | None,
        *,
        prompt_field: str = "prompt",
    ) -> Job:
        """Sample engine requests on `target` (their `adapter` is set here); checked now, before queueing.

        The job's result is `{"results": [{"sequences": [...]}, ...]}`, one entry per request. A request
        on a live run is ordered with the run's other ops. `prompt_field` names the prompt in errors.
        """
        requests = [replace(r, adapter=target.adapter) for r in requests]
        self.check_sampling_limits(requests, prompt_field=prompt_field)
        self.engine.check_requests(target.base_model, requests)
        tokens = sum(len(r.prompt) + r.num_samples * (r.params.max_tokens or 0) for r in requests)

        def finish(results: list[SampleResult]) -> dict[str, Any]:
            return {"results": [{"sequences": [_sequence_json(s) for s in r.sequences]} for r in results]}

        return self._submit_sampling(
            "sample", target.run_id, lambda: (target.base_model, requests), finish, owner, tokens
        )

    def _submit_sampling(
        self,
        op: str,
        run_id: str | None,
        prepare: Callable[[], tuple[str, list[SampleRequest]]],
        finish: Callable[[list[SampleResult]], dict[str, Any]],
        owner: str | None,
        tokens: int,
    ) -> Job:
        """The one way every facade samples: a job whose requests join its base model's sampling engine.

        `prepare` runs on the worker when the job starts (a snapshot saved by an earlier job exists by
        then) and names the base model and the engine requests; the job completes when their generation
        does, with `finish(results)`. Jobs of many callers start in one pass, so they share one prefill.
        """

        def start(complete: Completion) -> None:
            base_model, requests = prepare()

            def done(outcome: list[SampleResult] | Exception) -> None:
                if isinstance(outcome, Exception):
                    complete(outcome)
                    return
                try:
                    result = finish(outcome)
                except Exception as exc:
                    complete(exc)
                else:
                    complete(result)

            if self.sampling is not None:
                self.sampling.batcher(base_model).add(requests, done)
            else:
                assert self.pool is not None
                future = self.pool.sample_async(base_model, requests)
                future.add_done_callback(lambda f: done(_exception(f) or f.result()))

        deferred = Deferred(start)
        batch = Batchable(kind="sample", group="sample", request=None, finish=lambda _: deferred)
        # Shared: a run's samples generate together; its training ops wait for them, and they for those.
        return self.submit(op, run_id, lambda: deferred, owner, tokens=tokens, batch=batch, shared=True)

    def output_head_name(self, base_model: str) -> str | None:
        """The module path of `base_model`'s output head (unembedding), None if it has none. Blocking."""
        return self.engine.output_head_name(base_model)

    # --- dashboard: the views and the export the web UI needs beyond the API -------------------------

    def runs_with_owners(self, owner: str | None) -> list[tuple[api.Run, str | None]]:
        """`list_runs`, each run with its owner id (its key's hash; None for a run made without auth)."""
        records = self.store.list_runs(owner) if self.auth_enabled else self.store.list_runs(include_all=True)
        return [(self._run_view(r), r.owner) for r in records]

    def visible_samplers(self, owner: str | None) -> list[dict[str, Any]]:
        """Sampler snapshots in memory: all of them without auth; with auth, those the caller took."""
        infos = self.engine.list_samplers()
        return [dataclasses.asdict(i) for i in infos if self.access.allows(self._sampler_owner(i), owner)]

    def token_texts(self, base_model: str, tokens: list[int]) -> list[str]:
        """The text of each token in the tokenizer of `base_model`, which must be loaded already."""
        if base_model not in self.engine.loaded_models:
            raise NotFoundError(f"base model {base_model!r} is not loaded")
        tokenizer = self.engine.tokenizer(base_model)
        return [str(tokenizer.decode([token])) for token in tokens]

    def server_stats(self) -> dict[str, Any]:
        """Device, memory, uptime and token totals, for the dashboard's server page."""
        registry = self.telemetry.registry
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
        return {
            "uptime_seconds": time.time() - self.started_at,
            "auth_enabled": self.auth_enabled,
            "memory": memory,
            "tokens_trained": registry.get_sample_value("eztinker_tokens_trained_total") or 0.0,
            "tokens_sampled": registry.get_sample_value("eztinker_tokens_sampled_total") or 0.0,
            "active_runs": len(self._active),
            "workers": [
                {**dataclasses.asdict(w), "models": list(w.models)}
                for w in (self.pool.workers() if self.pool is not None else [])
            ],
        }

    def merged_checkpoint_archive(self, run_id: str, name: str, owner: str | None) -> Path:
        """A .tar.gz of the checkpoint merged into its run's base model: a full Hugging Face model directory.

        Blocking, and as heavy as loading the base model once more in fp32; the caller deletes the file.
        """
        import tarfile
        import tempfile

        from eztinker.engine.checkpoint import merge_into_base

        run = self._run_record(run_id, owner)
        checkpoint = self._checkpoint(run_id, name, owner)
        with tempfile.TemporaryDirectory(prefix="eztinker-merge-") as scratch:
            merged = merge_into_base(checkpoint.path, run.base_model, Path(scratch) / f"{name}-merged")
            handle, archive = tempfile.mkstemp(prefix=f"{run_id}-{name}-merged-", suffix=".tar.gz")
            with open(handle, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
                tar.add(merged, arcname=merged.name)
        return Path(archive)


# --- conversions at the boundary ------------------------------------------------------------------------

_ADAM_ONLY = ("weight_decay", "beta2", "eps")
_DIMUON_ONLY = ("damping", "rank_lr_correction_exponent")


def _step_params(request: api.OptimStepRequest, optimizer: OptimizerName) -> AdamParams | DimuonParams:
    """A native optim_step body as a step of `optimizer`; a setting the optimizer lacks is refused."""
    if optimizer == "dimuon":
        defaults = api.OptimStepRequest()
        for name in _ADAM_ONLY:
            if getattr(request, name) != getattr(defaults, name):
                raise InvalidInputError(name, f"the run's optimizer, Dimuon, has no {name}: leave it out")
        extra = {name: getattr(request, name) for name in _DIMUON_ONLY if getattr(request, name) is not None}
        return DimuonParams(
            learning_rate=request.learning_rate,
            beta1=request.beta1,
            grad_clip_norm=request.grad_clip_norm,
            **extra,
        )
    for name in _DIMUON_ONLY:
        if getattr(request, name) is not None:
            raise InvalidInputError(name, "is a Dimuon setting; the run's optimizer is AdamW")
    return AdamParams(
        learning_rate=request.learning_rate,
        beta1=request.beta1,
        beta2=request.beta2,
        eps=request.eps,
        weight_decay=request.weight_decay,
        grad_clip_norm=request.grad_clip_norm,
    )


def _to_engine_data(request: api.ForwardBackwardRequest) -> tuple[list[Datum], Any]:
    """Wire data to engine `Datum`s and the loss to use (None: the run's own loss)."""
    if request.loss_fn is not None:
        data = [Datum(d.tokens, d.loss_inputs) for d in request.data if isinstance(d, api.TokenDatum)]
        return data, TokenLoss(request.loss_fn, request.loss_fn_config or {})
    data = [
        Datum.from_labels(d.input_ids, d.target_ids, d.weights)
        for d in request.data
        if isinstance(d, api.NativeDatum)
    ]
    return data, request.loss_config


def _exception(future: Any) -> Exception | None:
    exc = future.exception()
    return exc if isinstance(exc, Exception) else None


def _sequence_json(sequence: SampledSequence) -> dict[str, Any]:
    return {
        "tokens": sequence.tokens,
        "logprobs": sequence.logprobs,
        "stop_reason": sequence.stop_reason,
        "topk_logprobs": sequence.topk_logprobs,
    }


def _decode(tokenizer: Any, tokens: list[int]) -> str:
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return text if isinstance(text, str) else "".join(text)


def _native_field(field: str) -> str:
    """The engine's name for a native datum's field -> the name the caller sent (`target_ids`, ...)."""
    for engine_name, wire_name in (
        (".loss_inputs.labels", ".target_ids"),
        (".loss_inputs.weights", ".weights"),
        (".tokens", ".input_ids"),
    ):
        if field.endswith(engine_name):
            return field[: -len(engine_name)] + wire_name
    return field


_JOB_FIELDS = (
    "job_id",
    "status",
    "run_id",
    "op",
    "result",
    "error",
    "error_category",
    "created_at",
    "started_at",
    "finished_at",
)


def _job_model(source: Job | JobRecord, **extra: Any) -> api.Job:
    """A job as the API shows it, from the live job or its stored record (they share these fields)."""
    return api.Job(**{name: getattr(source, name) for name in _JOB_FIELDS}, **extra)


def _run_model(record: RunRecord) -> api.Run:
    return api.Run(
        run_id=record.run_id,
        base_model=record.base_model,
        lora_config=record.lora_config,
        loss_config=record.loss_config or {},
        step=record.step,
        status=record.status,
        num_parameters=record.num_parameters,
        created_at=record.created_at,
        updated_at=record.updated_at,
        last_loss=record.last_loss,
    )


def _checkpoint_model(record: CheckpointRecord) -> api.Checkpoint:
    return api.Checkpoint(
        run_id=record.run_id,
        name=record.name,
        kind=record.kind,
        step=record.step,
        adapter_path=record.path,
        optimizer_path=record.optimizer_path,
        size_bytes=record.size_bytes,
        created_at=record.created_at,
    )
