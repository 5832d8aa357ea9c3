"""Prometheus metrics for `/metrics`: ops, their latency, tokens, and the queue.

Each `Telemetry` has its own registry, so several apps in one process (tests, `eztinker.serve()`)
never collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from eztinker.scheduler import Job, Scheduler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_PASS_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_PASS_TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class SamplingRows(Protocol):
    """Where sampling stands: rows waiting for room in a running batch, and rows decoding."""

    @property
    def waiting_rows(self) -> int: ...

    @property
    def running_rows(self) -> int: ...


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        counter = partial(Counter, registry=self.registry)
        gauge = partial(Gauge, registry=self.registry)
        histogram = partial(Histogram, registry=self.registry)
        op_latency = partial(histogram, labelnames=["op"], buckets=_LATENCY_BUCKETS)  # seconds, by op
        self.ops = counter("eztinker_ops", "Jobs finished, by op and final status.", ["op", "status"])
        self.compute_seconds = op_latency("eztinker_op_compute_seconds", "Time a job spent executing.")
        self.queue_seconds = op_latency("eztinker_op_queue_seconds", "Time a job waited before it started.")
        self.tokens_trained = counter("eztinker_tokens_trained", "Tokens through forward/forward_backward.")
        self.tokens_sampled = counter("eztinker_tokens_sampled", "Tokens generated (its rate() is tokens/s).")
        self.time_to_first_token = histogram(
            "eztinker_sample_time_to_first_token_seconds",
            "From a sample request reaching its sampling engine to its first token.",
            buckets=_TTFT_BUCKETS,
        )
        self.sampling_queue = gauge(
            "eztinker_sampling_queue_rows", "Sample rows waiting for room in a running batch (the KV budget)."
        )
        self.sampling_rows = gauge("eztinker_sampling_running_rows", "Sample rows decoding now.")
        self.queue_depth = gauge("eztinker_queue_depth", "Jobs waiting to start.")
        self.running = gauge("eztinker_jobs_running", "Jobs executing now.")
        self.utilisation = gauge(
            "eztinker_worker_utilisation", "Busy fraction of the workers over the last minute."
        )
        self.pass_jobs = histogram(
            "eztinker_pass_jobs",
            "Jobs (of different runs) executed together in one pass.",
            buckets=_PASS_SIZE_BUCKETS,
        )
        self.pass_tokens = histogram(
            "eztinker_pass_tokens", "Tokens in one pass.", buckets=_PASS_TOKEN_BUCKETS
        )
        self.busy_seconds = counter("eztinker_worker_busy_seconds", "Seconds workers spent executing passes.")

    def watch_scheduler(self, scheduler: Scheduler) -> None:
        self.queue_depth.set_function(lambda: scheduler.queue_depth)
        self.running.set_function(lambda: scheduler.running)
        self.utilisation.set_function(lambda: scheduler.stats().utilisation)

    def watch_sampling(self, sampling: SamplingRows) -> None:
        self.sampling_queue.set_function(lambda: sampling.waiting_rows)
        self.sampling_rows.set_function(lambda: sampling.running_rows)

    def watch_paging(self, stats: Callable[[], Any]) -> None:
        """Adapter paging's runs and bytes per tier and its page-ins, read at each scrape (`stats()`: an
        `eztinker.engine.paging.PagingStats`, or None when the backend does not page: no lines)."""
        self.registry.register(_PagingCollector(stats))

    def pass_finished(self, jobs: Sequence[Job], seconds: float) -> None:
        self.pass_jobs.observe(len(jobs))
        self.pass_tokens.observe(sum(job.tokens for job in jobs))
        self.busy_seconds.inc(seconds)

    def job_finished(self, job: Job) -> None:
        self.ops.labels(op=job.op, status=job.status).inc()
        if job.compute_seconds is not None:
            self.compute_seconds.labels(op=job.op).observe(job.compute_seconds)
        if job.started_at is not None:
            self.queue_seconds.labels(op=job.op).observe(max(0.0, job.started_at - job.created_at))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PagingCollector(Collector):
    """`/metrics` lines of adapter paging (`Telemetry.watch_paging`)."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        if s is None:
            return
        runs = GaugeMetricFamily(
            "eztinker_adapter_runs", "Runs whose state is in each tier.", labels=["tier"]
        )
        held = GaugeMetricFamily(
            "eztinker_adapter_bytes", "Bytes of run state in each tier.", labels=["tier"]
        )
        for tier, count, size in (
            ("device", s.resident_runs, s.resident_bytes),
            ("host", s.host_runs, s.host_bytes),
            ("disk", s.disk_runs, s.disk_bytes),
        ):
            runs.add_metric([tier], count)
            held.add_metric([tier], size)
        yield runs
        yield held
        budget = s.budget_bytes
        yield GaugeMetricFamily(
            "eztinker_adapter_memory_budget_bytes",
            "The bound on run state resident on the device (-1: none).",
            value=-1 if budget is None else budget,
        )
        for name, text, value in (
            ("eztinker_adapter_page_ins", "Page-ins an op waited for.", s.page_ins),
            ("eztinker_adapter_page_in_seconds", "Seconds ops waited for page-ins.", s.page_in_seconds),
            ("eztinker_adapter_prefetches", "Page-ins done ahead of a queued op.", s.prefetches),
            ("eztinker_adapter_prefetch_seconds", "Seconds spent on prefetches.", s.prefetch_seconds),
            ("eztinker_adapter_page_outs", "Runs paged out (device to host or disk).", s.page_outs),
        ):
            yield CounterMetricFamily(name, text, value=value)
