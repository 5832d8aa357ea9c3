"""The `Backend` protocol: the one way the service reaches compute, in this process or on Ray workers.

A backend owns the base models, the runs' adapters, the sampler snapshots, and the queue that feeds
them (`scheduler`: ordered per run, fair, bounded). Its methods take and return engine types, and the
ops that change a run (`forward_backward`, `optim_step`, `save`, `load`, `save_sampler`) and `sample`
return futures: settled at once when the op computed in the calling thread (in-process), later when a
remote worker answers (Ray). A failed op's future holds the engine's own exception (`EngineError` and
its subclasses), whichever side of the wire it was raised on.

The service never asks which backend it has: it calls these methods and reads these types.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from eztinker.engine import (
    AdamParams,
    DimuonParams,
    ForwardBackwardResult,
    OptimStepResult,
    RunInfo,
    SampleResult,
    SamplerInfo,
    TrainOp,
)
from eztinker.engine.checkpoint import CheckpointInfo, ModuleNames
from eztinker.engine.optimizers import OptimizerName
from eztinker.engine.paging import PagingStats
from eztinker.engine.sampler import SampleRequest
from eztinker.engine.types import ImageChunk

if TYPE_CHECKING:
    from eztinker.models import LoRAConfig, LossFunctionConfig
    from eztinker.scheduler import Background, Job, Scheduler
    from eztinker.scheduler.jobs import PassRunner

T = TypeVar("T")
StepOp = tuple[str, AdamParams | DimuonParams]  # (run id, its optimizer's params): one run's optim_step


@dataclass(frozen=True)
class RunSpec:
    """A run to create: a fresh adapter, or one restored from a checkpoint directory (`adapter_path`)."""

    base_model: str
    lora_config: LoRAConfig | dict[str, Any] | None = None
    loss_config: LossFunctionConfig | dict[str, Any] | None = None
    run_id: str | None = None
    adapter_path: str | None = None
    optimizer: OptimizerName | None = None
    with_optimizer: bool = True


@dataclass(frozen=True)
class SaveOptions:
    """What a checkpoint holds: `state` (adapter, optimizer, step) or `weights` (the adapter alone, which
    may be exported with Tinker's module names and encrypted to age recipients)."""

    kind: Literal["state", "weights"] = "state"
    module_names: ModuleNames = "peft"
    age_recipients: tuple[str, ...] | None = None


@dataclass(frozen=True)
class WorkerStatus:
    """A model worker of a Ray backend: its memory, models and load (placement and the dashboard)."""

    name: str
    host: str
    device: str
    free_bytes: int
    total_bytes: int
    models: dict[str, int]  # loaded base model -> bytes of its weights
    runs: int
    queue_depth: int
    waiting_rows: int
    running_rows: int
    paging: PagingStats | None = None  # its adapter pager (each worker pages within its own budget)


@dataclass(frozen=True)
class BackendStatus:
    device: str  # where an in-process backend computes; the API server's own for a Ray backend
    workers: list[WorkerStatus] = field(default_factory=list)  # Ray model workers (none in-process)


@dataclass(frozen=True)
class SchedulerOptions:
    """The queue's bounds and co-batching knobs (from `Settings`), and the service's hooks into it."""

    workers: int = 1
    max_queue: int = 10_000
    max_queue_per_run: int | None = None
    max_pass_jobs: int = 64
    pass_token_budget: int = 32_768
    pass_linger: float = 0.005
    on_finish: Callable[[Job], None] | None = None
    on_pass: Callable[[list[Job], float], None] | None = None

    def scheduler(
        self, runners: dict[str, PassRunner] | None = None, background: Background | None = None
    ) -> Scheduler:
        """A scheduler with these bounds and hooks; `runners`: the op kinds it co-batches."""
        from eztinker.scheduler import Scheduler

        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Scheduler(**fields, runners=runners, background=background)


@dataclass(frozen=True)
class BackendHooks:
    """What a backend tells the service: sampling telemetry, and (Ray) runs whose worker died."""

    on_first_token: Callable[[float], None] | None = None
    on_tokens: Callable[[int], None] | None = None
    # A worker died holding these runs: called first (fail their queued ops), then `restore_run` for each,
    # on a thread of the backend's, while new calls for them wait.
    on_runs_lost: Callable[[str, list[str]], None] | None = None
    restore_run: Callable[[str], None] | None = None


class Backend(Protocol):
    """Base models, runs and sampler snapshots, and the ops on them (see the module docstring)."""

    scheduler: Scheduler  # the queue the service submits jobs to

    def start(self) -> set[str]:
        """Start executing; return the run ids whose adapters outlived the previous server process."""
        ...

    def stop(self) -> None: ...

    # --- base models
    @property
    def loaded_models(self) -> list[str]: ...

    def load_model(self, name: str) -> None: ...

    def tokenizer(self, name: str) -> Any: ...

    def default_targets(self, name: str) -> list[str]: ...

    def output_head_name(self, name: str) -> str | None: ...

    def max_context_length(self, name: str) -> int:
        """The longest sequence (prompt + completion) base model `name`'s positions allow: its config's
        `max_position_embeddings` (or `n_positions` / `seq_length`), as the engine checks sequences."""
        ...

    def lora_target_modules(
        self, name: str, *, train_attn: bool = True, train_mlp: bool = True, train_unembed: bool = False
    ) -> list[str] | None:
        """`target_modules` for Tinker's LoRA flags on base model `name` (None: the family default);
        `InvalidInputError` (field "lora_config") if the flags select nothing the model has."""
        ...

    # --- runs
    def create_run(self, spec: RunSpec) -> RunInfo: ...

    def delete_run(self, run_id: str) -> None: ...

    def run_info(self, run_id: str) -> RunInfo: ...

    def tinker_lora_flags(self, run_id: str) -> dict[str, bool]:
        """Tinker's `train_attn` / `train_mlp` / `train_unembed` for what run `run_id` adapts."""
        ...

    def check_data(self, op: TrainOp) -> None:
        """Raise `InvalidInputError` now (no compute) if `forward_backward([op])` would refuse it."""
        ...

    def check_requests(self, base_model: str, requests: Sequence[SampleRequest]) -> None: ...

    def expand_chunks(
        self, name: str, chunks: Sequence[Sequence[int] | ImageChunk], where: str, *, frame: bool = False
    ) -> tuple[list[int], tuple[ImageChunk, ...]]:
        """Text and image chunks as `name`'s tokens and images (`eztinker.engine.vision.expand_chunks`)."""
        ...

    # --- ops: one future per op
    def forward_backward(
        self, ops: Sequence[TrainOp]
    ) -> list[concurrent.futures.Future[ForwardBackwardResult]]:
        """Several runs' ops together (co-batched where they share a base model)."""
        ...

    def optim_step(self, steps: Sequence[StepOp]) -> list[concurrent.futures.Future[OptimStepResult]]: ...

    def save(
        self, run_id: str, path: Path, options: SaveOptions
    ) -> concurrent.futures.Future[CheckpointInfo]: ...

    def load(
        self, run_id: str, path: Path, *, with_optimizer: bool
    ) -> concurrent.futures.Future[RunInfo]: ...

    def save_sampler(self, run_id: str, sampler_id: str) -> concurrent.futures.Future[SamplerInfo]: ...

    def delete_sampler(self, sampler_id: str) -> None:
        """Free snapshot `sampler_id` (its adapter copy; vLLM unloads it). `NotFoundError` if there is none.
        The caller makes sure no sampling request is still using it."""
        ...

    def sample(
        self, base_model: str, requests: list[SampleRequest]
    ) -> concurrent.futures.Future[list[SampleResult]]:
        """Generate `requests` (one adapter, or none) in the continuous batch of `base_model`."""
        ...

    # --- sampler snapshots and status
    def list_samplers(self) -> list[SamplerInfo]: ...

    def status(self) -> BackendStatus: ...

    def paging_stats(self) -> PagingStats | None:
        """Adapter paging's runs and bytes per tier and its page-ins; None: this backend does not page."""
        ...

    @property
    def waiting_rows(self) -> int: ...

    @property
    def running_rows(self) -> int: ...


def settled(value: T) -> concurrent.futures.Future[T]:
    """A future that already holds `value`."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    future.set_result(value)
    return future


def failed(exc: BaseException) -> concurrent.futures.Future[Any]:
    """A future that already holds the exception `exc`."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    future.set_exception(exc)
    return future


def as_future(value: T | BaseException) -> concurrent.futures.Future[T]:
    """An engine outcome (a value, or the op's error) as a settled future."""
    return failed(value) if isinstance(value, BaseException) else settled(value)


def outcome(call: Callable[[], T]) -> concurrent.futures.Future[T]:
    """`call()` now, as a settled future: its value, or the exception it raised."""
    try:
        return settled(call())
    except Exception as exc:
        return failed(exc)


def chain(source: concurrent.futures.Future[Any], target: concurrent.futures.Future[Any]) -> None:
    """Settle `target` like `source` once it is done (nothing if `target` is settled already)."""

    def copy(done: concurrent.futures.Future[Any]) -> None:
        if target.done():
            return
        exc = done.exception()
        if exc is not None:
            target.set_exception(exc)
        else:
            target.set_result(done.result())

    source.add_done_callback(copy)
