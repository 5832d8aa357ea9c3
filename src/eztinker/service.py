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
import hashlib
import importlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from eztinker import __version__
from eztinker.engine import AdamParams, Datum, Engine, EngineConfig, SamplingParams, TokenLoss
from eztinker.engine.checkpoint import delete_checkpoint, remove_stale_temp_dirs
from eztinker.engine.errors import ConflictError, InvalidInputError, NotFoundError
from eztinker.engine.lora import resolve_targets
from eztinker.models import LossFunctionConfig, api
from eztinker.scheduler import Job, QueueFullError, Scheduler
from eztinker.settings import Settings
from eztinker.store import CheckpointRecord, JobRecord, RunRecord, StepMetricsRecord, Store
from eztinker.telemetry import Telemetry

log = logging.getLogger(__name__)

FINISHED_JOBS_KEPT_SECONDS = 600.0  # in memory for fast polls; older results come from the store
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RunLostError(ConflictError):
    """The run's adapter is not in memory (the server restarted): load a checkpoint to resume it."""


def hash_key(key: str) -> str:
    """How an API key is stored and compared: its SHA-256, never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()


class Service:
    """Runs, jobs, checkpoints and metrics over one `Engine`."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine or Engine(
            EngineConfig(
                device=settings.device,
                dtype=_DTYPES[settings.dtype] if settings.dtype else None,
                token_budget=settings.token_budget,
            )
        )
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(settings.resolved_database_url)
        self.telemetry = Telemetry()
        self.scheduler = Scheduler(
            workers=settings.workers, max_queue=settings.max_queue, on_finish=self._job_finished
        )
        self.telemetry.watch_queue(lambda: self.scheduler.queue_depth)
        self.api_key_hashes = {hash_key(k) for k in settings.api_keys}
        self._pending_losses: dict[str, list[tuple[float, int]]] = {}  # run -> (loss, tokens) since last step
        self._lock = threading.Lock()
        self._active: dict[str, RunRecord] = {}  # runs whose adapter is in memory (ownership checks)
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
        lost = self.store.mark_active_runs_lost()
        failed = self.store.fail_inflight_jobs("the server stopped while this job was queued or running")
        if lost or failed:
            log.warning(
                "recovered after restart: %d runs need a checkpoint loaded, %d jobs failed", len(lost), failed
            )
        for name in self.settings.models:
            self.engine.base_model(name)
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()
        self.store.close()

    # --- auth and ownership --------------------------------------------------------------------------

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_key_hashes)

    def owner_for_key(self, key: str | None) -> str | None:
        """The owner id of a request: its key's hash (None when auth is off). Raises if the key is bad."""
        if not self.auth_enabled:
            return None
        if key is None or hash_key(key) not in self.api_key_hashes:
            raise PermissionError("a valid API key is required: send X-API-Key or Authorization: Bearer")
        return hash_key(key)

    def _run_record(self, run_id: str, owner: str | None) -> RunRecord:
        record = self.store.get_run(run_id)
        if record is None or (self.auth_enabled and record.owner != owner):
            raise NotFoundError(f"no run {run_id!r}")
        return record

    def _live_run(self, run_id: str, owner: str | None) -> RunRecord:
        """The run, if it is active in this process: checked from memory on the hot path of every op."""
        record = self._active.get(run_id)
        if record is not None and (not self.auth_enabled or record.owner == owner):
            return record
        record = self._run_record(run_id, owner)
        if record.status == "lost":
            raise RunLostError(
                f"run {run_id!r} lost its in-memory adapter when the server restarted; "
                f"resume it by loading a checkpoint (POST /v1/runs/{run_id}/load)"
            )
        self._active[run_id] = record
        return record

    # --- runs ----------------------------------------------------------------------------------------

    def create_run(self, request: api.CreateRunRequest, owner: str | None) -> api.Run:
        """Create a run (loading its base model on first use). Blocking: call it off the event loop."""
        if request.run_id is not None and self.store.get_run(request.run_id) is not None:
            raise ConflictError(f"run id {request.run_id!r} is already in use; choose another or omit run_id")
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
        )
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
        return _run_model(self._run_record(run_id, owner))

    def list_runs(self, owner: str | None) -> list[api.Run]:
        records = self.store.list_runs(owner) if self.auth_enabled else self.store.list_runs(include_all=True)
        return [_run_model(r) for r in records]

    def delete_run(self, run_id: str, owner: str | None) -> None:
        """Forget the run: its adapter is freed; its checkpoints' files stay on disk until deleted."""
        self._run_record(run_id, owner)
        with contextlib.suppress(NotFoundError):  # a lost run has nothing in memory
            self.engine.delete_run(run_id)
        self.store.delete_run(run_id)
        self._active.pop(run_id, None)
        self._pending_losses.pop(run_id, None)

    # --- ops as jobs ---------------------------------------------------------------------------------

    def submit(self, op: str, run_id: str | None, fn: Callable[[], dict[str, Any]], owner: str | None) -> Job:
        """Record the job, then queue it: it is durable before the caller hears its id."""
        job = Job(op=op, run_id=run_id, fn=fn, owner=owner)
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
        self._live_run(run_id, owner)
        self.engine.check_data(run_id, data, loss)  # a bad request is refused now, not as a failed job later

        def work() -> dict[str, Any]:
            op = self.engine.forward_backward if backward else self.engine.forward
            result = op(run_id, data, loss)
            tokens = int(result.metrics.get("num_tokens:sum", 0))
            self.telemetry.tokens_trained.inc(tokens)
            if backward:
                with self._lock:
                    self._pending_losses.setdefault(run_id, []).append((result.loss, tokens))
            return api.ForwardBackwardOutput(
                loss=result.loss, logprobs=[lp.tolist() for lp in result.logprobs], metrics=result.metrics
            ).model_dump()

        return self.submit("forward_backward" if backward else "forward", run_id, work, owner)

    def optim_step(self, run_id: str, request: api.OptimStepRequest, owner: str | None) -> Job:
        self._live_run(run_id, owner)
        params = AdamParams(**request.model_dump())

        def work() -> dict[str, Any]:
            result = self.engine.optim_step(run_id, params)
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

        return self.submit("optim_step", run_id, work, owner)

    def sample(self, run_id: str | None, request: api.SampleRequest, owner: str | None) -> Job:
        """Sample from a run's live adapter, a sampler snapshot, or a base model (run_id None)."""
        base_model: str | None = None
        if run_id is not None:
            self._live_run(run_id, owner)
        elif request.sampler_id is None:
            base_model = request.base_model or self.default_base_model()
        params = SamplingParams(
            max_tokens=request.max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            stop=request.stop,
            seed=request.seed,
        )

        def work() -> dict[str, Any]:
            name = base_model if base_model is not None else self._base_name(run_id, request.sampler_id)
            tokenizer = self.engine.base_model(name).tokenizer
            prompt = request.prompt_tokens or tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
            result = self.engine.sample(
                prompt,
                params,
                num_samples=request.n,
                run_id=run_id,
                sampler_id=request.sampler_id,
                base_model=base_model,
                prompt_logprobs=request.prompt_logprobs,
            )
            self.telemetry.tokens_sampled.inc(sum(len(s.tokens) for s in result.sequences))
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
                prompt_tokens=list(prompt),
                prompt_logprobs=result.prompt_logprobs,
            ).model_dump()

        return self.submit("sample", run_id, work, owner)

    def sample_tokens(
        self,
        prompt: list[int],
        params: SamplingParams,
        owner: str | None,
        *,
        num_samples: int = 1,
        sampler_id: str | None = None,
        base_model: str | None = None,
        prompt_logprobs: bool = False,
    ) -> Job:
        """Sample token ids from a sampler snapshot or a base model; the result is the engine's, as a dict."""

        def work() -> dict[str, Any]:
            result = self.engine.sample(
                prompt,
                params,
                num_samples=num_samples,
                sampler_id=sampler_id,
                base_model=base_model,
                prompt_logprobs=prompt_logprobs,
            )
            self.telemetry.tokens_sampled.inc(sum(len(s.tokens) for s in result.sequences))
            return {
                "sequences": [
                    {"tokens": s.tokens, "logprobs": s.logprobs, "stop_reason": s.stop_reason}
                    for s in result.sequences
                ],
                "prompt_logprobs": result.prompt_logprobs,
            }

        return self.submit("sample", None, work, owner)

    def save_sampler(self, run_id: str, sampler_id: str, owner: str | None) -> Job:
        """Snapshot the run's adapter (in order with its other ops) as sampler `sampler_id`."""
        self._live_run(run_id, owner)

        def work() -> dict[str, Any]:
            info = self.engine.save_sampler(run_id, sampler_id)
            return {"sampler_id": info.sampler_id, "base_model": info.base_model, "step": info.step}

        return self.submit("save_sampler", run_id, work, owner)

    def sampler_from_checkpoint(self, run_id: str, name: str, sampler_id: str, owner: str | None) -> str:
        """Load a checkpoint's adapter as sampler snapshot `sampler_id`; returns its base model. Blocking."""
        record = self._run_record(run_id, owner)
        checkpoint = self._checkpoint(run_id, name, owner)
        scratch = f"{sampler_id}.loading"
        self.engine.create_run(record.base_model, adapter_path=checkpoint.path, run_id=scratch)
        try:
            return self.engine.save_sampler(scratch, sampler_id).base_model
        finally:
            self.engine.delete_run(scratch)

    def sampler_base_model(self, sampler_id: str) -> str | None:
        """The base model of sampler snapshot `sampler_id`, or None if there is no such snapshot."""
        for info in self.engine.list_samplers():
            if info.sampler_id == sampler_id:
                return info.base_model
        return None

    def default_lora_targets(self, base_model: str) -> list[str]:
        """The module paths a run on `base_model` adapts by default (loads the model). Blocking."""
        base = self.engine.base_model(base_model)
        return resolve_targets(base.model, base.default_targets())

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

    def save(self, run_id: str, request: api.SaveRequest, owner: str | None) -> Job:
        self._live_run(run_id, owner)
        if self.store.get_checkpoint(run_id, request.name) is not None:
            raise ConflictError(
                f"run {run_id!r} already has a checkpoint named {request.name!r}; choose another name"
            )
        path = self.checkpoint_path(run_id, request.name)

        def work() -> dict[str, Any]:
            path.parent.mkdir(parents=True, exist_ok=True)
            save = self.engine.save_state if request.kind == "state" else self.engine.save_weights
            info = save(run_id, path)
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

        def work() -> dict[str, Any]:
            if record.status == "lost":  # rebuild the adapter slot, then fill it from the checkpoint
                self.engine.create_run(
                    record.base_model, record.lora_config, record.loss_config, run_id=run_id
                )
            info = self.engine.load_state(run_id, checkpoint.path, with_optimizer=request.with_optimizer)
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
            if self.auth_enabled and job.owner != owner:
                raise NotFoundError(f"no job {job_id!r}")
            return api.Job(
                job_id=job.job_id,
                status=job.status,
                run_id=job.run_id,
                op=job.op,
                result=job.result,
                error=job.error,
                error_category=job.error_category,
                created_at=job.created_at,
                started_at=job.started_at,
                finished_at=job.finished_at,
                queue_position=self.scheduler.queue_position(job),
            )
        record = self.store.get_job(job_id)
        if record is None or (self.auth_enabled and record.owner != owner):
            raise NotFoundError(f"no job {job_id!r}")
        return api.Job(
            job_id=record.job_id,
            status=record.status,
            run_id=record.run_id,
            op=record.op,
            result=record.result,
            error=record.error,
            error_category=record.error_category,
            created_at=record.created_at,
            started_at=record.started_at,
            finished_at=record.finished_at,
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


# --- conversions at the boundary ------------------------------------------------------------------------


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
