"""The server's whole configuration: one typed object, from CLI flags and `EZTINKER_*` environment variables.

Nothing else in EZTinker reads the environment: the CLI builds a `Settings`, and it flows down into the
app, the service and the engine.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]  # EZTINKER_API_KEYS="k1,k2" as well as repeated CLI flags

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}


def parse_size(text: str | int) -> int:
    """Bytes in a size: `24MB` (10**6), `20GiB` (2**30), `512KiB`, `1.5GB`, `1000` (bytes); a unit's
    case does not matter. `ValueError` for anything else."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    match = _SIZE.match(str(text))
    if match is None:
        raise ValueError(f"{text!r} is not a size: write bytes, or a number and a unit (24MB, 20GiB, 512KiB)")
    number, unit = match.groups()
    unit = unit.lower().rstrip("b")
    prefix = unit.rstrip("i")
    if unit == "i":
        raise ValueError(f"{text!r} is not a size: write bytes, or a number and a unit (24MB, 20GiB, 512KiB)")
    scale = 1024 ** (" kmgtp".index(prefix)) if unit.endswith("i") else _UNITS[prefix]
    return int(float(number) * scale)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EZTINKER_", extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0: any free one).")
    data_dir: Path = Field(Path(".eztinker"), description="Database and checkpoints live here.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite under data_dir.")
    models: CommaList = Field(
        default_factory=list,
        description="Base models to load at start; the first is the default for sampling.",
    )
    api_keys: CommaList = Field(
        default_factory=list, description="If set, every route but /health needs one."
    )
    plugins: CommaList = Field(
        default_factory=list, description="Modules imported at start, e.g. ones that register custom losses."
    )
    device: str | None = Field(None, description="cuda, cuda:1, cpu (default: CUDA if available).")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Base model dtype (default: bf16 on CUDA, fp32 on CPU)."
    )
    # One by default: torch's CPU thread pool belongs to the OS thread that drives it, so two workers taking
    # turns on one run's jobs keep two pools, one spinning while the other computes (measured: the client
    # SFT loop at 0.66-0.70 of in-process with 2 workers, 0.98-0.99 with 1). More help with several devices.
    workers: int = Field(1, ge=1, le=64, description="Worker threads executing jobs (one per device).")
    worker_pool: Literal["local", "ray"] = Field(
        "local",
        description="local: models in this process. ray: model workers as Ray actors (see README, Scale out).",
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'ray://host:10001'); default: start a local one."
    )
    ray_workers: int = Field(2, ge=1, le=1024, description="Model workers (Ray actors) to start.")
    ray_cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each model worker reserves.")
    ray_gpus_per_worker: float | None = Field(
        None,
        ge=0,
        description="GPUs each model worker reserves (default: 1 if the cluster has GPUs, else 0).",
    )
    sampler: Literal["engine", "vllm"] = Field(
        "engine",
        description="Who samples base models and sampler snapshots: the engine, or vLLM (README, vLLM).",
    )
    vllm_python: str | None = Field(
        None,
        description="With --sampler vllm: the python of a vLLM environment; EZTinker starts a server per base model.",
    )
    vllm_url: str | None = Field(
        None,
        description="With --sampler vllm: a running vLLM server (runtime LoRA loading on) to use instead.",
    )
    vllm_max_loras: int = Field(4, ge=1, description="Snapshots loaded in vLLM at once (LRU beyond).")
    vllm_max_lora_rank: int = Field(
        64, ge=1, le=512, description="Highest adapter rank vLLM serves; higher ones sample on the engine."
    )
    vllm_kv_cache_gib: int = Field(2, ge=1, description="vLLM's KV cache in GiB (CPU builds).")
    vllm_gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vLLM's share of the GPU (CUDA builds; default vLLM's 0.9)."
    )
    vllm_args: str | None = Field(None, description="More `vllm serve` flags, as one string.")
    max_queue: int = Field(10_000, ge=1, description="Queued jobs beyond this are refused with 429.")
    max_queue_per_run: int = Field(
        1_000,
        ge=1,
        description="Queued jobs of one run beyond this are refused with 429 (one run can't fill the queue).",
    )
    max_pass_jobs: int = Field(
        64, ge=1, description="Most jobs of different runs executed together in one pass (1: no co-batching)."
    )
    pass_linger_ms: float = Field(
        5.0,
        ge=0,
        description="After a pass shared by several runs, how long the next may wait for their next ops (0: never).",
    )
    pass_token_budget: int = Field(
        32_768, ge=1, description="Tokens gathered into one co-batched pass (a bigger lone job still runs)."
    )
    token_budget: int = Field(8192, ge=1, description="Padded tokens per forward chunk.")
    max_body_bytes: int = Field(
        64 * 2**20, ge=1024, description="Larger request bodies are refused with 413."
    )
    max_tokens_per_op: int = Field(
        1_048_576,
        ge=1,
        description="Tokens in one forward/forward_backward beyond this are refused with 422.",
    )
    max_sequence_tokens: int = Field(
        131_072,
        ge=1,
        description="Tokens in one sequence (a datum; a prompt plus its max tokens) beyond this: 422.",
    )
    max_samples: int = Field(
        256,
        ge=1,
        description="Samples one sampling request may ask for (`n`, `num_samples`) beyond this: 422.",
    )
    max_runs_per_key: int = Field(
        1_000, ge=1, description="Live runs (adapters in memory) one API key may hold; beyond: 429."
    )
    checkpoint_sweep_seconds: float = Field(
        60.0, gt=0, description="How often checkpoints past their TTL (expires_at) are deleted."
    )
    session_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="A Tinker session with no heartbeat for this long expires; its sampling snapshots are freed.",
    )
    max_jobs_per_key: int = Field(
        5_000, ge=1, description="Jobs one API key may have queued or running at once; beyond: 429."
    )
    adapter_memory: str | None = Field(
        None,
        description="Run state (adapters, gradients, optimizer moments) kept on the compute device, e.g. "
        "24MB or 20GiB; idle runs beyond it page out to host memory, then disk (default: no bound).",
    )
    adapter_host_memory: str | None = Field(
        None,
        description="With a GPU and --adapter-memory: paged-out run state kept in host memory before "
        "disk (default: no bound).",
    )

    @field_validator("adapter_memory", "adapter_host_memory", mode="before")
    @classmethod
    def _check_size(cls, value: object) -> object:
        if value is None:
            return None
        if not isinstance(value, str | int):
            raise ValueError(f"expected a size such as 24MB or 20GiB, got {value!r}")
        parse_size(value)  # a ValueError names the setting
        return str(value).strip()

    @property
    def adapter_memory_bytes(self) -> int | None:
        return None if self.adapter_memory is None else parse_size(self.adapter_memory)

    @property
    def adapter_host_memory_bytes(self) -> int | None:
        return None if self.adapter_host_memory is None else parse_size(self.adapter_host_memory)

    @field_validator("models", "api_keys", "plugins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def checkpoint_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'eztinker.db').resolve()}"
