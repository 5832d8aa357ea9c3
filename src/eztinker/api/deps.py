"""What the facades share: the service and the caller's identity (dependencies), a check every JSON body
passes (`text_is_unicode`), and waiting on work only while the client is still there (`while_connected`)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Request

from eztinker.engine.errors import InvalidInputError
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


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


async def text_is_unicode(request: Request) -> None:
    """Every route's JSON body: a string spelling a lone UTF-16 surrogate (`"\\ud800"`: valid JSON, but no
    character, which no tokenizer takes) is refused naming its field, in the route's error shape. Only a
    body that escapes a surrogate at all is parsed here (an emoji's escaped pair is fine)."""
    if request.method not in ("POST", "PUT", "PATCH") or "json" not in request.headers.get(
        "content-type", ""
    ):
        return
    body = await request.body()  # (read once: the route gets the same bytes)
    if not _SURROGATE_ESCAPE.search(body):
        return
    try:
        data = json.loads(body)
    except ValueError:
        return  # not JSON: the route's own parsing says so
    where = _lone_surrogate(data, "")
    if where is not None:
        raise InvalidInputError(
            where or "body", "holds a lone UTF-16 surrogate, which is not text; send UTF-8 text"
        )


def _lone_surrogate(value: object, where: str) -> str | None:
    """The field path of the first string in `value` holding a lone surrogate (keys included), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            field = f"{where}.{key}" if where else str(key)
            found = _lone_surrogate(key, field) if isinstance(key, str) else None
            found = found if found is not None else _lone_surrogate(item, field)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{where}[{i}]")
            if found is not None:
                return found
    return None
