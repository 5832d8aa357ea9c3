"""`LocalBackend`: the in-process backend — an `Engine`, its continuous sampler, and the scheduler that
co-batches their ops, built once.

The embedded server uses one; so does each Ray model worker (`eztinker.backend.ray_worker`). Ops run in
the calling thread, which is a scheduler worker executing a pass: several runs' `forward_backward` (or
`optim_step`) jobs on one base model reach `forward_backward` together, as one co-batched pass, and the
sampling engines decode between passes on the same threads (the scheduler's background).
"""

from __future__ import annotations

import concurrent.futures
import errno
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from eztinker.backend import base
from eztinker.backend.base import as_future, failed, outcome
from eztinker.engine import ComputeError, Engine, EngineConfig, TrainOp, vision
from eztinker.engine.batcher import SamplingEngines
from eztinker.engine.checkpoint import CheckpointInfo
from eztinker.engine.engine import RunInfo, SamplerInfo
from eztinker.engine.paging import PagingStats
from eztinker.engine.sampler import SampleRequest
from eztinker.engine.types import ForwardBackwardResult, ImageChunk, OptimStepResult, SampleResult
from eztinker.scheduler.jobs import PassRunner

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}  # a save that failed for want of space: the caller can act on it


def engine_config(
    device: str | None,
    dtype: str | None,
    token_budget: int,
    *,
    adapter_memory: int | None = None,
    adapter_host_memory: int | None = None,
    page_dir: Path | None = None,
) -> EngineConfig:
    """The engine's config from the server's settings: `dtype` by name ("bfloat16" -> torch.bfloat16);
    adapter paging's budgets in bytes and its page directory (`eztinker.engine.paging`)."""
    return EngineConfig(
        device=device,
        dtype=getattr(torch, dtype) if dtype else None,
        token_budget=token_budget,
        adapter_memory=adapter_memory,
        adapter_host_memory=adapter_host_memory,
        page_dir=page_dir,
    )


def _each_alone(requests: list[Any]) -> list[None]:
    """The "sample" runner: sampling jobs start together in one pass (each job's `finish` hands its
    requests to the continuous batcher), so that they share one prefill."""
    return [None] * len(requests)


