"""`ModelWorker`: one model worker of a Ray pool — an `Engine` with its own scheduler and sampling engines.

In the embedded default all of this lives inside the server's `Service`; with `--workers ray` each
worker is a Ray actor (one per GPU, or per model replica) and the API server sends it engine calls.
Ops of different runs that reach a worker together execute as one co-batched pass, exactly as they do
in-process, and its samples decode in one continuous batch between passes.

Every method takes and returns plain picklable values. Engine errors come back as a `Reply` carrying
the error's class name, message and field, because their constructors do not survive pickling, and
the API server raises them again (see `WorkerPool`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from eztinker.engine import Engine, EngineConfig, EngineError, InvalidInputError
from eztinker.engine.batcher import SamplingEngines
from eztinker.engine.sampler import SampleRequest
from eztinker.engine.types import SampleResult
from eztinker.scheduler import Batchable, Job, Scheduler

log = logging.getLogger(__name__)

# Engine methods the API server may call. Those that change a run execute as jobs on the worker's
# scheduler, in order with its passes (as in-process); the rest are reads, run on a thread at once.
JOB_METHODS = frozenset(
    {"forward_backward_many", "optim_step_many", "save_state", "save_weights", "load_state", "save_sampler"}
)
READ_METHODS = frozenset(
    {
        "load_model",
        "create_run",
        "delete_run",
        "run_info",
        "list_runs",
        "check_data",
        "check_requests",
        "default_targets",
        "output_head_name",
        "list_samplers",
        "delete_sampler",
    }
)
_BATCH_KINDS = {"forward_backward_many": "train", "optim_step_many": "optim"}


@dataclass(frozen=True)
class RemoteError:
    """An `EngineError` as it crosses the wire: `eztinker.distributed.pool.raise_remote` rebuilds it."""

    kind: str  # the class name: InvalidInputError, NotFoundError, ...
    message: str
    field: str | None = None


@dataclass(frozen=True)
class Reply:
    value: Any = None
    error: RemoteError | None = None


@dataclass(frozen=True)
class WorkerStatus:
    """What placement and `/metrics` need from a worker: its memory, models and load."""

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


def encode_error(exc: BaseException) -> RemoteError:
    if isinstance(exc, InvalidInputError):
        return RemoteError(type(exc).__name__, exc.message, exc.field)
    if isinstance(exc, EngineError):
        return RemoteError(type(exc).__name__, str(exc))
    return RemoteError("ComputeError", f"internal error on the worker: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class _Op:
    """One op of a co-batched pass: the engine's request, and how to hand its outcome to its caller."""

    request: Any
    settle: Callable[[Any], Any]


