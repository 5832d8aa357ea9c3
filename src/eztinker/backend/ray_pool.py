"""`RayBackend`: the model workers of a Ray cluster, behind the `Backend` protocol.

Each run lives on one worker (placed by free memory when it is created) and every call for it goes
there; a worker may hold several base models, and one base model may have replicas on several
workers. The API server's own scheduler orders the service's jobs (per run, fairly, bounded); each
worker's in-process backend co-batches the ops that reach it (`eztinker.backend.ray_worker`). The
actors themselves — started, adopted, watched, replaced — are `eztinker.backend.ray_cluster`.

Worker loss: a call that finds its worker dead (or the health check, every `HEALTH_INTERVAL` seconds)
marks the worker lost, fails that call with `WorkerLostError`, and hands its runs to the service
(`BackendHooks.on_runs_lost`, then `restore_run` for each, which re-places them from their last
checkpoint) while new calls for them wait. A replacement worker is started in the background.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from eztinker.backend import base
from eztinker.backend.base import chain, failed
from eztinker.backend.ray_cluster import CALL_TIMEOUT, RayWorkers
from eztinker.backend.ray_worker import Reply
from eztinker.engine.checkpoint import CheckpointInfo
from eztinker.engine.engine import RunInfo, SamplerInfo, TrainOp
from eztinker.engine.errors import ComputeError, ConflictError, EngineError, NotFoundError
from eztinker.engine.model import load_tokenizer
from eztinker.engine.paging import PagingStats
from eztinker.engine.sampler import SampleRequest
from eztinker.engine.types import ForwardBackwardResult, ImageChunk, OptimStepResult, SampleResult
from eztinker.settings import Settings

log = logging.getLogger(__name__)

RESTORE_TIMEOUT = 600.0  # seconds a call for a run being re-placed waits for it
CANCEL_POLL_SECONDS = 0.1  # how often cancellable samples running on workers are checked (`CancelWatch`)

Send = Callable[[Any], Any]  # an actor handle -> the Ray reference of one of its methods' `Reply`


class WorkerLostError(ComputeError):
    """The worker holding the run died while (or before) running this op."""


class RayBackend:
    """Model workers as Ray actors; runs placed by free memory; calls routed to the run's worker."""

    def __init__(
        self, settings: Settings, options: base.SchedulerOptions, hooks: base.BackendHooks | None = None
    ):
        self.settings = settings
        self.hooks = hooks or base.BackendHooks()
        # The API server's queue: ordered and fair, each job alone (the workers co-batch).
        self.scheduler = options.scheduler()
        self._lock = threading.RLock()
        self._runs: dict[str, str] = {}  # run id -> worker name
        self._samplers: dict[str, tuple[str, SamplerInfo]] = {}  # sampler id -> (worker name, info)
        self._restoring: dict[str, threading.Event] = {}  # runs being re-placed after a worker loss
        self._creating: set[str] = set()  # run ids being created now (each on one worker only)
        self._tokenizers: dict[str, Any] = {}
        self.cluster = RayWorkers(settings, options, on_lost=self._lost)
        self._cancel_watch = CancelWatch()

    def _adopt_runs(self) -> set[str]:
        """Learn which runs and sampler snapshots the workers already hold; returns the run ids."""
        for worker in self.cluster.alive():
            try:
                runs: list[RunInfo] = self._sync(worker.name, lambda a: a.list_runs.remote())
                samplers: list[SamplerInfo] = self._sync(worker.name, lambda a: a.list_samplers.remote())
            except EngineError:
                continue
            with self._lock:
                self._runs.update({info.run_id: worker.name for info in runs})
                self._samplers.update({info.sampler_id: (worker.name, info) for info in samplers})
        return set(self._runs)

    def start(self) -> set[str]:
        alive = self._adopt_runs()  # runs whose adapters outlived the old API server (on detached workers)
        self.scheduler.start()
        return alive

    def stop(self) -> None:
        self.scheduler.stop()
        self.cluster.stop()

    # --- workers -----------------------------------------------------------------------------------------

    def workers(self) -> list[base.WorkerStatus]:
        """The live workers' last reported status (refreshed every `HEALTH_INTERVAL` seconds)."""
        return self.cluster.last_statuses()

    def worker_of(self, run_id: str) -> str | None:
        return self._runs.get(run_id)

    def kill_worker(self, name: str) -> None:
        """Kill worker `name` at once (for failure drills and tests): its runs go through worker loss."""
        self.cluster.kill(name)

    def _lost(self, name: str, exc: BaseException) -> None:
        """Worker `name` is dead: forget it, hand its runs to the service (a replacement is starting)."""
        if not self.cluster.mark_dead(name):
            return
        with self._lock:
            runs = [run_id for run_id, w in self._runs.items() if w == name]
            for run_id in runs:
                del self._runs[run_id]
                self._restoring[run_id] = threading.Event()
            for sampler_id in [s for s, (w, _) in self._samplers.items() if w == name]:
                del self._samplers[sampler_id]
        log.error("model worker %s died (%s); re-placing its %d runs", name, exc, len(runs))
        try:
            if self.hooks.on_runs_lost is not None:
                self.hooks.on_runs_lost(name, runs)
        except Exception:
            log.exception("the runs of model worker %s could not be handed over for restoring", name)
        threading.Thread(target=self._restore, args=(runs,), name="eztinker-restore", daemon=True).start()

    def _restore(self, run_ids: list[str]) -> None:
        """Re-place each run (`restore_run`); calls waiting for it go ahead when it is done or given up."""
        for run_id in run_ids:
            try:
                if self.hooks.restore_run is not None:
                    self.hooks.restore_run(run_id)
            except Exception:
                log.exception("could not restore run %s", run_id)
            finally:
                event = self._restoring.pop(run_id, None)
                if event is not None:
                    event.set()

    # --- calls ---------------------------------------------------------------------------------------------

    def _replies(self, worker: str, ref: Any, count: int | None) -> list[concurrent.futures.Future[Any]]:
        """Futures of the values of a call's `Reply` (or, `count` set, of its list of `count` replies);
        the worker's death is handled."""
        from ray.exceptions import RayActorError

        outs: list[concurrent.futures.Future[Any]] = [concurrent.futures.Future() for _ in range(count or 1)]

        def fail(exc: BaseException) -> None:
            for out in outs:
                out.set_exception(exc)

        def done(raw: concurrent.futures.Future[Any]) -> None:
            try:
                replies = raw.result()
            except RayActorError as exc:
                self._lost(worker, exc)
                fail(
                    WorkerLostError(
                        f"model worker {worker} died while running this op; its runs are re-placed on "
                        "another worker from their last checkpoint (see the run's step and status)"
                    )
                )
                return
            except Exception as exc:
                fail(_unwrapped(worker, exc))
                return
            for out, reply in zip(outs, replies if count is not None else [replies], strict=True):
                if reply.error is not None:
                    out.set_exception(reply.error)
                else:
                    out.set_result(reply.value)

        ref.future().add_done_callback(done)
        return outs

    def _call(
        self, worker: str, send: Send, count: int | None = None
    ) -> list[concurrent.futures.Future[Any]]:
        handle = self.cluster.get(worker)
        if not handle.alive:
            return [failed(WorkerLostError(f"model worker {worker} is gone")) for _ in range(count or 1)]
        return self._replies(worker, send(handle.actor), count)

    def _sync(self, worker: str, send: Send) -> Any:
        return self._call(worker, send)[0].result(CALL_TIMEOUT)

    def _on_run(self, run_id: str, send: Send, *, batched: bool = False) -> concurrent.futures.Future[Any]:
        """A call on run `run_id`'s worker; waits first if the run is being re-placed."""
        count = 1 if batched else None
        event = self._restoring.get(run_id)
        if event is None:
            return self._call(self._worker(run_id), send, count)[0]
        out: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def when_restored() -> None:
            event.wait(RESTORE_TIMEOUT)
            try:
                chain(self._call(self._worker(run_id), send, count)[0], out)
            except EngineError as exc:
                out.set_exception(exc)

        threading.Thread(target=when_restored, daemon=True).start()
        return out

    def _worker(self, run_id: str) -> str:
        worker = self._runs.get(run_id)
        if worker is None:  # perhaps created, or restored, through another API server of the cluster
            worker = self._locate(run_id)
        if worker is None:
            raise NotFoundError(f"no run {run_id!r}")
        return worker

    def _locate(self, run_id: str) -> str | None:
        """The live worker holding run `run_id`, asking the workers when this server does not know it."""
        if run_id in self._runs:
            return self._runs[run_id]
        if self.cluster.detached:
            self._adopt_runs()
        return self._runs.get(run_id)

    def _read_run(self, run_id: str, send: Send) -> Any:
        """A read of run `run_id`: if its worker turns out dead, asked again of the worker it is restored on."""
        try:
            return self._on_run(run_id, send).result(CALL_TIMEOUT)
        except WorkerLostError:
            return self._on_run(run_id, send).result(CALL_TIMEOUT)

    def _read_model(self, base_model: str, send: Send, adapter: str | None = None) -> Any:
        """A read on a worker holding `base_model` (and `adapter`, if any): if that worker turns out dead
        (the health check had not noticed yet), asked again of a live one, as a run's reads are."""
        try:
            return self._sync(self._sampling_worker(base_model, adapter), send)
        except WorkerLostError:
            return self._sync(self._sampling_worker(base_model, adapter), send)

    def _with_model(self, base_model: str) -> str:
        """A live worker that has `base_model` loaded (the least loaded), or the one it is placed on."""
        holders = [s for s in self.workers() if base_model in s.models]
        if holders:
            return min(holders, key=lambda s: (s.running_rows + s.waiting_rows, s.runs)).name
        worker = self.cluster.place(base_model)
        self._sync(worker, lambda a: a.load_model.remote(base_model))
        self.cluster.statuses()
        return worker

    # --- base models -------------------------------------------------------------------------------------

    @property
    def loaded_models(self) -> list[str]:
        return list(dict.fromkeys(m for s in self.workers() for m in s.models))

    def load_model(self, name: str) -> None:
        self._with_model(name)

    def tokenizer(self, name: str) -> Any:
        """The tokenizer of `name`, loaded here: the API server needs no model weights."""
        with self._lock:
            if name not in self._tokenizers:
                self._tokenizers[name] = load_tokenizer(name)
            return self._tokenizers[name]

    def default_targets(self, name: str) -> list[str]:
        return self._read_model(name, lambda a: a.default_targets.remote(name))

    def output_head_name(self, name: str) -> str | None:
        return self._read_model(name, lambda a: a.output_head_name.remote(name))

    def max_context_length(self, name: str) -> int:
        return self._read_model(name, lambda a: a.max_context_length.remote(name))

    def lora_target_modules(
        self, name: str, *, train_attn: bool = True, train_mlp: bool = True, train_unembed: bool = False
    ) -> list[str] | None:
        flags = {"train_attn": train_attn, "train_mlp": train_mlp, "train_unembed": train_unembed}
        return self._read_model(name, lambda a: a.lora_target_modules.remote(name, **flags))

    # --- runs --------------------------------------------------------------------------------------------

    def create_run(self, spec: base.RunSpec) -> RunInfo:
        """On the worker placement picks. A run id in use on any worker is a `ConflictError`, as it is
        in-process: placement may pick another worker than the one holding it, which would not know."""
        run_id = spec.run_id
        if run_id is not None:
            self._claim(run_id)
        try:
            worker, info = self._create_on_a_live_worker(spec)
            with self._lock:
                self._runs[info.run_id] = worker
        finally:
            if run_id is not None:
                with self._lock:
                    self._creating.discard(run_id)
        self.cluster.statuses()  # the next placement sees this run's memory
        return info

    def _create_on_a_live_worker(self, spec: base.RunSpec) -> tuple[str, RunInfo]:
        """`create_run` on the worker placement picks; placed again if that one turns out dead (nothing
        was created there). A run re-placed after a worker loss would otherwise be lost when the worker it
        was restored to died too."""
        worker = self.cluster.place(spec.base_model)
        try:
            return worker, self._sync(worker, lambda a: a.create_run.remote(spec))
        except WorkerLostError:
            worker = self.cluster.place(spec.base_model)
            return worker, self._sync(worker, lambda a: a.create_run.remote(spec))

    def _claim(self, run_id: str) -> None:
        """Reserve run id `run_id` for a run being created; `ConflictError` if a worker holds it (or it is
        being created meanwhile)."""
        held = self._locate(run_id) is not None
        with self._lock:
            if held or run_id in self._runs or run_id in self._creating:
                raise ConflictError(f"run id {run_id!r} is already in use")
            self._creating.add(run_id)

    def delete_run(self, run_id: str) -> None:
        try:
            self._on_run(run_id, lambda a: a.delete_run.remote(run_id)).result(CALL_TIMEOUT)
        except NotFoundError:  # its worker holds it no more (deleted through another API server)
            self._forget_run(run_id)
            raise
        self._forget_run(run_id)

    def _forget_run(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def run_info(self, run_id: str) -> RunInfo:
        return self._read_run(run_id, lambda a: a.run_info.remote(run_id))

    def tinker_lora_flags(self, run_id: str) -> dict[str, bool]:
        return self._read_run(run_id, lambda a: a.tinker_lora_flags.remote(run_id))

    def check_data(self, op: TrainOp) -> None:
        bare = replace(op, data=list(op.data))
        self._read_run(op.run_id, lambda a: a.check_data.remote(bare))

    def expand_chunks(
        self, name: str, chunks: Sequence[Sequence[int] | ImageChunk], where: str, *, frame: bool = False
    ) -> tuple[list[int], tuple[ImageChunk, ...]]:
        """On a worker holding `name` (its image processor reads the model's config)."""
        return self._read_model(name, lambda a: a.expand_chunks.remote(name, list(chunks), where, frame))

    def check_requests(self, base_model: str, requests: Sequence[SampleRequest]) -> None:
        adapter = next(iter({r.adapter for r in requests} - {None}), None)
        bare = [replace(r, on_token=None, cancelled=None) for r in requests]
        self._read_model(base_model, lambda a: a.check_requests.remote(base_model, bare), adapter)

    # --- ops ---------------------------------------------------------------------------------------------

    def forward_backward(
        self, ops: Sequence[TrainOp]
    ) -> list[concurrent.futures.Future[ForwardBackwardResult]]:
        return [
            self._op(op.run_id, lambda a, op=op: a.forward_backward.remote([op]), batched=True) for op in ops
        ]

    def optim_step(self, steps: Sequence[base.StepOp]) -> list[concurrent.futures.Future[OptimStepResult]]:
        return [self._op(s[0], lambda a, s=s: a.optim_step.remote([s]), batched=True) for s in steps]

    def save(
        self, run_id: str, path: Path, options: base.SaveOptions
    ) -> concurrent.futures.Future[CheckpointInfo]:
        return self._op(run_id, lambda a: a.save.remote(run_id, path, options))

    def load(self, run_id: str, path: Path, *, with_optimizer: bool) -> concurrent.futures.Future[RunInfo]:
        return self._op(run_id, lambda a: a.load.remote(run_id, path, with_optimizer))

    def save_sampler(self, run_id: str, sampler_id: str) -> concurrent.futures.Future[SamplerInfo]:
        future = self._op(run_id, lambda a: a.save_sampler.remote(run_id, sampler_id))
        # (callbacks run in order: the pool knows the sampler before the caller hears of it)
        future.add_done_callback(lambda f: f.exception() or self._remember_sampler(run_id, f.result()))
        return future

    def _op(self, run_id: str, send: Send, *, batched: bool = False) -> concurrent.futures.Future[Any]:
        """An op on run `run_id`'s worker (`batched`: a method taking a list of ops, sent a list of one)."""
        try:
            return self._on_run(run_id, send, batched=batched)
        except EngineError as exc:
            return failed(exc)

    def _remember_sampler(self, run_id: str, info: SamplerInfo) -> None:
        """Sampler `info`, just saved from run `run_id`, lives on that run's worker."""
        with self._lock:
            self._samplers[info.sampler_id] = (self._runs[run_id], info)

    def list_samplers(self) -> list[SamplerInfo]:
        return [info for _, info in list(self._samplers.values())]

    def delete_sampler(self, sampler_id: str) -> None:
        """On the worker holding the snapshot; one on a worker that died is gone already (`NotFoundError`)."""
        held = self._samplers.get(sampler_id)
        if held is None:
            raise NotFoundError(f"no sampler {sampler_id!r}")
        try:
            self._sync(held[0], lambda a: a.delete_sampler.remote(sampler_id))
        finally:
            with self._lock:
                self._samplers.pop(sampler_id, None)

    # --- sampling ------------------------------------------------------------------------------------

    def _sampling_worker(self, base_model: str, adapter: str | None) -> str:
        if adapter is None:
            return self._with_model(base_model)
        if adapter in self._runs:
            return self._runs[adapter]
        if adapter in self._samplers:
            return self._samplers[adapter][0]
        if adapter in self._restoring:
            raise WorkerLostError(f"run {adapter!r} is being re-placed after its worker died; retry shortly")
        raise NotFoundError(f"no run or sampler {adapter!r}")

    def sample(
        self, base_model: str, requests: list[SampleRequest]
    ) -> concurrent.futures.Future[list[SampleResult]]:
        """Generate `requests` (one adapter, or none) in the continuous batch of the worker that has it.

        Samples of a bare base model change nothing, so if their worker dies they are retried once on
        another worker.
        """
        adapter = next((r.adapter for r in requests if r.adapter is not None), None)
        if any(r.on_token is not None for r in requests):
            return self._sample_streaming(base_model, adapter, requests)
        cancels = [r.cancelled for r in requests if r.cancelled is not None]
        requests = [replace(r, cancelled=None) for r in requests]  # (callables stay on this side)
        out: concurrent.futures.Future[list[SampleResult]] = concurrent.futures.Future()

        def attempt(retries: int) -> None:
            try:
                worker = self._sampling_worker(base_model, adapter)
            except EngineError as exc:
                out.set_exception(exc)
                return
            call_id = uuid.uuid4().hex if cancels else None
            cancelled = any(c() for c in cancels)
            (inner,) = self._call(
                worker, lambda a: a.sample.remote(base_model, requests, call_id, cancelled=cancelled)
            )
            if call_id is not None:  # its worker is told to stop it once a caller cancels
                actor = self.cluster.get(worker).actor
                self._cancel_watch.watch(call_id, cancels, lambda: actor.hang_up.remote(call_id), inner)

            def done(f: concurrent.futures.Future[Any]) -> None:
                if isinstance(f.exception(), WorkerLostError) and adapter is None and retries > 0:
                    threading.Thread(target=attempt, args=(retries - 1,), daemon=True).start()
                else:
                    chain(f, out)

            inner.add_done_callback(done)

        attempt(1)
        return out

    def _sample_streaming(
        self, base_model: str, adapter: str | None, requests: list[SampleRequest]
    ) -> concurrent.futures.Future[Any]:
        """`sample` for requests with `on_token` callbacks: the worker streams each token back (a Ray
        streaming call) and the callbacks run here, on a thread of their own."""
        try:
            worker = self._sampling_worker(base_model, adapter)
        except EngineError as exc:
            return failed(exc)
        out: concurrent.futures.Future[Any] = concurrent.futures.Future()
        callbacks = [r.on_token for r in requests]
        cancels = [r.cancelled for r in requests if r.cancelled is not None]
        stripped = [replace(r, on_token=None, cancelled=None) for r in requests]
        actor = self.cluster.get(worker).actor
        stream_id = uuid.uuid4().hex
        stream = actor.sample_stream.options(num_returns="streaming").remote(
            base_model, stripped, [c is not None for c in callbacks], stream_id
        )
        hang_up = lambda: actor.hang_up.remote(stream_id)  # noqa: E731
        lost = functools.partial(self._lost, worker)
        relay = functools.partial(_relay, worker, stream, out, callbacks, cancels, hang_up, lost)
        threading.Thread(target=relay, name="eztinker-ray-stream", daemon=True).start()
        return out

    # --- status ------------------------------------------------------------------------------------------

    def paging_stats(self) -> PagingStats | None:
        """The model workers' adapter pagers, summed (each pages within its own `--adapter-memory`), as of
        their last reported status."""
        return PagingStats.total([s.paging for s in self.workers() if s.paging is not None])

    def status(self) -> base.BackendStatus:
        import torch

        device = self.settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return base.BackendStatus(device=device, workers=self.workers())

    @property
    def waiting_rows(self) -> int:
        return sum(s.waiting_rows for s in self.workers())

    @property
    def running_rows(self) -> int:
        return sum(s.running_rows for s in self.workers())


class CancelWatch:
    """One thread for every cancellable sample running on a worker without a token stream: it polls
    their callers' `cancelled` every `CANCEL_POLL_SECONDS` and, when one says so, hangs up the call on its
    worker (its rows stop after their next token), as a stream's relay does for streamed samples."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[str, tuple[list[Callable[[], bool]], Callable[[], object]]] = {}
        self._running = False

    def watch(
        self,
        call_id: str,
        cancels: list[Callable[[], bool]],
        hang_up: Callable[[], object],
        call: concurrent.futures.Future[Any],
    ) -> None:
        """Watch `cancels` until `call` is done; `hang_up()` once if one of them says so first."""
        with self._lock:
            self._watched[call_id] = (cancels, hang_up)
            start, self._running = not self._running, True
        call.add_done_callback(lambda _: self._forget(call_id))
        if start:
            threading.Thread(target=self._poll, name="eztinker-ray-cancels", daemon=True).start()

    def _forget(self, call_id: str) -> None:
        with self._lock:
            self._watched.pop(call_id, None)

    def _poll(self) -> None:
        while True:
            with self._lock:
                if not self._watched:  # nothing to watch: the next `watch` starts a new thread
                    self._running = False
                    return
                watched = list(self._watched.items())
            for call_id, (cancels, hang_up) in watched:
                if any(cancelled() for cancelled in cancels):
                    self._forget(call_id)
                    try:
                        hang_up()
                    except Exception:  # the worker is gone: its call fails on its own
                        log.debug("hanging up call %s failed", call_id, exc_info=True)
            time.sleep(CANCEL_POLL_SECONDS)


def _unwrapped(worker: str, exc: BaseException) -> EngineError:
    """A failed call's error as the caller hears it: an engine error the actor method raised (Ray wraps
    it in a `RayTaskError`) as itself, so it keeps its class and status; anything else a `ComputeError`."""
    from ray.exceptions import RayTaskError

    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    if isinstance(cause, EngineError):
        return cause
    return ComputeError(f"the call to model worker {worker} failed: {exc}")


def _relay(
    worker: str,
    stream: Any,
    out: concurrent.futures.Future[Any],
    callbacks: list[Callable[..., None] | None],
    cancels: list[Callable[[], bool]],
    hang_up: Callable[[], object],
    lost: Callable[[BaseException], None],
) -> None:
    """Relay a worker's token stream (`RayBackend._sample_streaming`): run each token's `on_token`
    callback on this side, settle `out` with the final reply, and `hang_up` once when a caller is gone."""
    import ray
    from ray.exceptions import RayActorError

    hung_up = False
    try:
        for ref in stream:
            event = ray.get(ref)
            if isinstance(event, Reply):
                if event.error is not None:
                    out.set_exception(event.error)
                else:
                    out.set_result(event.value)
                return
            index, *token = event
            callback = callbacks[index]
            if callback is not None:
                callback(*token)
            if not hung_up and any(cancelled() for cancelled in cancels):
                hung_up = True  # the caller has gone: tell the worker to stop decoding
                hang_up()
        out.set_exception(ComputeError(f"model worker {worker} ended the stream without a result"))
    except RayActorError as exc:
        lost(exc)
        out.set_exception(WorkerLostError(f"model worker {worker} died while sampling"))
    except Exception as exc:
        if not out.done():
            out.set_exception(_unwrapped(worker, exc))
