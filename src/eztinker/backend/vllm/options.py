"""The vLLM sampler's options, its one error, and the LoRA ranks vLLM accepts."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from eztinker.engine.errors import ComputeError, InvalidInputError
from eztinker.engine.sampler import MAX_TOP_K

if TYPE_CHECKING:
    from eztinker.settings import Settings


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for `--max-lora-rank` (an adapter of any rank up to it loads)."""


class VllmUnavailableError(ComputeError):
    """vLLM cannot serve the request: not installed or not starting, or its server died or is restarting."""


@dataclass(frozen=True)
class VllmOptions:
    """How to start (or reach) the vLLM server of a base model, and how the client talks to it."""

    python: str | None = None  # the interpreter of an environment with vLLM: EZTinker starts the server
    url: str | None = None  # or the URL of one already running (started with runtime LoRA updating on)
    max_loras: int = 4  # adapters loaded at a time (vLLM's --max-loras and --max-cpu-loras); LRU beyond
    max_lora_rank: int = 64  # rounded up to a rank vLLM accepts (VLLM_LORA_RANKS); higher: engine sampler
    dtype: str = "auto"  # the engine's dtype (float32 on CPU) for sampler == trainer logprobs
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE (whole GiB) for a CPU build
    gpu_memory_utilization: float | None = None  # a CUDA build's share of the GPU (None: vLLM's default)
    max_model_len: int | None = None  # None: the model's
    enforce_eager: bool | None = None  # None: on for a CPU build (no compile at start), off on a GPU
    max_logprobs: int = MAX_TOP_K  # top-k log-probabilities a request may ask for
    extra_args: tuple[str, ...] = ()  # more `vllm serve` flags, after ours (a later flag wins)
    env: Mapping[str, str] = field(default_factory=dict)  # more environment for the server
    log_path: str | None = None  # the server's output (appended across restarts); None: in log_dir
    log_dir: str | None = None  # where each model's `vllm-<model>.log` goes (None: the temp directory)
    startup_timeout: float = 900.0  # seconds for a (re)start to answer /health
    ready_timeout: float = 900.0  # seconds a request waits for a restarting server
    health_interval: float = 5.0  # seconds between health checks of a running server
    health_failures: int = 3  # failed checks in a row (process alive) before a restart
    max_restarts: int = 5  # restarts in a row that never became healthy before giving up
    request_timeout: float = 600.0  # seconds without a byte from vLLM before a request fails


def vllm_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that serves adapters of rank `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise InvalidInputError("max_lora_rank", f"{rank} is above vLLM's largest, {VLLM_LORA_RANKS[-1]}")


def options_from_settings(settings: Settings) -> VllmOptions:
    """The `VllmOptions` of a server's `Settings`: every option `<name>` that has a setting `vllm_<name>`
    (`--vllm-python`, `--vllm-url`, `--vllm-max-loras`, ...) takes its value, `--vllm-args` is split into
    `extra_args`, and the logs go to `<data_dir>/vllm`."""
    given = {
        f.name: getattr(settings, f"vllm_{f.name}")
        for f in fields(VllmOptions)
        if hasattr(settings, f"vllm_{f.name}")
    }
    return VllmOptions(
        **given,
        extra_args=tuple(shlex.split(settings.vllm_args or "")),
        log_dir=str(settings.data_dir / "vllm"),
    )
