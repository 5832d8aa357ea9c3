"""`WorkerPool`: the model workers of a Ray cluster, seen by the `Service` as one engine.

Each run lives on one worker (placed by free memory when it is created) and every call for it goes
there; a worker may hold several base models, and one base model may have replicas on several
workers. The pool offers the `Engine` methods the service uses, synchronously, plus `call_async` and
`sample_async` for the ops the service's jobs start (their results arrive on a Ray thread).

Worker loss: a call that finds its worker dead (or the health check, every `HEALTH_INTERVAL` seconds)
marks the worker lost, fails that call with `WorkerLostError`, and tells the service which runs were on
it (`on_worker_lost`); the service re-places them from their last checkpoint while new calls for them
wait (`restored`). A replacement worker is started in the background, so capacity comes back.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from eztinker.engine import (
    ComputeError,
    ConflictError,
    EngineConfig,
    EngineError,
    InvalidInputError,
    NonFiniteError,
    NotFoundError,
    RunInfo,
    SamplerInfo,
    UnknownLossError,
)
from eztinker.engine.model import load_tokenizer
from eztinker.engine.sampler import SampleRequest
from eztinker.engine.types import SampleResult
from eztinker.settings import Settings

from .worker import ModelWorker, RemoteError, Reply, WorkerStatus, host_memory_bytes

log = logging.getLogger(__name__)

RAY_NAMESPACE = "eztinker"
WORKER_PREFIX = "eztinker-"  # a model worker's Ray actor name: the prefix, then its worker name
HEALTH_INTERVAL = 1.0  # seconds between health checks of idle workers
CALL_TIMEOUT = 600.0  # seconds a synchronous call may take (loading a big model included)
RESTORE_TIMEOUT = 600.0  # seconds a call for a run being re-placed waits for it
_ERRORS: dict[str, type[EngineError]] = {
    cls.__name__: cls for cls in (NotFoundError, ConflictError, NonFiniteError, ComputeError)
}


class WorkerLostError(ComputeError):
    """The worker holding the run died while (or before) running this op."""


def decode_error(error: RemoteError) -> EngineError:
    """The `EngineError` a worker reported, rebuilt on this side."""
    if error.kind in ("InvalidInputError", "UnknownLossError"):
        cls = UnknownLossError if error.kind == "UnknownLossError" else InvalidInputError
        return cls(error.field or "request", error.message)
    return _ERRORS.get(error.kind, ComputeError)(error.message)


@dataclass
class _Worker:
    name: str
    actor: Any  # a Ray actor handle of `ModelWorker`
    alive: bool = True
    status: WorkerStatus | None = None


class WorkerPool:
    """Model workers as Ray actors; runs placed by free memory; calls routed to the run's worker."""

    def __init__(self, settings: Settings, *, on_worker_lost: Callable[[str, list[str]], None] | None = None):
        # Workers run this interpreter's environment: don't let `uv run` make Ray ship the project.
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        try:
            import ray
            import ray.exceptions
        except ImportError as exc:
            raise RuntimeError("--workers ray needs Ray: install it with `uv sync --extra ray`") from exc

        self.settings = settings
        self.on_worker_lost = on_worker_lost
        self.config = EngineConfig(device=settings.device)
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            local = settings.ray_address is None
            ray.init(
                address=settings.ray_address,
                namespace=RAY_NAMESPACE,
                num_cpus=max(1, round(settings.ray_workers * settings.ray_cpus_per_worker))
                if local
                else None,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        gpus = settings.ray_gpus_per_worker
        if gpus is None:  # one GPU per worker when the cluster has GPUs
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        self._actor_class = ray.remote(ModelWorker)
        self._actor_options: dict[str, Any] = {
            "num_cpus": settings.ray_cpus_per_worker,
            "num_gpus": gpus,
            "max_concurrency": 1000,
            "max_restarts": 0,
        }
        self._worker_kwargs: dict[str, Any] = {
            "device": settings.device if not gpus else None,
            "dtype": settings.dtype,
            "token_budget": settings.token_budget,
            "threads": max(1, int(settings.ray_cpus_per_worker)),
            "plugins": list(settings.plugins),
            "scheduler_options": {
                "max_queue": settings.max_queue,
                "max_queue_per_run": settings.max_queue_per_run,
                "max_pass_jobs": settings.max_pass_jobs,
                "pass_token_budget": settings.pass_token_budget,
                "pass_linger": settings.pass_linger_ms / 1000,
            },
        }
        if not gpus and settings.ray_address is None:  # CPU workers on this host share its memory
            self._worker_kwargs["memory_bytes"] = host_memory_bytes() // settings.ray_workers
        self._lock = threading.RLock()
        self._workers: dict[str, _Worker] = {}
        self._runs: dict[str, str] = {}  # run id -> worker name
        self._samplers: dict[str, tuple[str, SamplerInfo]] = {}  # sampler id -> (worker name, info)
        self._restoring: dict[str, threading.Event] = {}  # runs being re-placed after a worker loss
        self._tokenizers: dict[str, Any] = {}
        self._count = 0
        self._stopping = threading.Event()
        # On a cluster this server joined, workers are detached: they outlive it, keep their runs across
        # its restarts, and other API servers of the cluster find them by name. A local cluster it started
        # itself ends with it.
        self._detached = not self._owns_ray
        if self._detached:
            self._adopt_workers()
        while sum(w.alive for w in self._workers.values()) < settings.ray_workers:
            self._add_worker()
        try:
            ray.get([w.actor.pid.remote() for w in self._workers.values()], timeout=CALL_TIMEOUT)
        except ray.exceptions.RayError as exc:  # e.g. a plugin that does not import on the workers
            self.stop()
            raise RuntimeError(f"a model worker failed to start: {exc}") from exc
        self._monitor = threading.Thread(target=self._watch_health, name="eztinker-ray-health", daemon=True)
        self._monitor.start()

    def _add_worker(self) -> _Worker:
        with self._lock:
            if self._detached:  # a name no other API server of the cluster will pick
                name, options = f"worker-{uuid.uuid4().hex[:6]}", {"lifetime": "detached"}
            else:
                name, options = f"worker-{self._count}", {}
                self._count += 1
            actor = self._actor_class.options(
                name=f"{WORKER_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
                if not self._detached
                else f"{WORKER_PREFIX}{name}",
                namespace=RAY_NAMESPACE,
                **options,
                **self._actor_options,
            ).remote(name, **self._worker_kwargs)
            worker = self._workers[name] = _Worker(name, actor)
        return worker

    def _adopt_workers(self) -> None:
        """Take on the detached workers already in the cluster (started by this server before a restart,
        or by another API server)."""
        import ray
        from ray.util import list_named_actors

        for entry in list_named_actors(all_namespaces=True):
            if entry["namespace"] != RAY_NAMESPACE or not entry["name"].startswith(WORKER_PREFIX):
                continue
            name = entry["name"][len(WORKER_PREFIX) :]
            try:
                actor = ray.get_actor(entry["name"], namespace=RAY_NAMESPACE)
                ray.get(actor.pid.remote(), timeout=30)
            except Exception:  # gone since it was listed
                log.debug("model worker %s is listed but does not answer", name)
                continue
            self._workers[name] = _Worker(name, actor)
        if self._workers:
            log.warning("joined %d running model workers: %s", len(self._workers), ", ".join(self._workers))

    def adopt_runs(self) -> set[str]:
        """Learn which runs and sampler snapshots the workers already hold; returns the run ids."""
        for worker in [w for w in list(self._workers.values()) if w.alive]:
            try:
                runs: list[RunInfo] = self._sync(worker.name, "list_runs", None)
                samplers: list[SamplerInfo] = self._sync(worker.name, "list_samplers", None)
            except EngineError:
                continue
            with self._lock:
                self._runs.update({info.run_id: worker.name for info in runs})
                self._samplers.update({info.sampler_id: (worker.name, info) for info in samplers})
        return set(self._runs)

    def stop(self) -> None:
        """Stop watching the workers; end them too unless they are detached (they keep their runs)."""
        import ray

        self._stopping.set()
        if not self._detached:
            for worker in list(self._workers.values()):
                try:
                    ray.kill(worker.actor)
                except Exception:  # already gone
                    log.debug("worker %s was already gone", worker.name)
        if self._owns_ray:
            ray.shutdown()

    # --- workers -----------------------------------------------------------------------------------------

    def workers(self) -> list[WorkerStatus]:
        """The live workers' last reported status (refreshed every `HEALTH_INTERVAL` seconds)."""
        if any(w.alive and w.status is None for w in list(self._workers.values())):
            self._statuses()  # a worker not heard from yet (just started or joined)
        return [w.status for w in list(self._workers.values()) if w.alive and w.status is not None]

    def worker_of(self, run_id: str) -> str | None:
        return self._runs.get(run_id)

    def kill_worker(self, name: str) -> None:
        """Kill worker `name` at once (for failure drills and tests): its runs go through worker loss."""
        import ray

        ray.kill(self._workers[name].actor, no_restart=True)

    def _statuses(self) -> list[WorkerStatus]:
        import ray
        from ray.exceptions import RayActorError

        alive = [w for w in list(self._workers.values()) if w.alive]
        refs = [w.actor.status.remote() for w in alive]
        statuses = []
        for worker, ref in zip(alive, refs, strict=True):
            try:
                worker.status = ray.get(ref, timeout=CALL_TIMEOUT)
            except RayActorError as exc:
                self._lost(worker.name, exc)
                continue
            statuses.append(worker.status)
        return statuses

    def _place(self, base_model: str) -> str:
        """The worker a new run of `base_model` goes to: the most memory left free after placing it
        (a worker without the model pays for loading it), ties to one that has it, then the least busy."""
        statuses = self._statuses()
        if not statuses:
            raise ComputeError("no model worker is alive; the pool is starting replacements — retry shortly")
        size = next((s.models[base_model] for s in statuses if base_model in s.models), 0)

        def score(s: WorkerStatus) -> tuple[float, bool, int]:
            has = base_model in s.models
            return (s.free_bytes - (0 if has else size), has, -s.runs)

        return max(statuses, key=score).name

    def _watch_health(self) -> None:
        while not self._stopping.wait(HEALTH_INTERVAL):
            try:
                self._statuses()
            except Exception:
                log.exception("the health check of the model workers failed")

    def _lost(self, name: str, exc: BaseException) -> None:
        """Worker `name` is dead: forget it, hand its runs to `on_worker_lost`, start a replacement."""
        with self._lock:
            worker = self._workers.get(name)
            if worker is None or not worker.alive:
                return
            worker.alive = False
            runs = [run_id for run_id, w in self._runs.items() if w == name]
            for run_id in runs:
                del self._runs[run_id]
                self._restoring[run_id] = threading.Event()
            for sampler_id in [s for s, (w, _) in self._samplers.items() if w == name]:
                del self._samplers[sampler_id]
        log.error("model worker %s died (%s); re-placing its %d runs", name, exc, len(runs))
        restoring = False
        if self.on_worker_lost is not None:
            try:
                self.on_worker_lost(name, runs)  # it calls `restored` for each run when done with it
                restoring = True
            except Exception:
                log.exception("the runs of model worker %s could not be handed over for restoring", name)
        if not restoring:
            for run_id in runs:  # never leave calls waiting for a restore that will not come
                self.restored(run_id)
        if not self._stopping.is_set():
            threading.Thread(target=self._replace, args=(name,), daemon=True).start()

    def _replace(self, name: str) -> None:
        import ray

        try:
            worker = self._add_worker()
            ray.get(worker.actor.pid.remote(), timeout=CALL_TIMEOUT)
            log.warning("model worker %s replaces %s", worker.name, name)
        except Exception:
            log.exception("could not start a replacement for model worker %s", name)

    def restored(self, run_id: str) -> None:
        """The run's re-placement is over (done or given up): calls waiting for it go ahead."""
        event = self._restoring.pop(run_id, None)
        if event is not None:
            event.set()

    # --- calls ---------------------------------------------------------------------------------------------

    def _reply(self, worker: str, ref: Any) -> concurrent.futures.Future[Any]:
        """A future of the call's value, from the Ray reference of its `Reply`; worker death is handled."""
        from ray.exceptions import RayActorError

        out: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def done(raw: concurrent.futures.Future[Reply]) -> None:
            try:
                reply = raw.result()
            except RayActorError as exc:
                self._lost(worker, exc)
                out.set_exception(
                    WorkerLostError(
                        f"model worker {worker} died while running this op; its runs are re-placed on "
                        "another worker from their last checkpoint (see the run's step and status)"
                    )
                )
                return
            except Exception as exc:
                out.set_exception(ComputeError(f"the call to model worker {worker} failed: {exc}"))
                return
            if reply.error is not None:
                out.set_exception(decode_error(reply.error))
            elif isinstance(reply.value, list):  # co-batched ops: one outcome each, errors among them
                out.set_result([decode_error(v) if isinstance(v, RemoteError) else v for v in reply.value])
            else:
                out.set_result(reply.value)

        ref.future().add_done_callback(done)
        return out

    def _call(
        self, worker: str, method: str, for_run: str | None, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        with self._lock:
            handle = self._workers[worker]
        if not handle.alive:
            failed: concurrent.futures.Future[Any] = concurrent.futures.Future()
            failed.set_exception(WorkerLostError(f"model worker {worker} is gone"))
            return failed
        return self._reply(worker, handle.actor.call.remote(method, for_run, args, kwargs))

    def call_async(
        self, run_id: str, method: str, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        """`engine.<method>(*args, **kwargs)` on run `run_id`'s worker; waits first if it is being re-placed."""
        future = self._dispatch(run_id, method, *args, **kwargs)
        if method == "save_sampler":  # (callbacks run in order: the pool knows the sampler before the caller)
            future.add_done_callback(lambda f: f.exception() or self.remember_sampler(run_id, f.result()))
        return future

    def _dispatch(
        self, run_id: str, method: str, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        event = self._restoring.get(run_id)
        if event is None:
            return self._call(self._worker(run_id), method, run_id, *args, **kwargs)
        out: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def when_restored() -> None:
            event.wait(RESTORE_TIMEOUT)
            try:
                inner = self._call(self._worker(run_id), method, run_id, *args, **kwargs)
            except EngineError as exc:
                out.set_exception(exc)
                return
            inner.add_done_callback(lambda f: _settle(out, f))

        threading.Thread(target=when_restored, daemon=True).start()
        return out

    def _worker(self, run_id: str) -> str:
        worker = self._runs.get(run_id)
        if worker is None:  # perhaps created, or restored, through another API server of the cluster
            worker = self.locate(run_id)
        if worker is None:
            raise NotFoundError(f"no run {run_id!r}")
        return worker

    def locate(self, run_id: str) -> str | None:
        """The live worker holding run `run_id`, asking the workers when this server does not know it."""
        if run_id in self._runs:
            return self._runs[run_id]
        if self._detached:
            self.adopt_runs()
        return self._runs.get(run_id)

    def _sync(self, worker: str, method: str, for_run: str | None, *args: Any, **kwargs: Any) -> Any:
        return self._call(worker, method, for_run, *args, **kwargs).result(CALL_TIMEOUT)

    def _on_run(self, run_id: str, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.call_async(run_id, method, *args, **kwargs).result(CALL_TIMEOUT)

    def _read_run(self, run_id: str, method: str, *args: Any) -> Any:
        """A read of run `run_id`: if its worker turns out dead, asked again of the worker it is restored on."""
        try:
            return self._on_run(run_id, method, *args)
        except WorkerLostError:
            return self._on_run(run_id, method, *args)

    def _with_model(self, base_model: str) -> str:
        """A live worker that has `base_model` loaded (the least loaded), or the one it is placed on."""
        holders = [s for s in self.workers() if base_model in s.models]
        if holders:
            return min(holders, key=lambda s: (s.running_rows + s.waiting_rows, s.runs)).name
        worker = self._place(base_model)
        self._sync(worker, "load_model", None, base_model)
        self._statuses()
        return worker

    # --- the Engine methods the service uses ----------------------------------------------------------

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
        return self._sync(self._with_model(name), "default_targets", None, name)

    def output_head_name(self, name: str) -> str | None:
        return self._sync(self._with_model(name), "output_head_name", None, name)

    def check_requests(self, name: str, requests: Sequence[SampleRequest]) -> None:
        adapters = {r.adapter for r in requests} - {None}
        worker = self._sampling_worker(name, next(iter(adapters), None))
        bare = [replace(r, on_token=None, cancelled=None) for r in requests]
        self._sync(worker, "check_requests", None, name, bare)

    def create_run(
        self,
        base_model: str,
        lora_config: Any = None,
        loss_config: Any = None,
        *,
        run_id: str | None = None,
        adapter_path: str | Path | None = None,
        optimizer: str | None = None,
        with_optimizer: bool = True,
    ) -> RunInfo:
        worker = self._place(base_model)
        info: RunInfo = self._sync(
            worker,
            "create_run",
            run_id,
            base_model,
            lora_config,
            loss_config,
            run_id=run_id,
            adapter_path=adapter_path,
            optimizer=optimizer,
            with_optimizer=with_optimizer,
        )
        with self._lock:
            self._runs[info.run_id] = worker
        self._statuses()  # the next placement sees this run's memory
        return info

    def delete_run(self, run_id: str) -> None:
        self._on_run(run_id, "delete_run", run_id)
        with self._lock:
            self._runs.pop(run_id, None)

    def run_info(self, run_id: str) -> RunInfo:
        return self._read_run(run_id, "run_info", run_id)

    def check_data(self, run_id: str, data: Sequence[Any], loss: Any = None) -> None:
        self._read_run(run_id, "check_data", run_id, list(data), loss)

    def save_sampler(self, run_id: str, sampler_id: str | None = None) -> SamplerInfo:
        return self._on_run(run_id, "save_sampler", run_id, sampler_id)

    def remember_sampler(self, run_id: str, info: SamplerInfo) -> None:
        """Sampler `info`, just saved from run `run_id`, lives on that run's worker."""
        with self._lock:
            self._samplers[info.sampler_id] = (self._runs[run_id], info)

    def list_samplers(self) -> list[SamplerInfo]:
        return [info for _, info in list(self._samplers.values())]

    def delete_sampler(self, sampler_id: str) -> None:
        worker, _ = self._samplers.get(sampler_id) or (None, None)
        if worker is None:
            raise NotFoundError(f"no sampler {sampler_id!r}")
        self._sync(worker, "delete_sampler", None, sampler_id)
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

    def sample_async(self, base_model: str, requests: list[SampleRequest]) -> concurrent.futures.Future[Any]:
        """Generate `requests` (one adapter, or none) in the continuous batch of the worker that has it.

        Samples of a bare base model change nothing, so if their worker dies they are retried once on
        another worker.
        """
        adapter = next((r.adapter for r in requests if r.adapter is not None), None)
        if any(r.on_token is not None for r in requests):
            return self._sample_streaming(base_model, adapter, requests)
        requests = [replace(r, cancelled=None) for r in requests]  # (callables stay on this side)
        out: concurrent.futures.Future[list[SampleResult]] = concurrent.futures.Future()

        def attempt(retries: int) -> None:
            try:
                worker = self._sampling_worker(base_model, adapter)
                handle = self._workers[worker]
            except EngineError as exc:
                out.set_exception(exc)
                return
            inner = self._reply(worker, handle.actor.sample.remote(base_model, requests))

            def done(f: concurrent.futures.Future[Any]) -> None:
                if isinstance(f.exception(), WorkerLostError) and adapter is None and retries > 0:
                    threading.Thread(target=attempt, args=(retries - 1,), daemon=True).start()
                else:
                    _settle(out, f)

            inner.add_done_callback(done)

        attempt(1)
        return out

    def _sample_streaming(
        self, base_model: str, adapter: str | None, requests: list[SampleRequest]
    ) -> concurrent.futures.Future[Any]:
        """`sample_async` for requests with `on_token` callbacks: the worker streams each token back
        (a Ray streaming call) and the callbacks run here, on a thread of their own."""
        import ray
        from ray.exceptions import RayActorError

        out: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            worker = self._sampling_worker(base_model, adapter)
        except EngineError as exc:
            out.set_exception(exc)
            return out
        callbacks = [r.on_token for r in requests]
        cancels = [r.cancelled for r in requests if r.cancelled is not None]
        stripped = [replace(r, on_token=None, cancelled=None) for r in requests]
        actor = self._workers[worker].actor
        stream_id = uuid.uuid4().hex
        stream = actor.sample_stream.options(num_returns="streaming").remote(
            base_model, stripped, [c is not None for c in callbacks], stream_id
        )
        hung_up = False

        def relay() -> None:
            nonlocal hung_up
            try:
                for ref in stream:
                    event = ray.get(ref)
                    if isinstance(event, Reply):
                        if event.error is not None:
                            out.set_exception(decode_error(event.error))
                        else:
                            out.set_result(event.value)
                        return
                    index, *token = event
                    callback = callbacks[index]
                    if callback is not None:
                        callback(*token)
                    if not hung_up and any(cancelled() for cancelled in cancels):
                        hung_up = True  # the caller has gone: tell the worker to stop decoding
                        actor.hang_up.remote(stream_id)
                out.set_exception(ComputeError(f"model worker {worker} ended the stream without a result"))
            except RayActorError as exc:
                self._lost(worker, exc)
                out.set_exception(WorkerLostError(f"model worker {worker} died while sampling"))
            except Exception as exc:
                if not out.done():
                    out.set_exception(ComputeError(f"streaming from model worker {worker} failed: {exc}"))

        threading.Thread(target=relay, name="eztinker-ray-stream", daemon=True).start()
        return out

    @property
    def waiting_rows(self) -> int:
        return sum(s.waiting_rows for s in self.workers())

    @property
    def running_rows(self) -> int:
        return sum(s.running_rows for s in self.workers())


def _settle(out: concurrent.futures.Future[Any], source: concurrent.futures.Future[Any]) -> None:
    exc = source.exception()
    if exc is not None:
        out.set_exception(exc)
    else:
        out.set_result(source.result())