def _settling(runner: Callable[[list[Any]], Sequence[Any]]) -> Callable[[list[_Op]], Sequence[Any]]:
    """`runner` as the worker's scheduler runs it: on `_Op`s, each failed op's exception settled at once.

    The scheduler fails such a job itself, keeping only the error's text and category; its caller on the
    API server needs the exception (a NaN loss is a `NonFiniteError`, a user error), encoded like any other.
    """

    def run(ops: list[_Op]) -> Sequence[Any]:
        outcomes = runner([op.request for op in ops])
        if len(outcomes) == len(ops):  # (otherwise the scheduler runs each op alone)
            for op, outcome in zip(ops, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    op.settle([outcome])
        return outcomes

    return run


class ModelWorker:
    """An engine, a scheduler co-batching its ops, and its sampling engines, behind picklable calls."""

    def __init__(
        self,
        name: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        token_budget: int = 8192,
        threads: int | None = None,
        memory_bytes: int | None = None,
        plugins: Sequence[str] = (),
        scheduler_options: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        if threads:
            torch.set_num_threads(threads)
        for module in plugins:  # custom losses must be registered in this process too
            importlib.import_module(module)
        torch_dtype = getattr(torch, dtype) if dtype else None  # "bfloat16" -> torch.bfloat16
        self.engine = Engine(EngineConfig(device=device, dtype=torch_dtype, token_budget=token_budget))
        self.sampling = SamplingEngines(self.engine.base_model)
        self.scheduler = Scheduler(
            workers=1,
            runners={
                "train": _settling(self.engine.forward_backward_many),
                "optim": _settling(self.engine.optim_step_many),
            },
            background=self.sampling,
            **(scheduler_options or {}),
        )
        self.scheduler.start()
        self._memory_bytes = memory_bytes  # a CPU worker's share of host memory (a GPU reports its own)
        self._hung_up: dict[str, threading.Event] = {}  # streams whose caller has gone: their decoding stops

    # --- engine calls ----------------------------------------------------------------------------------

    async def call(
        self, method: str, run_id: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Reply:
        """`engine.<method>(*args, **kwargs)`: as a job in order with the passes, or (reads) at once."""
        try:
            if method in JOB_METHODS:
                value = await asyncio.wrap_future(self._submit(method, run_id, args, kwargs))
                if method in _BATCH_KINDS:  # one outcome per op: an error among them travels encoded
                    value = [encode_error(v) if isinstance(v, BaseException) else v for v in value]
            elif method in READ_METHODS:
                value = await asyncio.to_thread(getattr(self.engine, method), *args, **kwargs)
            else:
                raise InvalidInputError("method", f"the worker has no engine call {method!r}")
        except Exception as exc:
            return Reply(error=encode_error(exc))
        return Reply(value=value)

    def _submit(
        self, method: str, run_id: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> concurrent.futures.Future[Any]:
        """Queue the call on the scheduler; a future of its value (or of the exception that failed it)."""
        outcome: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def settle(value: Any) -> dict[str, Any]:
            if outcome.done():
                return {}
            if isinstance(value, BaseException):
                outcome.set_exception(value)
            else:
                outcome.set_result(value)
            return {}

        def work() -> dict[str, Any]:
            try:
                return settle(getattr(self.engine, method)(*args, **kwargs))
            except Exception as exc:
                return settle(exc)

        batch = None
        if method in _BATCH_KINDS:  # one op of one run: it may share a pass with other runs' ops
            (request,) = args[0]
            group = self.engine.run_info(run_id).base_model if run_id is not None else ""
            batch = Batchable(
                kind=_BATCH_KINDS[method],
                group=group,
                request=_Op(request, settle),
                finish=lambda r: settle([r]),
            )
        job = Job(op=method, run_id=run_id, fn=work, batch=batch)
        self.scheduler.submit(job)
        job.future.add_done_callback(
            lambda _: outcome.done() or outcome.set_exception(RuntimeError(job.error or "the job failed"))
        )
        return outcome

    async def sample(self, base_model: str, requests: list[SampleRequest]) -> Reply:
        """Generate `requests` in this worker's continuous batch for `base_model`."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[SampleResult] | Exception] = loop.create_future()
        try:
            batcher = await asyncio.to_thread(self.sampling.batcher, base_model)

            def finished(outcome: list[SampleResult] | Exception) -> None:
                loop.call_soon_threadsafe(done.set_result, outcome)

            batcher.add(requests, finished)
        except Exception as exc:
            return Reply(error=encode_error(exc))
        self.scheduler.wake()
        outcome = await done
        if isinstance(outcome, Exception):
            return Reply(error=encode_error(outcome))
        return Reply(value=outcome)

    async def sample_stream(
        self, base_model: str, requests: list[SampleRequest], streamed: list[bool], stream_id: str
    ) -> AsyncIterator[tuple[Any, ...] | Reply]:
        """Like `sample`, for a Ray streaming call: yields `(request index, sample, token, logprob,
        top-k, done)` as tokens are chosen, for each request whose `streamed` flag is set (its
        `on_token` callback stays with the caller), then the `Reply`. `hang_up(stream_id)` stops it."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[Any, ...] | Reply] = asyncio.Queue()

        def forward(index: int) -> Any:
            def on_token(*event: Any) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (index, *event))

            return on_token

        def finished(outcome: list[SampleResult] | Exception) -> None:
            reply = (
                Reply(error=encode_error(outcome)) if isinstance(outcome, Exception) else Reply(value=outcome)
            )
            loop.call_soon_threadsafe(events.put_nowait, reply)

        hung_up = self._hung_up[stream_id] = threading.Event()
        requests = [
            replace(r, on_token=forward(i) if streamed[i] else None, cancelled=hung_up.is_set)
            for i, r in enumerate(requests)
        ]
        try:
            batcher = await asyncio.to_thread(self.sampling.batcher, base_model)
            batcher.add(requests, finished)
        except Exception as exc:
            yield Reply(error=encode_error(exc))
            return
        self.scheduler.wake()
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, Reply):
                    return
        finally:
            self._hung_up.pop(stream_id, None)

    async def hang_up(self, stream_id: str) -> None:
        """The caller of stream `stream_id` has gone: its rows end after their next token."""
        event = self._hung_up.get(stream_id)
        if event is not None:
            event.set()

    # --- health and placement ----------------------------------------------------------------------------

    async def status(self) -> WorkerStatus:
        held = self.engine.memory_bytes()
        used = sum(held.values())
        if torch.cuda.is_available() and (self.engine.config.device or "cuda").startswith("cuda"):
            free, total = torch.cuda.mem_get_info()
            device = f"cuda:{torch.cuda.current_device()} {torch.cuda.get_device_name()}"
        else:
            total = self._memory_bytes or host_memory_bytes()
            free, device = total - used, "cpu"
        return WorkerStatus(
            name=self.name,
            host=socket.gethostname(),
            device=device,
            free_bytes=int(free),
            total_bytes=int(total),
            models={k: v for k, v in held.items() if k != "adapters"},
            runs=len(self.engine.list_runs()),
            queue_depth=self.scheduler.queue_depth,
            waiting_rows=self.sampling.waiting_rows,
            running_rows=self.sampling.running_rows,
        )

    async def pid(self) -> int:
        return os.getpid()

    async def stop(self) -> None:
        self.scheduler.stop()


def host_memory_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
