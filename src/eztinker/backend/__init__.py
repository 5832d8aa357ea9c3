"""Where compute lives: the `Backend` protocol, and its implementations.

- `LocalBackend` (the default): an `Engine`, its continuous sampler and the co-batching scheduler, in
  this process.
- `RayBackend` (`--workers ray`): model workers as Ray actors, each a `LocalBackend`; Ray is imported
  only in this mode.
- `VllmBackend` (`--sampler vllm`, `eztinker.backend.vllm`): a `LocalBackend` whose sampling of base
  models and sampler snapshots goes to a vLLM server per base model.

`make_backend(settings, ...)` builds the one `settings.worker_pool` names; the service talks only to
the protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from eztinker.backend.base import (
    Backend,
    BackendHooks,
    BackendStatus,
    RunSpec,
    SaveOptions,
    SchedulerOptions,
    StepOp,
    WorkerStatus,
)
from eztinker.backend.local import LocalBackend, engine_config

if TYPE_CHECKING:
    from eztinker.engine import Engine
    from eztinker.settings import Settings

__all__ = [
    "Backend",
    "BackendHooks",
    "BackendStatus",
    "LocalBackend",
    "RunSpec",
    "SaveOptions",
    "SchedulerOptions",
    "StepOp",
    "WorkerStatus",
    "make_backend",
]


def make_backend(
    settings: Settings, options: SchedulerOptions, hooks: BackendHooks, *, engine: Engine | None = None
) -> Backend:
    """The backend `settings.worker_pool` names (`engine`: an in-process engine to use, for embedding)."""
    if settings.worker_pool == "ray":
        if settings.sampler == "vllm":
            raise ValueError(
                "--sampler vllm runs with the in-process backend (--workers N), not --workers ray"
            )
        from eztinker.backend.ray_pool import RayBackend  # Ray is imported only in this mode

        return RayBackend(settings, options, hooks)
    if engine is None:
        from eztinker.engine import Engine

        engine = Engine(
            engine_config(
                settings.device,
                settings.dtype,
                settings.token_budget,
                adapter_memory=settings.adapter_memory_bytes,
                adapter_host_memory=settings.adapter_host_memory_bytes,
                page_dir=settings.data_dir / "pages",
            )
        )
    if settings.sampler == "vllm":
        from eztinker.backend.vllm import VllmBackend, VllmPool, options_from_settings

        pool = VllmPool(options_from_settings(settings), settings.data_dir / "vllm-adapters")
        return VllmBackend(engine, options, hooks, pool=pool)
    return LocalBackend(engine, options, hooks)
