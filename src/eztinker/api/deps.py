"""Dependencies shared by the facades: the service, and the caller's identity."""

from __future__ import annotations

from typing import Annotated

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
