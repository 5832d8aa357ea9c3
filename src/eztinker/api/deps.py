"""What the facades share: the service and the caller's identity (dependencies), and waiting on work only
while the client is still there (`while_connected`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Request

from eztinker.service import Service


# Both are `async`: trivial work, so they run on the event loop instead of costing a threadpool hop each.
async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def get_owner(
    service: ServiceDep,
    x_api_key: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> str | None:
    """The caller's owner id (its key's hash), or None when the server runs without API keys."""
    key = x_api_key
    if key is None and authorization is not None and authorization.lower().startswith("bearer "):
        key = authorization[7:].strip()
    return service.access.owner_for_key(key)


OwnerDep = Annotated[str | None, Depends(get_owner)]


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
