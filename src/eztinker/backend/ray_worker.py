"""`ModelWorker`: one model worker of the Ray backend — a thin shell over a `LocalBackend`.

With `--workers ray` each worker is a Ray actor (one per GPU, or per model replica) and the API server
calls its methods, one per backend method. Ops that change a run are queued on the worker's own
scheduler, so ops of different runs that reach it together execute as one co-batched pass, exactly as
in-process, and its samples decode in one continuous batch between passes; reads run at once.

Every method takes and returns picklable values: a `Reply` carrying the value, or the engine's own
exception (`EngineError` and its subclasses pickle with their fields), which the API server raises
again; any other exception travels as a `ComputeError` naming it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib
import os
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from eztinker.backend.base import SaveOptions, SchedulerOptions, StepOp, WorkerStatus, chain, failed
from eztinker.backend.local import LocalBackend, engine_config
from eztinker.engine import ComputeError, Engine, EngineError, SampleResult, TrainOp
from eztinker.engine.sampler import SampleRequest
from eztinker.scheduler import Batchable, Job

T = TypeVar("T")


@dataclass(frozen=True)
class Reply:
    value: Any = None
    error: EngineError | None = None


def wire_error(exc: BaseException) -> EngineError:
    """`exc` as it crosses to the API server: an engine error as itself, anything else as a `ComputeError`."""
    if isinstance(exc, EngineError):
        return exc
    return ComputeError(f"internal error on the worker: {type(exc).__name__}: {exc}")


def _at_once(method: Callable[..., Any]) -> Callable[..., Awaitable[Reply]]:
    """An actor method that runs `LocalBackend.<method>` at once, on a thread, and replies with its value."""

    async def call(self: ModelWorker, *args: Any, **kwargs: Any) -> Reply:
        return await self.now(functools.partial(method, **kwargs), self.backend, *args)

    return functools.wraps(method)(call)


class ModelWorker:
    """A `LocalBackend` behind picklable calls (see the module docstring)."""

    def __init__(
        self,
        name: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        token_budget: int = 8192,
        threads: int | None = None,
        memory_bytes: int | None = None,
        adapter_memory: int | None = None,
        adapter_host_memory: int | None = None,
        page_dir: str | None = None,
        plugins: Sequence[str] = (),
        scheduler_options: SchedulerOptions | None = None,
    ) -> None:
        self.name = name
        if threads:
            torch.set_num_threads(threads)
        for module in plugins:  # custom losses must be registered in this process too
            importlib.import_module(module)
        engine = Engine(
            engine_config(
                device,
                dtype,
                token_budget,
                adapter_memory=adapter_memory,
                adapter_host_memory=adapter_host_memory,
                page_dir=None if page_dir is None else Path(page_dir),  # a directory per process under it
            )
        )
        self.backend = LocalBackend(engine, replace(scheduler_options or SchedulerOptions(), workers=1))
        self.backend.start()
        self._memory_bytes = memory_bytes  # a CPU worker's share of host memory (a GPU reports its own)
        self._hung_up: dict[str, threading.Event] = {}  # calls whose caller has gone: their decoding stops

    # --- reads and run bookkeeping: at once, on a thread --------------------------------------------

    async def now(self, call: Callable[..., Any], *args: Any) -> Reply:
        """`call(*args)` on a thread, now: its value, or its error, as a `Reply`."""
        try:
            return Reply(value=await asyncio.to_thread(call, *args))
        except Exception as exc:
            return Reply(error=wire_error(exc))

    load_model = _at_once(LocalBackend.load_model)
    default_targets = _at_once(LocalBackend.default_targets)
    output_head_name = _at_once(LocalBackend.output_head_name)
    max_context_length = _at_once(LocalBackend.max_context_length)
    lora_target_modules = _at_once(LocalBackend.lora_target_modules)
    create_run = _at_once(LocalBackend.create_run)
    delete_run = _at_once(LocalBackend.delete_run)
    run_info = _at_once(LocalBackend.run_info)
    tinker_lora_flags = _at_once(LocalBackend.tinker_lora_flags)
    list_runs = _at_once(LocalBackend.list_runs)
    list_samplers = _at_once(LocalBackend.list_samplers)
    delete_sampler = _at_once(LocalBackend.delete_sampler)
    check_data = _at_once(LocalBackend.check_data)
    check_requests = _at_once(LocalBackend.check_requests)

    async def expand_chunks(self, name: str, chunks: list[Any], where: str, frame: bool) -> Reply:
        return await self.now(lambda: self.backend.expand_chunks(name, chunks, where, frame=frame))

    # --- ops: jobs on this worker's scheduler, in order with its passes ------------------------------

    async def forward_backward(self, ops: list[TrainOp]) -> list[Reply]:
        return await self._each(
            [
                self._queued("forward_backward", op.run_id, op, "train", self.backend.forward_backward)
                for op in ops
            ]
        )

    async def optim_step(self, steps: list[StepOp]) -> list[Reply]:
        return await self._each(
            [self._queued("optim_step", step[0], step, "optim", self.backend.optim_step) for step in steps]
        )

    async def save(self, run_id: str, path: Path, options: SaveOptions) -> Reply:
        return await self._one(
            self._queued("save", run_id, None, None, lambda _: [self.backend.save(run_id, path, options)])
        )

    async def load(self, run_id: str, path: Path, with_optimizer: bool) -> Reply:
        load = self.backend.load
        return await self._one(
            self._queued(
                "load", run_id, None, None, lambda _: [load(run_id, path, with_optimizer=with_optimizer)]
            )
        )

    async def save_sampler(self, run_id: str, sampler_id: str) -> Reply:
        save = self.backend.save_sampler
        return await self._one(
            self._queued("save_sampler", run_id, None, None, lambda _: [save(run_id, sampler_id)])
        )

    def _queued(
        self,
        op: str,
        run_id: str,
        request: Any,
        kind: str | None,
        run: Callable[[list[Any]], list[concurrent.futures.Future[Any]]],
    ) -> concurrent.futures.Future[Any]:
        """`run([request])[0]` as a job of run `run_id` on the scheduler; with `kind`, one that may share
        a pass with other runs' jobs of that kind (the scheduler then calls `run` with all their requests)."""
        out: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def finish(source: concurrent.futures.Future[Any]) -> dict[str, Any]:
            chain(source, out)  # settled: the op computed in this pass
            return {}

        batch = None
        if kind is not None:
            try:  # (a run this worker no longer holds is the caller's NotFoundError, not a failed call)
                group = self.backend.run_info(run_id).base_model
            except Exception as exc:
                return failed(exc)
            batch = Batchable(kind=kind, group=group, request=request, finish=finish)
        job = Job(op=op, run_id=run_id, fn=lambda: finish(run([request])[0]), batch=batch)
        self.backend.scheduler.submit(job)
        job.future.add_done_callback(
            lambda _: out.done() or out.set_exception(ComputeError(job.error or "the job failed"))
        )
        return out

    @staticmethod
    async def _one(future: concurrent.futures.Future[Any]) -> Reply:
        try:
            return Reply(value=await asyncio.wrap_future(future))
        except Exception as exc:
            return Reply(error=wire_error(exc))

    async def _each(self, futures: list[concurrent.futures.Future[Any]]) -> list[Reply]:
        return [await self._one(f) for f in futures]

    # --- sampling ------------------------------------------------------------------------------------

    async def sample(
        self,
        base_model: str,
        requests: list[SampleRequest],
        call_id: str | None = None,
        *,
        cancelled: bool = False,
    ) -> Reply:
        """Generate `requests` in this worker's continuous batch for `base_model`. With a `call_id`, the
        caller may cancel it (`hang_up(call_id)`; `cancelled`: it already has): its rows end then."""
        if call_id is None:
            future = await asyncio.to_thread(
                self.backend.sample, base_model, requests
            )  # (may load the model)
            return await self._one(future)
        hung_up = self._hung_up[call_id] = threading.Event()
        if cancelled:
            hung_up.set()
        try:
            requests = [replace(r, cancelled=hung_up.is_set) for r in requests]
            future = await asyncio.to_thread(self.backend.sample, base_model, requests)
            return await self._one(future)
        finally:
            self._hung_up.pop(call_id, None)

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

        hung_up = self._hung_up[stream_id] = threading.Event()
        requests = [
            replace(r, on_token=forward(i) if streamed[i] else None, cancelled=hung_up.is_set)
            for i, r in enumerate(requests)
        ]
        try:
            future = await asyncio.to_thread(self.backend.sample, base_model, requests)

            def finished(done: concurrent.futures.Future[list[SampleResult]]) -> None:
                exc = done.exception()
                reply = Reply(error=wire_error(exc)) if exc is not None else Reply(value=done.result())
                loop.call_soon_threadsafe(events.put_nowait, reply)

            future.add_done_callback(finished)
            while True:
                event = await events.get()
                yield event
                if isinstance(event, Reply):
                    return
        finally:
            self._hung_up.pop(stream_id, None)

    async def hang_up(self, stream_id: str) -> None:
        """The caller of stream (or cancellable call) `stream_id` has gone: its rows end after their next
        token."""
        event = self._hung_up.get(stream_id)
        if event is not None:
            event.set()

    # --- health and placement ------------------------------------------------------------------------

    async def status(self) -> WorkerStatus:
        engine = self.backend.engine
        held = engine.memory_bytes()
        used = sum(held.values())
        if torch.cuda.is_available() and (engine.config.device or "cuda").startswith("cuda"):
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
            runs=len(engine.list_runs()),
            queue_depth=self.backend.scheduler.queue_depth,
            waiting_rows=self.backend.waiting_rows,
            running_rows=self.backend.running_rows,
            paging=self.backend.paging_stats(),
        )

    async def pid(self) -> int:
        return os.getpid()

    async def stop(self) -> None:
        self.backend.stop()


def host_memory_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
