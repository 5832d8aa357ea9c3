"""The plain values the store takes and returns, and its errors.

Records are frozen dataclasses, not ORM objects: a caller never holds a session or a lazily loaded
attribute, so a record can cross threads, be cached, or be turned into JSON after the store has moved on.
Each record's field names are exactly its table's column names (see `models.py`), which is what lets
`Store` convert in both directions without a per-field mapping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

RunStatus = Literal["active", "lost", "copy"]
"""`active`: the run's adapter is in this server's memory. `lost`: the server restarted since, so the
adapter is gone; the run's history is intact and `load_checkpoint` brings it back to `active`."""

JobStatus = Literal["queued", "running", "completed", "failed"]
ErrorCategory = Literal["user", "server"]
CheckpointKind = Literal["state", "weights"]
"""`state`: weights plus optimizer state (resume training). `weights`: weights only (sampling, export)."""

INFLIGHT_JOB_STATUSES: tuple[JobStatus, ...] = ("queued", "running")

# What `eztinker.store` re-exports from here (INFLIGHT_JOB_STATUSES is the store's own business).
__all__ = [
    "CheckpointKind",
    "CheckpointRecord",
    "DuplicateError",
    "ErrorCategory",
    "JobRecord",
    "JobStatus",
    "RunRecord",
    "RunStatus",
    "StepMetricsRecord",
    "StoreError",
    "UnknownRunError",
]


class StoreError(Exception):
    """Root of the errors the store raises on purpose."""


class DuplicateError(StoreError):
    """A row with this key already exists: a run id, a job id, or a checkpoint name within its run."""


class UnknownRunError(StoreError, KeyError):
    """The row names a run that is not in the store (never created, or deleted meanwhile)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A LoRA training run. `owner` is the hash of the API key that created it (None when auth is off)."""

    run_id: str
    base_model: str
    lora_config: dict[str, Any]
    loss_config: dict[str, Any] | None = None
    owner: str | None = None
    step: int = 0
    status: RunStatus = "active"
    num_parameters: int | None = None
    last_loss: float | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One submitted op. Written twice at most: inserted at submit, updated when it finishes."""

    job_id: str
    op: str
    run_id: str | None = None
    owner: str | None = None
    status: JobStatus = "queued"
    result: dict[str, Any] | None = None
    error: str | None = None
    error_category: ErrorCategory | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """A saved checkpoint directory; `name` is unique within its run."""

    run_id: str
    name: str
    kind: CheckpointKind
    step: int
    path: str
    optimizer_path: str | None = None
    size_bytes: int = 0
    owner: str | None = None
    created_at: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class StepMetricsRecord:
    """What one optimizer step of a run measured. `time` is when it was recorded (Unix seconds)."""

    run_id: str
    step: int
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    num_tokens: int = 0
    time: float = field(default_factory=time.time)