class LocalBackend:
    """The `Backend` of one process: see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        options: base.SchedulerOptions | None = None,
        hooks: base.BackendHooks | None = None,
    ) -> None:
        options = options or base.SchedulerOptions()
        hooks = hooks or base.BackendHooks()
        self.engine = engine
        self.sampling = SamplingEngines(
            engine.base_model, on_first_token=hooks.on_first_token, on_tokens=hooks.on_tokens
        )
        # Several runs' training ops execute as one pass: rows routed per run to its own adapter.
        runners: dict[str, PassRunner] = {
            "train": self.forward_backward,
            "optim": self.optim_step,
            "sample": _each_alone,
        }
        self.scheduler = options.scheduler(runners, background=self.sampling)
        # Adapter paging: a run with queued work stays resident, and pages in ahead of its op.
        self.scheduler.on_run_busy, self.scheduler.on_run_idle = engine.paging.expect, engine.paging.idle
        self.scheduler.runs_fit = engine.paging.fit_together if engine.paging.enabled else None

    def start(self) -> set[str]:
        self.scheduler.start()
        return set()  # nothing outlives this process

    def stop(self) -> None:
        self.scheduler.stop()
        self.sampling.abort(ComputeError("the server shut down before the sample finished"))
        self.engine.paging.close()

    # --- base models ---------------------------------------------------------------------------------

    @property
    def loaded_models(self) -> list[str]:
        return self.engine.loaded_models

    def load_model(self, name: str) -> None:
        self.engine.load_model(name)

    def tokenizer(self, name: str) -> Any:
        return self.engine.tokenizer(name)

    def default_targets(self, name: str) -> list[str]:
        return self.engine.default_targets(name)

    def output_head_name(self, name: str) -> str | None:
        return self.engine.output_head_name(name)

    def max_context_length(self, name: str) -> int:
        return self.engine.base_model(name).max_length

    def lora_target_modules(
        self, name: str, *, train_attn: bool = True, train_mlp: bool = True, train_unembed: bool = False
    ) -> list[str] | None:
        return self.engine.lora_target_modules(
            name, train_attn=train_attn, train_mlp=train_mlp, train_unembed=train_unembed
        )

    # --- runs ----------------------------------------------------------------------------------------

    def create_run(self, spec: base.RunSpec) -> RunInfo:
        return self.engine.create_run(
            spec.base_model,
            spec.lora_config,
            spec.loss_config,
            run_id=spec.run_id,
            adapter_path=spec.adapter_path,
            optimizer=spec.optimizer,
            with_optimizer=spec.with_optimizer,
        )

    def delete_run(self, run_id: str) -> None:
        self.engine.delete_run(run_id)

    def run_info(self, run_id: str) -> RunInfo:
        return self.engine.run_info(run_id)

    def tinker_lora_flags(self, run_id: str) -> dict[str, bool]:
        return self.engine.tinker_lora_flags(run_id)

    def list_runs(self) -> list[RunInfo]:
        return self.engine.list_runs()

    def check_data(self, op: TrainOp) -> None:
        self.engine.check_data(op.run_id, op.data, op.loss)

    def check_requests(self, base_model: str, requests: Sequence[SampleRequest]) -> None:
        self.engine.check_requests(base_model, requests)

    def expand_chunks(
        self, name: str, chunks: Sequence[Sequence[int] | ImageChunk], where: str, *, frame: bool = False
    ) -> tuple[list[int], tuple[ImageChunk, ...]]:
        return vision.expand_chunks(self.engine.base_model(name), chunks, where, frame=frame)

    # --- ops -----------------------------------------------------------------------------------------

    def forward_backward(
        self, ops: Sequence[TrainOp]
    ) -> list[concurrent.futures.Future[ForwardBackwardResult]]:
        return [as_future(o) for o in self.engine.forward_backward_many(ops)]

    def optim_step(self, steps: Sequence[base.StepOp]) -> list[concurrent.futures.Future[OptimStepResult]]:
        return [as_future(o) for o in self.engine.optim_step_many(steps)]

    def save(
        self, run_id: str, path: Path, options: base.SaveOptions
    ) -> concurrent.futures.Future[CheckpointInfo]:
        def save() -> CheckpointInfo:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                if options.kind == "state":
                    return self.engine.save_state(run_id, path)
                return self.engine.save_weights(
                    run_id, path, module_names=options.module_names, age_recipients=options.age_recipients
                )
            except OSError as exc:
                if exc.errno not in _DISK_FULL:
                    raise
                raise ComputeError(  # the write is atomic: its partial files are gone already
                    f"the server's disk is full ({exc.strerror}): nothing was saved and the run is unchanged; "
                    "delete checkpoints you no longer need (or ask the operator to free space), then save again"
                ) from exc

        return outcome(save)

    def load(self, run_id: str, path: Path, *, with_optimizer: bool) -> concurrent.futures.Future[RunInfo]:
        return outcome(lambda: self.engine.load_state(run_id, path, with_optimizer=with_optimizer))

    def save_sampler(self, run_id: str, sampler_id: str) -> concurrent.futures.Future[SamplerInfo]:
        return outcome(lambda: self.engine.save_sampler(run_id, sampler_id))

    def delete_sampler(self, sampler_id: str) -> None:
        self.engine.delete_sampler(sampler_id)

    def sample(
        self, base_model: str, requests: list[SampleRequest]
    ) -> concurrent.futures.Future[list[SampleResult]]:
        future: concurrent.futures.Future[list[SampleResult]] = concurrent.futures.Future()

        adapters = [r.adapter for r in requests]

        def done(result: list[SampleResult] | Exception) -> None:
            self.engine.paging.unpin(adapters)
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

        try:
            self.engine.paging.pin(adapters)  # a run's adapter stays resident while it decodes
        except Exception as exc:
            return failed(exc)
        try:
            self.sampling.batcher(base_model).add(requests, done)
        except Exception as exc:
            self.engine.paging.unpin(adapters)
            return failed(exc)
        self.scheduler.wake()  # an idle worker steps the batcher now
        return future

    # --- sampler snapshots and status ----------------------------------------------------------------

    def list_samplers(self) -> list[SamplerInfo]:
        return self.engine.list_samplers()

    def status(self) -> base.BackendStatus:
        return base.BackendStatus(
            device=self.engine.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        )

    def paging_stats(self) -> PagingStats:
        """Adapter paging: runs and bytes per tier, page-in counts and time (`/metrics`, the dashboard)."""
        return self.engine.paging.stats()

    waiting_rows = property(lambda self: self.sampling.waiting_rows, doc="Sample rows waiting for room.")
    running_rows = property(lambda self: self.sampling.running_rows, doc="Sample rows decoding now.")
