"""The Tinker SDK's server-side custom losses: `POST /api/v1/create_custom_loss` (SDK 0.38
`ServiceClient.create_custom_loss` when `/client/config` says `custom_loss_server_side`).

The body is JSON `CreateCustomLossRequest` ``{"session_id", "custom_loss_seq_id", "name", "inputs":
[{"name", "rank"}], "graph": {"format": 1, "nodes": [...]}}``: a torch.fx graph as plain data, never
pickled code. `eztinker.engine.loss_graph` checks it against its allow-list: a graph it refuses, or a
malformed body, is a 422 naming the node or field (the SDK raises it at once). An accepted one is stored
for the caller's key (`service.custom_loss`) and answered with a future resolving to
``{"loss_id", "type": "create_custom_loss"}``; a resend (same session and `custom_loss_seq_id`) gets the
first answer. The SDK then sends `forward_backward(loss_fn="custom", loss_fn_config={"loss_id": ...})`,
which runs in one pass on the server (`api/tinker.py` resolves the loss through `custom_losses`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from eztinker.api.deps import OwnerDep, ServiceDep, get_owner
from eztinker.api.tinker_futures import StateDep, WireFuture, once
from eztinker.api.tinker_sessions import check_new_object
from eztinker.scheduler import Job
from eztinker.service.custom_loss import custom_losses

authed = APIRouter(dependencies=[Depends(get_owner)])


class CreateCustomLoss(BaseModel):
    model_config = ConfigDict(extra="ignore")

    session_id: str = Field(..., min_length=1)
    custom_loss_seq_id: int = Field(..., ge=0)
    name: str = Field(..., min_length=1, max_length=256)
    inputs: list[dict[str, Any]] = Field(..., min_length=1)
    graph: dict[str, Any]


@authed.post("/create_custom_loss")
def create_custom_loss(
    body: CreateCustomLoss, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """Check and store a traced custom loss; a future of its loss id."""
    check_new_object(state, body.session_id, owner)

    def make() -> dict[str, Any]:
        loss_id = custom_losses(service).create(owner, body.name, body.inputs, body.graph)
        job = Job(op="create_custom_loss", run_id=None, fn=lambda: None, owner=owner)
        job.settle({"loss_id": loss_id, "type": "create_custom_loss"}, None, None)
        future = WireFuture(owner)
        future.settle(job)
        return {"request_id": state.add(future, job.job_id)}

    key = service.access.key(owner, "create_custom_loss", body.session_id, str(body.custom_loss_seq_id))
    return once(state, key, make)
