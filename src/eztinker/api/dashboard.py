"""The web dashboard at `/`: static files shipped in the package, plus the few views the API lacks.

The page (`dashboard/index.html`, `app.js`, `style.css`; no build step, no third-party code) talks to the
native API (`/v1/...`) like any other client, sending the API key it keeps in localStorage as `X-API-Key`.
This router adds, under `/dashboard/api/`:

- `events`: a server-sent event stream of what changed — runs, the selected run's new metric points,
  the queue, checkpoints and server stats. Each open page gets one stream; once a second
  (`TICK_SECONDS`) it reads the service in a worker thread and sends only the parts that differ from
  what it last sent. A stream ends after `STREAM_SECONDS` and the page reconnects (asking only for the
  metric points it lacks), so no open tab holds a server's shutdown for long.
- `runs` (with owners), `samplers`, `tokens` (each token's text, for the logprob view), `stats`, and a
  checkpoint merged into its base model as a `.tar.gz` (what `eztinker checkpoints export --merge` writes).

Auth is the API's own check (`get_owner`). The stream also takes the key as `?key=`, for `EventSource`,
which cannot set headers; the page itself streams with `fetch` and sends the header, which keeps the key
out of access logs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from eztinker.api.deps import OwnerDep, ServiceDep, get_owner
from eztinker.api.native import archive_response
from eztinker.engine.errors import NotFoundError
from eztinker.models import api
from eztinker.service import Service

STATIC_DIR = Path(__file__).with_name("dashboard")
STATIC_PATH = "/dashboard/static"
TICK_SECONDS = 1.0
STREAM_SECONDS = 30.0
KEEPALIVE_SECONDS = 15.0
RECONNECT_MS = 1000

router = APIRouter(tags=["dashboard"])
_api = APIRouter(prefix="/dashboard/api")


def static_files() -> StaticFiles:
    """The page's assets, mounted at `STATIC_PATH` by the app."""
    return StaticFiles(directory=STATIC_DIR)


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    """The dashboard page; it needs no key (the data it shows does)."""
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


# --- views -------------------------------------------------------------------------------------------


class DashboardRun(api.Run):
    owner: str | None = Field(
        description="The first 8 hex digits of the owner's key hash; None without auth."
    )
    mine: bool = Field(description="Whether the caller's key owns the run.")


class SamplerView(BaseModel):
    sampler_id: str
    base_model: str
    run_id: str | None
    step: int | None


class TokensRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # as the native bodies: a misspelt field is named, not ignored

    base_model: str
    # Ids a tokenizer can decode: a negative one, or one past 32 bits, made the tokenizer raise (a 500).
    tokens: list[Annotated[int, Field(ge=0, lt=2**31)]] = Field(..., max_length=65536)


class TokensView(BaseModel):
    texts: list[str]


class MemoryView(BaseModel):
    name: str
    allocated_bytes: int | None = Field(description="GPU: held by tensors. Host: this process's RSS.")
    reserved_bytes: int | None = Field(description="GPU: held by PyTorch's caching allocator.")
    used_bytes: int
    total_bytes: int


class WorkerView(BaseModel):
    """A Ray model worker (with `--workers ray`): where it runs, what it holds, how loaded it is."""

    name: str
    host: str
    device: str
    models: list[str]
    runs: int
    free_bytes: int
    total_bytes: int
    queue_depth: int
    running_rows: int


class ServerStats(BaseModel):
    health: api.Health
    uptime_seconds: float
    auth_enabled: bool
    memory: list[MemoryView]
    tokens_trained: float
    tokens_sampled: float
    active_runs: int
    workers: list[WorkerView] = []
    # Adapter paging (`--adapter-memory`): runs and bytes per tier (device, host, disk), the budget, and
    # page-in counts and seconds; None where the backend has no pager (Ray).
    paging: dict[str, Any] | None = None


def _runs(service: Service, owner: str | None) -> list[DashboardRun]:
    return [
        DashboardRun(**run.model_dump(), owner=run_owner[:8] if run_owner else None, mine=run_owner == owner)
        for run, run_owner in service.views.runs_with_owners(owner)
    ]


def _stats(service: Service) -> ServerStats:
    return ServerStats(health=service.views.health(), **service.views.server_stats())


@_api.get("/runs")
def runs(service: ServiceDep, owner: OwnerDep) -> list[DashboardRun]:
    """The caller's runs (every run without auth), each with its owner."""
    return _runs(service, owner)


@_api.get("/samplers")
def samplers(service: ServiceDep, owner: OwnerDep) -> list[SamplerView]:
    """Sampler snapshots in memory that the caller may sample."""
    return [SamplerView(**dataclasses.asdict(s)) for s in service.views.visible_samplers(owner)]


@_api.post("/tokens", dependencies=[Depends(get_owner)])
def token_texts(body: TokensRequest, service: ServiceDep) -> TokensView:
    """Each token's text in a loaded base model's tokenizer ("" for an id it lacks: a model's embedding
    may be padded past its tokenizer, and the page shows whatever the model sampled)."""
    return TokensView(texts=service.views.token_texts(body.base_model, body.tokens))


