"""`RayWorkers`: the model workers of a Ray cluster as actors — started or adopted, watched, placed on,
and replaced when one dies. `RayBackend` (`eztinker.backend.ray_pool`) routes the calls.

On a cluster the API server joined (`ray_address`), workers are detached: they outlive it, keep their
runs across its restarts, and other API servers of the cluster find them by name. A local cluster the
server started itself ends with it.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from eztinker.backend.base import SchedulerOptions, WorkerStatus
from eztinker.backend.ray_worker import ModelWorker, host_memory_bytes
from eztinker.engine import ComputeError
from eztinker.settings import Settings

log = logging.getLogger(__name__)

RAY_NAMESPACE = "eztinker"
WORKER_PREFIX = "eztinker-"  # a model worker's Ray actor name: the prefix, then its worker name
HEALTH_INTERVAL = 1.0  # seconds between health checks of idle workers
CALL_TIMEOUT = 600.0  # seconds a synchronous call may take (loading a big model included)


@dataclass
class Worker:
    name: str
    actor: Any  # a Ray actor handle of `ModelWorker`
    alive: bool = True
    status: WorkerStatus | None = None


class RayWorkers:
    """The cluster's model workers. `on_lost(name, error)` hears of each worker found dead, once."""

    def __init__(
        self, settings: Settings, options: SchedulerOptions, on_lost: Callable[[str, BaseException], None]
    ) -> None:
        # Workers run this interpreter's environment: don't let `uv run` make Ray ship the project.
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        try:
            import ray
            import ray.exceptions
        except ImportError as exc:
            raise RuntimeError("--workers ray needs Ray: install it with `uv sync --extra ray`") from exc

        self.on_lost = on_lost
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
            # Adapter paging: each worker bounds its own device's run state (pages on its own host's disk).
            "adapter_memory": settings.adapter_memory_bytes,
            "adapter_host_memory": settings.adapter_host_memory_bytes,
            "page_dir": str(settings.data_dir / "pages"),
            "scheduler_options": replace(options, on_finish=None, on_pass=None),  # (the hooks stay here)
        }
        if not gpus and settings.ray_address is None:  # CPU workers on this host share its memory
            self._worker_kwargs["memory_bytes"] = host_memory_bytes() // settings.ray_workers
        self._lock = threading.RLock()
        self._workers: dict[str, Worker] = {}
        self._count = 0
        self.stopping = threading.Event()
        self.detached = not self._owns_ray
        if self.detached:
            self._adopt()
        while sum(w.alive for w in self._workers.values()) < settings.ray_workers:
            self._add()
        try:
            ray.get([w.actor.pid.remote() for w in self._workers.values()], timeout=CALL_TIMEOUT)
        except ray.exceptions.RayError as exc:  # e.g. a plugin that does not import on the workers
            self.stop()
            raise RuntimeError(f"a model worker failed to start: {exc}") from exc
        self._monitor = threading.Thread(target=self._watch, name="eztinker-ray-health", daemon=True)
        self._monitor.start()

    def _add(self) -> Worker:
        with self._lock:
            if self.detached:  # a name no other API server of the cluster will pick
                name, options = f"worker-{uuid.uuid4().hex[:6]}", {"lifetime": "detached"}
                actor_name = f"{WORKER_PREFIX}{name}"
            else:
                name, options = f"worker-{self._count}", {}
                actor_name = f"{WORKER_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
                self._count += 1
        # Not under the lock: creating a named actor waits on Ray's own I/O thread, which may be running a
        # call's done-callback that is waiting for this lock (`mark_dead` of another dead worker) — a
        # deadlock that hung every call once two workers died close together.
        actor = self._actor_class.options(
            name=actor_name, namespace=RAY_NAMESPACE, **options, **self._actor_options
        ).remote(name, **self._worker_kwargs)
        with self._lock:
            worker = self._workers[name] = Worker(name, actor)
        return worker

    def _adopt(self) -> None:
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
            self._workers[name] = Worker(name, actor)
        if self._workers:
            log.warning("joined %d running model workers: %s", len(self._workers), ", ".join(self._workers))

    def stop(self) -> None:
        """Stop watching the workers; end them too unless they are detached (they keep their runs)."""
        import ray

        self.stopping.set()
        if not self.detached:
            for worker in list(self._workers.values()):
                try:
                    ray.kill(worker.actor)
                except Exception:  # already gone
                    log.debug("worker %s was already gone", worker.name)
        if self._owns_ray:
            ray.shutdown()

    def get(self, name: str) -> Worker:
        with self._lock:
            return self._workers[name]

    def alive(self) -> list[Worker]:
        return [w for w in list(self._workers.values()) if w.alive]

    def statuses(self) -> list[WorkerStatus]:
        """Every live worker's status, asked now; a worker that does not answer is lost."""
        import ray
        from ray.exceptions import RayActorError

        alive = self.alive()
        refs = [w.actor.status.remote() for w in alive]
        statuses = []
        for worker, ref in zip(alive, refs, strict=True):
            try:
                worker.status = ray.get(ref, timeout=CALL_TIMEOUT)
            except RayActorError as exc:
                self.on_lost(worker.name, exc)
                continue
            statuses.append(worker.status)
        return statuses

    def last_statuses(self) -> list[WorkerStatus]:
        """The live workers' last reported status (refreshed every `HEALTH_INTERVAL` seconds)."""
        if any(w.status is None for w in self.alive()):
            self.statuses()  # a worker not heard from yet (just started or joined)
        return [w.status for w in self.alive() if w.status is not None]

    def place(self, base_model: str) -> str:
        """The worker a new run of `base_model` goes to: the most memory left free after placing it
        (a worker without the model pays for loading it), ties to one that has it, then the least busy."""
        statuses = self.statuses()
        if not statuses:
            raise ComputeError("no model worker is alive; the pool is starting replacements — retry shortly")
        size = next((s.models[base_model] for s in statuses if base_model in s.models), 0)

        def score(s: WorkerStatus) -> tuple[float, bool, int]:
            has = base_model in s.models
            return (s.free_bytes - (0 if has else size), has, -s.runs)

        return max(statuses, key=score).name

    def mark_dead(self, name: str) -> bool:
        """Worker `name` is dead: True the first time this is said of it; a replacement is started."""
        with self._lock:
            worker = self._workers.get(name)
            if worker is None or not worker.alive:
                return False
            worker.alive = False
        if not self.stopping.is_set():
            threading.Thread(target=self._replace, args=(name,), daemon=True).start()
        return True

    def kill(self, name: str) -> None:
        """Kill worker `name` at once (for failure drills and tests): its runs go through worker loss."""
        import ray

        ray.kill(self._workers[name].actor, no_restart=True)

    def _watch(self) -> None:
        while not self.stopping.wait(HEALTH_INTERVAL):
            try:
                self.statuses()
            except Exception:
                log.exception("the health check of the model workers failed")

    def _replace(self, name: str) -> None:
        import ray

        try:
            worker = self._add()
            ray.get(worker.actor.pid.remote(), timeout=CALL_TIMEOUT)
            log.warning("model worker %s replaces %s", worker.name, name)
        except Exception:
            log.exception("could not start a replacement for model worker %s", name)
