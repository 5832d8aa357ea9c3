"""SQLAlchemy 2 tables: `runs`, `jobs`, `checkpoints`, `step_metrics`.

Column names equal the field names of the records in `records.py`. The types are portable between SQLite
and PostgreSQL: times are Unix seconds in a double (`Double`), configs and results are `JSON`, counts that
can pass 2**31 (parameters, bytes, tokens) are `BigInteger`.

Checkpoints and step metrics belong to their run (foreign key, `ON DELETE CASCADE`): deleting a run takes
them along and neither can name a run that does not exist. Jobs have no foreign key on purpose: the job
history outlives the runs it touched.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Double, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """The declarative base of the store's tables; `Base.metadata.create_all` creates them."""


class RunRow(Base):
    __tablename__ = "runs"

    run_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    base_model: Mapped[str] = mapped_column(Text)
    lora_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    loss_config: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    owner: Mapped[str | None] = mapped_column(String(255), index=True)
    step: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True)
    num_parameters: Mapped[int | None] = mapped_column(BigInteger)
    last_loss: Mapped[float | None] = mapped_column(Double)
    created_at: Mapped[float] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double)


class JobRow(Base):
    __tablename__ = "jobs"

    job_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    run_id: Mapped[str | None] = mapped_column(String(255), index=True)
    op: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    owner: Mapped[str | None] = mapped_column(String(255))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    error_category: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Double, index=True)
    started_at: Mapped[float | None] = mapped_column(Double)
    finished_at: Mapped[float | None] = mapped_column(Double)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"

    # The composite primary key is the "(run_id, name) is unique" rule.
    run_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    optimizer_path: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    owner: Mapped[str | None] = mapped_column(String(255), index=True)
    created_at: Mapped[float] = mapped_column(Double)


class StepMetricsRow(Base):
    __tablename__ = "step_metrics"
    __table_args__ = (Index("ix_step_metrics_run_id_step", "run_id", "step"),)

    # A surrogate key: a run resumed from an earlier checkpoint records the same step numbers again.
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(255), ForeignKey("runs.run_id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Double)
    learning_rate: Mapped[float | None] = mapped_column(Double)
    grad_norm: Mapped[float | None] = mapped_column(Double)
    num_tokens: Mapped[int] = mapped_column(BigInteger)
    time: Mapped[float] = mapped_column(Double)
