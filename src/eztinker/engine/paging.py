"""Adapter paging: a bound on the run state (adapter weights, gradients, optimizer moments) resident on
the compute device, with the least recently used idle runs paged out to host memory, then to disk.

Tiers: `device` (where the run computes), `host` (pinned host memory; only when the device is a GPU —
on CPU compute host memory *is* the device, so a run goes straight to disk), `disk` (one safetensors
file per run under the page directory, written to a temporary name and renamed into place, so a page is
whole or absent). A paged-out run keeps its `TrainingRun`, its `nn.Parameter` objects and its optimizer:
only their tensors' storage moves (`param.data`, `param.grad`, the optimizer's state tensors), so a page-in
puts back exactly the bytes that left — results are bit-identical to never paging — and a run in the
middle of gradient accumulation pages out with its gradients. Every tensor comes back in a fresh
allocation (never a view into a read buffer), as the run's tensors were.

Who may page out: a run with no op running (`pins`, held by `Pager.using` around every engine op that
touches the run's tensors, and by the sampler while it decodes for the run) and, first, none queued
(`wanted`, told by the scheduler through `expect` / `idle`). Least recently used first; queued runs go
only if the idle ones are not enough. The runs executing at once are pinned; the scheduler forms passes
only of runs that fit the budget together (`fit_together`), so only a single run larger than the whole
budget — which still runs, alone — or passes running on several workers at once can go over it.

Prefetch: when the scheduler queues an op for a paged-out run (`expect`), the pager's thread pages it
in while earlier passes run — if it fits the budget once idle runs have made room — so the op rarely
waits. An op whose run is still out pages it in itself before computing (`Pager.using`).

Crash safety: pages live only as long as the process (the page directory is per process and removed at
start-up when its process is gone); a run's checkpoints are never touched, so a crash while paged loses
nothing a checkpoint had. Page files are not fsynced: a page is never read after a crash.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from safetensors.torch import load_file, save_file

from eztinker.engine.errors import ComputeError
from eztinker.engine.run_state import (
    copy_tensors,
    put_state,
    state_bytes,
    state_tensors,
    take_state,
    tensor_bytes,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from eztinker.engine.run import TrainingRun

Tier = Literal["device", "host", "disk"]

# Beyond this multiple of the budget, the thread releasing a run evicts itself instead of leaving it to
# the pager's thread (which may lag behind a burst of run creations or page-ins).
_HARD_CEILING = 1.25


@dataclass(frozen=True)
class PagingConfig:
    """`device_bytes`: the run state resident on the compute device (None: no bound, nothing pages).
    `host_bytes`: the host tier's bound (GPU compute only; None: no bound). `page_dir`: where disk pages
    go (a per-process directory is made inside; None: the system temporary directory)."""

    device_bytes: int | None = None
    host_bytes: int | None = None
    page_dir: Path | None = None
    prefetch: bool = True


@dataclass(frozen=True)
class PagingStats:
    """What `/metrics` and the dashboard show: runs per tier and the cost of paging."""

    enabled: bool
    budget_bytes: int | None
    host_budget_bytes: int | None
    resident_runs: int
    host_runs: int
    disk_runs: int
    resident_bytes: int
    host_bytes: int
    disk_bytes: int
    page_ins: int  # page-ins an op waited for
    page_in_seconds: float  # their total time
    prefetches: int  # page-ins done ahead of the op by the pager's thread
    prefetch_seconds: float
    page_outs: int

    @classmethod
    def total(cls, parts: Sequence[PagingStats]) -> PagingStats | None:
        """The sum over several pagers (a Ray backend's model workers, each with its own budget); None
        when there are none."""
        if not parts:
            return None

        def budget(values: list[int | None]) -> int | None:
            return None if any(v is None for v in values) else sum(v for v in values if v is not None)

        summed = {
            f.name: sum(getattr(p, f.name) for p in parts)
            for f in dataclasses.fields(cls)
            if f.name not in ("enabled", "budget_bytes", "host_budget_bytes")
        }
        return cls(
            enabled=any(p.enabled for p in parts),
            budget_bytes=budget([p.budget_bytes for p in parts]),
            host_budget_bytes=budget([p.host_budget_bytes for p in parts]),
            **summed,
        )


@dataclass
class _Page:
    """Where one run's state is, and what may move it."""

    run: TrainingRun
    tier: Tier = "device"
    bytes: int = 0  # bytes of the run's state on the device when resident
    pins: int = 0  # ops running on it
    wanted: bool = False  # ops queued for it (the scheduler says)
    moving: bool = False  # a page-in or page-out is under way (outside the lock)
    used: int = 0  # LRU clock
    queued: int = 0  # the clock when it was last queued (prefetch order)
    stuck: bool = False  # the pager's thread failed to move it: left alone until its next op
    host: dict[str, torch.Tensor] | None = None  # host tier: the tensors, pinned where possible
    path: Path | None = None  # disk tier: the page file
    disk_bytes: int = 0
    devices: dict[str, torch.device] = field(default_factory=dict)  # key -> where it lives when resident


def _off_cpu(tensor: torch.Tensor) -> bool:
    return tensor.device.type != "cpu"


def _any(tensor: torch.Tensor) -> bool:
    return True


# --- the pager -----------------------------------------------------------------------------------------


class Pager:
    """Keeps the runs' resident state within `PagingConfig.device_bytes` (see the module docstring).

    Thread-safe. `add` / `forget` a run as it is created / deleted; wrap every op on runs' tensors in
    `using(runs)`; the scheduler calls `expect(run_id)` when a run gets queued work and `idle(run_id)`
    when it has none left. With no budget every call is a no-op.
    """

    def __init__(self, config: PagingConfig | None = None) -> None:
        self.config = config or PagingConfig()
        self.enabled = self.config.device_bytes is not None
        self._pages: dict[str, _Page] = {}
        self._cond = threading.Condition()
        self._clock = itertools.count(1)
        self._working = False  # the pager's thread is moving a run
        self._stopped = False
        self._dir: Path | None = None
        self._dir_lock = threading.Lock()
        self.page_ins = self.prefetches = self.page_outs = 0
        self.page_in_seconds = self.prefetch_seconds = 0.0
        # The latest page-ins' seconds, waited for (False) or prefetched (True): for percentiles.
        self.recent: collections.deque[tuple[bool, float]] = collections.deque(maxlen=100_000)
        self._thread: threading.Thread | None = None
        if self.enabled:
            self._thread = threading.Thread(target=self._work, name="eztinker-pager", daemon=True)
            self._thread.start()

    # --- the life of a run ---------------------------------------------------------------------------

    def add(self, run: TrainingRun) -> None:
        """A new run, resident; pages others out if that goes over the budget."""
        if not self.enabled:
            return
        with self._cond:
            self._pages[run.run_id] = _Page(run, bytes=state_bytes(run), used=next(self._clock))
            self._cond.notify_all()
        self._evict_over(1.0)  # creating many runs at once must not outrun the budget

    def forget(self, run_id: str) -> None:
        """The run is deleted: drop its page (host copy or file) once no move of it is under way."""
        if not self.enabled:
            return
        with self._cond:
            page = self._pages.get(run_id)
            while page is not None and page.moving:
                self._cond.wait()
            page = self._pages.pop(run_id, None)
            self._cond.notify_all()
        if page is not None and page.path is not None:
            page.path.unlink(missing_ok=True)

    def tier(self, run_id: str) -> Tier:
        """Where run `run_id`'s state is now ("device" without a budget)."""
        page = self._pages.get(run_id)
        return "device" if page is None else page.tier

    # --- ops -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def using(self, runs: Sequence[TrainingRun | str | None]) -> Generator[None]:
        """Pin `runs` (none of them pages out meanwhile) and page in those that are out, for one op.

        A run, or an adapter name (a `SampleRequest.adapter`: a run id, a sampler snapshot — snapshots
        never page — or None)."""
        if not self.enabled or not runs:
            yield
            return
        ids = list(dict.fromkeys(r if isinstance(r, str) else r.run_id for r in runs if r is not None))
        self.pin(ids)
        try:
            yield
        finally:
            self.unpin(ids)

    def pin(self, run_ids: Sequence[str | None]) -> None:
        """`using`'s first half (for an op that ends on another thread, as a sample does): page in, pin."""
        if not self.enabled:
            return
        with self._cond:
            pages = [p for r in run_ids if (p := self._pages.get(r)) is not None]
            for page in pages:
                page.pins += 1
                page.used, page.stuck = next(self._clock), False
            try:
                # A run being paged out (still "device" until the copy is done) is waited for, then in.
                while any(p.moving or p.tier != "device" for p in pages):
                    ready = [p for p in pages if p.tier != "device" and not p.moving]
                    if ready:
                        self._page_in(ready[0], prefetch=False)  # (the lock is let go meanwhile)
                    else:
                        self._cond.wait()  # another thread is moving them: it notifies when done
            except BaseException:
                for page in pages:
                    page.pins -= 1
                raise
            self._cond.notify_all()
        self._evict_over(_HARD_CEILING)

    def unpin(self, run_ids: Sequence[str | None]) -> None:
        """`using`'s second half: the op is over; its runs may page out again."""
        if not self.enabled:
            return
        with self._cond:
            for run_id in run_ids:
                page = self._pages.get(run_id)
                if page is None or not page.pins:
                    continue
                page.pins -= 1
                page.used = next(self._clock)
                if page.tier == "device":
                    page.bytes = state_bytes(page.run)  # gradients and moments may have appeared
            self._cond.notify_all()
        self._evict_over(_HARD_CEILING)

    def expect(self, run_id: str) -> None:
        """The scheduler queued an op for `run_id`: keep it resident, and page it in ahead if it is out."""
        if not self.enabled:
            return
        with self._cond:
            page = self._pages.get(run_id)
            if page is not None and not page.wanted:
                page.wanted, page.queued = True, next(self._clock)
                self._cond.notify_all()

    def fit_together(self, run_ids: Sequence[str]) -> bool:
        """Whether these runs' state fits the budget at once (the scheduler forms passes with it: the runs
        of one pass are pinned together, so a pass of more than the budget would overrun it)."""
        if not self.enabled:
            return True
        assert self.config.device_bytes is not None
        with self._cond:
            held = sum(self._pages[r].bytes for r in dict.fromkeys(run_ids) if r in self._pages)
        return held <= self.config.device_bytes

    def idle(self, run_id: str) -> None:
        """The scheduler has nothing left queued or running for `run_id`."""
        if not self.enabled:
            return
        with self._cond:
            page = self._pages.get(run_id)
            if page is not None:
                page.wanted = False
                self._cond.notify_all()

    def settle(self) -> None:
        """Wait until the pager's thread has nothing left to do (tests and benchmarks; no timing)."""
        if not self.enabled:
            return
        with self._cond:
            while self._working or self._next_action() is not None:
                self._cond.wait()

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def stats(self) -> PagingStats:
        with self._cond:
            pages = list(self._pages.values())
            return PagingStats(
                enabled=self.enabled,
                budget_bytes=self.config.device_bytes,
                host_budget_bytes=self.config.host_bytes if self._has_host_tier() else None,
                resident_runs=sum(p.tier == "device" for p in pages),
                host_runs=sum(p.tier == "host" for p in pages),
                disk_runs=sum(p.tier == "disk" for p in pages),
                resident_bytes=self._resident(),
                host_bytes=sum(tensor_bytes(p.host) for p in pages if p.host is not None),
                disk_bytes=sum(p.disk_bytes for p in pages if p.tier == "disk"),
                page_ins=self.page_ins,
                page_in_seconds=self.page_in_seconds,
                prefetches=self.prefetches,
                prefetch_seconds=self.prefetch_seconds,
                page_outs=self.page_outs,
            )

    # --- policy (lock held) --------------------------------------------------------------------------

    def _resident(self) -> int:
        return sum(p.bytes for p in self._pages.values() if p.tier == "device")

    def _has_host_tier(self) -> bool:
        return any(p.run.base.device.type != "cpu" for p in self._pages.values())

    def _victim(self, *, idle_only: bool) -> _Page | None:
        """The least recently used resident run that may page out: idle ones first, then queued ones."""
        movable = [
            p for p in self._pages.values() if p.tier == "device" and not (p.pins or p.moving or p.stuck)
        ]
        for allowed in [False] if idle_only else [False, True]:
            candidates = [p for p in movable if p.wanted == allowed]
            if candidates:
                return min(candidates, key=lambda p: p.used)
        return None

    def _host_victim(self) -> _Page | None:
        """The least recently used run in the host tier, if the host tier is over its bound."""
        bound = self.config.host_bytes
        hosted = [p for p in self._pages.values() if p.tier == "host" and not (p.moving or p.stuck)]
        if bound is None or not hosted:
            return None
        if sum(tensor_bytes(p.host) for p in hosted if p.host is not None) <= bound:
            return None
        return min(hosted, key=lambda p: p.used)

    def _prefetchable(self) -> _Page | None:
        """A queued run that is out and fits once idle runs have made room (earliest queued first)."""
        if not self.config.prefetch:
            return None
        assert self.config.device_bytes is not None
        out = [
            p for p in self._pages.values() if p.wanted and p.tier != "device" and not (p.moving or p.stuck)
        ]
        if not out:
            return None
        page = min(out, key=lambda p: p.queued)
        idle = sum(
            p.bytes
            for p in self._pages.values()
            if p.tier == "device" and not p.pins and not p.moving and not p.wanted
        )
        return page if self._resident() - idle + page.bytes <= self.config.device_bytes else None

    def _next_action(self) -> tuple[str, _Page] | None:
        """What the pager's thread should do next, if anything."""
        budget = self.config.device_bytes
        assert budget is not None
        if self._resident() > budget and (victim := self._victim(idle_only=False)) is not None:
            return "out", victim
        if (victim := self._host_victim()) is not None:
            return "disk", victim
        page = self._prefetchable()
        if page is not None:
            if self._resident() + page.bytes > budget:
                victim = self._victim(idle_only=True)
                return None if victim is None else ("out", victim)
            return "in", page
        return None

    # --- the pager's thread --------------------------------------------------------------------------

    def _work(self) -> None:
        with self._cond:
            while not self._stopped:
                action = self._next_action()
                if action is None:
                    self._cond.wait()
                    continue
                what, page = action
                self._working = True
                try:
                    if what == "in":
                        self._page_in(page, prefetch=True)
                    else:
                        self._page_out(page, to_disk=what == "disk")
                except Exception:  # a failed move leaves the run where it was; its op pages it in
                    log.exception("paging run %s %s failed", page.run.run_id, what)
                    page.stuck = True
                finally:
                    self._working = False
                    self._cond.notify_all()

    def _evict_over(self, factor: float) -> None:
        """Page out in this thread while resident state is over `factor` × the budget."""
        budget = self.config.device_bytes
        assert budget is not None
        with self._cond:
            while self._resident() > factor * budget:
                victim = self._victim(idle_only=False)
                if victim is None:
                    return
                self._page_out(victim, to_disk=False)
                self._cond.notify_all()

    # --- moves (called with the lock held; the copy runs without it) ---------------------------------

    def _page_dir(self) -> Path:
        """This process's page directory, made on first use. Moves call it without the pager's lock (the
        copy runs unlocked), so the pager thread and an op's thread may both be first: the directory is
        made under a lock of its own, and published only once it exists."""
        with self._dir_lock:
            if self._dir is None:
                root = Path(self.config.page_dir or Path(tempfile.gettempdir()) / "eztinker-pages")
                root.mkdir(parents=True, exist_ok=True)
                remove_stale_page_dirs(root)
                made = root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
                made.mkdir()
                self._dir = made
            return self._dir

    def _page_out(self, page: _Page, *, to_disk: bool) -> None:
        """Move a resident run to the host tier (GPU), or to disk (CPU compute, or a hosted run when
        `to_disk`)."""
        run = page.run
        from_host = page.tier == "host"
        disk = from_host or to_disk or run.base.device.type == "cpu"
        page.moving = True
        self._cond.release()
        try:
            if from_host:
                assert page.host is not None
                tensors, devices = page.host, page.devices
            else:
                on_device = run.base.device.type != "cpu"
                devices = {k: t.device for k, t in state_tensors(run).items()}
                # The host tier takes what is on the device (the AdamW step counter stays on the CPU).
                taken = take_state(run, _off_cpu if on_device and not disk else _any)
                tensors = taken if not on_device else copy_tensors(taken, {}, pin=not disk)
                del taken
            path = None
            if disk:
                path = self._page_dir() / f"{run.run_id}.safetensors"
                temp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
                save_file({k: t.contiguous() for k, t in tensors.items()}, str(temp))
                os.replace(temp, path)  # whole or absent
        except BaseException:
            self._cond.acquire()
            page.moving = False
            self._cond.notify_all()
            raise
        self._cond.acquire()
        page.moving = False
        self._cond.notify_all()
        page.devices = devices
        if disk:
            page.tier, page.host, page.path = "disk", None, path
            page.disk_bytes = tensor_bytes(tensors)
        else:
            page.tier, page.host = "host", tensors
        self.page_outs += 1

    def _page_in(self, page: _Page, *, prefetch: bool) -> None:
        run = page.run
        page.moving = True
        self._cond.release()
        start = time.perf_counter()
        try:
            if page.tier == "disk":
                assert page.path is not None
                stored = load_file(str(page.path))
            else:
                assert page.host is not None
                stored = page.host
            # Fresh allocations where the run computes (never views into a read buffer).
            put_state(run, copy_tensors(stored, page.devices, pin=False))
            del stored
        except BaseException as exc:
            self._cond.acquire()
            page.moving = False
            self._cond.notify_all()
            if isinstance(exc, Exception):
                raise ComputeError(
                    f"paging run {run.run_id!r} in failed: {type(exc).__name__}: {exc}"
                ) from exc
            raise
        seconds = time.perf_counter() - start
        self._cond.acquire()
        page.moving = False
        self._cond.notify_all()
        if page.path is not None:
            page.path.unlink(missing_ok=True)
        page.tier, page.host, page.path, page.disk_bytes = "device", None, None, 0
        page.bytes = state_bytes(run)
        self.recent.append((prefetch, seconds))
        if prefetch:
            page.used = next(self._clock)  # just fetched for its op: not the first to go again
            self.prefetches += 1
            self.prefetch_seconds += seconds
        else:
            self.page_ins += 1
            self.page_in_seconds += seconds


def remove_stale_page_dirs(root: Path) -> None:
    """Remove page directories under `root` whose process (`<pid>-<hex>`) is gone."""
    for entry in root.iterdir():
        pid = entry.name.split("-", 1)[0]
        if not entry.is_dir() or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:  # another user's live process
            pass