@_api.get("/stats", dependencies=[Depends(get_owner)])
def stats(service: ServiceDep) -> ServerStats:
    """Health, memory per device, uptime and token totals."""
    return _stats(service)


@_api.get("/runs/{run_id}/checkpoints/{name}/merged", response_class=FileResponse)
def merged_checkpoint(run_id: str, name: str, service: ServiceDep, owner: OwnerDep) -> FileResponse:
    """The checkpoint merged into its base model, as a .tar.gz of a Hugging Face model directory (slow)."""
    archive = service.views.merged_checkpoint_archive(run_id, name, owner)
    return archive_response(archive, f"{run_id}-{name}-merged.tar.gz")


# --- live updates ------------------------------------------------------------------------------------


async def get_stream_owner(
    service: ServiceDep,
    x_api_key: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
    key: Annotated[str | None, Query(description="The API key, for clients that cannot set headers.")] = None,
) -> str | None:
    """The API's own key check, with `?key=` accepted when no key header is sent."""
    return await get_owner(service, x_api_key if x_api_key is not None else key, authorization)


class _Stream:
    """What one page has been sent, so each tick sends only what changed."""

    def __init__(self, service: Service, owner: str | None, run_id: str | None, after: int) -> None:
        self.service, self.owner, self.run_id = service, owner, run_id
        # The cursor into the selected run's history: the newest step the page has, and how many points
        # (None: whatever the history has up to `after`). Both come from the history as read, never from
        # the run list: a step recorded between reading the two would otherwise be sent twice.
        self.last_step = after
        self.points: int | None = None
        self.read_at: tuple[int, float | None] | None = None  # the run's (step, updated_at) at the last read
        self.missing_reported = False
        self.sent: dict[str, str] = {}

    def tick(self) -> list[tuple[str, str]]:
        """The events to send now, as (event, JSON data). Blocking: reads the store."""
        runs = _runs(self.service, self.owner)
        parts: dict[str, Any] = {
            "runs": [r.model_dump(mode="json") for r in runs],
            "queue": self.service.views.queue(self.owner).model_dump(mode="json"),
            "checkpoints": [
                c.model_dump(mode="json") for c in self.service.views.list_checkpoints(None, self.owner)
            ],
            "stats": _stats(self.service).model_dump(mode="json"),
        }
        events = []
        for name, value in parts.items():
            data = json.dumps(value, separators=(",", ":"))
            if self.sent.get(name) != data:
                self.sent[name] = data
                events.append((name, data))
        if self.run_id is not None:
            metrics = self._new_metrics(next((r for r in runs if r.run_id == self.run_id), None))
            if metrics is not None:
                events.append(("metrics", json.dumps(metrics, separators=(",", ":"))))
        return events

    def _new_metrics(self, run: DashboardRun | None) -> dict[str, Any] | None:
        """The selected run's metric points the page lacks; all of them, with `reset`, if the history
        changed other than by growing (a resume from an earlier checkpoint records its steps again)."""
        assert self.run_id is not None
        if run is None:  # unknown, deleted, or not the caller's: said once
            if self.missing_reported:
                return None
            self.missing_reported = True
            return {"run_id": self.run_id, "error": f"no run {self.run_id!r}", "history": []}
        changed = (run.step, run.updated_at)  # a recorded step changes both, in one transaction
        if changed == self.read_at:
            return None
        try:
            history = self.service.views.metrics(self.run_id, self.owner).history
        except NotFoundError:  # deleted since the run list was read: reported on the next tick
            return None
        self.read_at = changed  # (the history may be newer than the run list: it is the next tick's to see)
        held = sum(m.step <= self.last_step for m in history)  # ordered by step: the page's are first
        newest = history[-1].step if history else 0
        reset = newest < self.last_step or (self.points is not None and held != self.points)
        new = history if reset else history[held:]
        self.last_step, self.points = newest, len(history)
        if not new and not reset:
            return None
        return {"run_id": self.run_id, "reset": reset, "history": [m.model_dump(mode="json") for m in new]}


@_api.get("/events")
async def events(
    request: Request,
    service: ServiceDep,
    owner: Annotated[str | None, Depends(get_stream_owner)],
    run: Annotated[str | None, Query(description="Also stream this run's new metric points.")] = None,
    after: Annotated[int, Query(description="The newest step of `run` the page already has.")] = 0,
) -> StreamingResponse:
    """Server-sent events: `runs`, `queue`, `checkpoints`, `stats` and (with `run`) `metrics`, on change."""
    stream = _Stream(service, owner, run, after)

    async def generate() -> AsyncGenerator[str]:
        yield f"retry: {RECONNECT_MS}\n\n"
        started = last_sent = time.monotonic()
        while time.monotonic() - started < STREAM_SECONDS:
            for event, data in await run_in_threadpool(stream.tick):
                yield f"event: {event}\ndata: {data}\n\n"
                last_sent = time.monotonic()
            if time.monotonic() - last_sent > KEEPALIVE_SECONDS:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
            await asyncio.sleep(TICK_SECONDS)
            if await request.is_disconnected():
                return
        yield "event: reconnect\ndata: {}\n\n"

    return StreamingResponse(
        generate(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


router.include_router(_api)
