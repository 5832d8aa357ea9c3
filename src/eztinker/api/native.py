"""The native REST API (`/v1/...`) for `EZTinkerClient`: validate, call the service, return.

Ops answer 202 with a `JobRef` at once; `GET /v1/jobs/{id}?wait=s` long-polls for the result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from eztinker.api.deps import OwnerDep, ServiceDep
from eztinker.models import api
from eztinker.scheduler import Job

router = APIRouter(prefix="/v1", tags=["native"])

MAX_WAIT_SECONDS = 60.0

T = TypeVar("T")


async def while_connected(request: Request, waiting: Awaitable[T]) -> T | None:
    """Await `waiting` unless the client hangs up first: then cancel it and return None.

    A long-poll whose client has gone has nobody to answer, so it ends at once, instead of keeping its
    task (and its request) alive until the job finishes or the wait runs out, once per abandoned poll.
    Only the waiting stops: the job itself runs on. Call it once the request body has been read.
    """
    work = asyncio.ensure_future(waiting)
    hang_up = asyncio.ensure_future(_hung_up(request))
    try:
        await asyncio.wait((work, hang_up), return_when=asyncio.FIRST_COMPLETED)
    finally:
        hang_up.cancel()
        work.cancel()  # nothing if it is done
    return work.result() if work.done() and not work.cancelled() else None


async def _hung_up(request: Request) -> None:
    """Return when the client disconnects. After the body, the server's next message is only that
    (sent when the connection closes, or when the response is complete)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _ref(job: Job) -> api.JobRef:
    return api.JobRef(job_id=job.job_id, status=job.status, run_id=job.run_id, op=job.op)


@router.post("/runs", status_code=status.HTTP_201_CREATED)
def create_run(body: api.CreateRunRequest, service: ServiceDep, owner: OwnerDep) -> api.Run:
    """Create a LoRA run on a base model (loaded on first use, so the first call may take a while)."""
    return service.create_run(body, owner)


@router.get("/runs")
def list_runs(service: ServiceDep, owner: OwnerDep) -> list[api.Run]:
    return service.list_runs(owner)


@router.get("/runs/{run_id}")
def get_run(run_id: str, service: ServiceDep, owner: OwnerDep) -> api.Run:
    return service.get_run(run_id, owner)


@router.delete("/runs/{run_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_run(run_id: str, service: ServiceDep, owner: OwnerDep) -> Response:
    service.delete_run(run_id, owner)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/runs/{run_id}/forward_backward", status_code=status.HTTP_202_ACCEPTED)
def forward_backward(
    run_id: str, body: api.ForwardBackwardRequest, service: ServiceDep, owner: OwnerDep
) -> api.JobRef:
    """Compute the loss and accumulate its gradients (applied by the next optim_step)."""
    return _ref(service.forward_backward(run_id, body, owner))


@router.post("/runs/{run_id}/forward", status_code=status.HTTP_202_ACCEPTED)
def forward(
    run_id: str, body: api.ForwardBackwardRequest, service: ServiceDep, owner: OwnerDep
) -> api.JobRef:
    """Compute the loss and per-token logprobs without touching the run."""
    return _ref(service.forward_backward(run_id, body, owner, backward=False))


@router.post("/runs/{run_id}/optim_step", status_code=status.HTTP_202_ACCEPTED)
def optim_step(run_id: str, body: api.OptimStepRequest, service: ServiceDep, owner: OwnerDep) -> api.JobRef:
    """Apply the accumulated gradients with AdamW and zero them."""
    return _ref(service.optim_step(run_id, body, owner))


@router.post("/runs/{run_id}/sample", status_code=status.HTTP_202_ACCEPTED)
def sample_run(run_id: str, body: api.SampleRequest, service: ServiceDep, owner: OwnerDep) -> api.JobRef:
    """Sample from the run's current adapter."""
    return _ref(service.sample(run_id, body, owner))


@router.post("/sample", status_code=status.HTTP_202_ACCEPTED)
def sample_base(body: api.SampleRequest, service: ServiceDep, owner: OwnerDep) -> api.JobRef:
    """Sample from a base model (default: the server's first model) or a sampler snapshot."""
    return _ref(service.sample(None, body, owner))


@router.post("/runs/{run_id}/save", status_code=status.HTTP_202_ACCEPTED)
def save(run_id: str, body: api.SaveRequest, service: ServiceDep, owner: OwnerDep) -> api.JobRef:
    """Save a checkpoint: `state` (adapter + optimizer + step) or `weights` (the adapter alone)."""
    return _ref(service.save(run_id, body, owner))


@router.post("/runs/{run_id}/load", status_code=status.HTTP_202_ACCEPTED)
def load(run_id: str, body: api.LoadRequest, service: ServiceDep, owner: OwnerDep) -> api.JobRef:
    """Load a checkpoint into the run (how a run lost in a restart resumes)."""
    return _ref(service.load(run_id, body, owner))


@router.get("/runs/{run_id}/checkpoints")
def list_checkpoints(run_id: str, service: ServiceDep, owner: OwnerDep) -> list[api.Checkpoint]:
    return service.list_checkpoints(run_id, owner)


@router.get("/runs/{run_id}/checkpoints/{name}/archive", response_class=FileResponse)
def download_checkpoint(run_id: str, name: str, service: ServiceDep, owner: OwnerDep) -> FileResponse:
    """The checkpoint directory as a .tar.gz (a PEFT adapter directory, plus optimizer state if saved)."""
    archive = service.checkpoint_archive(run_id, name, owner)
    return FileResponse(
        archive,
        media_type="application/gzip",
        filename=f"{run_id}-{name}.tar.gz",
        background=BackgroundTask(archive.unlink, missing_ok=True),
    )


@router.delete("/runs/{run_id}/checkpoints/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_checkpoint(run_id: str, name: str, service: ServiceDep, owner: OwnerDep) -> Response:
    service.delete_checkpoint(run_id, name, owner)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/runs/{run_id}/metrics")
def run_metrics(run_id: str, service: ServiceDep, owner: OwnerDep) -> api.RunMetrics:
    """Loss, learning rate and gradient norm at every optimizer step."""
    return service.metrics(run_id, owner)


@router.get("/queue")
def queue(service: ServiceDep, owner: OwnerDep) -> api.QueueView:
    """What runs and what waits, in start order, with each job's position and estimated start."""
    return service.queue(owner)


@router.get("/jobs/{job_id}")
async def get_job(
    job_id: str,
    request: Request,
    service: ServiceDep,
    owner: OwnerDep,
    wait: Annotated[
        float, Query(ge=0, le=MAX_WAIT_SECONDS, description="Seconds to wait for completion.")
    ] = 0,
) -> api.Job:
    """A job's status and result; with `wait`, answers as soon as it finishes (long-poll)."""
    job = service.scheduler.get(job_id)
    if job is not None and wait > 0:
        await while_connected(request, job.wait(wait))
    return service.get_job(job_id, owner)
