"""Prometheus metrics for `/metrics`: ops, their latency, tokens, and the queue.

Each `Telemetry` has its own registry, so several apps in one process (tests, `eztinker.serve()`)
never collide.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from eztinker.scheduler import Job

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ops = Counter(
            "eztinker_ops", "Jobs finished, by op and final status.", ["op", "status"], registry=self.registry
        )
        self.compute_seconds = Histogram(
            "eztinker_op_compute_seconds",
            "Time a job spent executing.",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "eztinker_op_queue_seconds",
            "Time a job waited before it started.",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens_trained = Counter(
            "eztinker_tokens_trained", "Tokens through forward/forward_backward.", registry=self.registry
        )
        self.tokens_sampled = Counter("eztinker_tokens_sampled", "Tokens generated.", registry=self.registry)
        self.queue_depth = Gauge("eztinker_queue_depth", "Jobs waiting to start.", registry=self.registry)

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def job_finished(self, job: Job) -> None:
        self.ops.labels(op=job.op, status=job.status).inc()
        if job.compute_seconds is not None:
            self.compute_seconds.labels(op=job.op).observe(job.compute_seconds)
        if job.started_at is not None:
            self.queue_seconds.labels(op=job.op).observe(max(0.0, job.started_at - job.created_at))

    def render(self) -> bytes:
        return generate_latest(self.registry)
