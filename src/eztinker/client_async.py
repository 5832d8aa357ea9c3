"""`AsyncEZTinkerClient`: the asyncio twin of `EZTinkerClient` (`eztinker.client`), over the same
sans-I/O core (`eztinker.client_core`) and the same operations (`eztinker.client_ops`). Import both from
`eztinker.client` (or `eztinker`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from eztinker.client_core import Plan, _advance, _ClientBase, _Done, _FutureBase, _Pause
from eztinker.client_ops import _Operations
from eztinker.models.api import JobRef

__all__ = ["AsyncEZTinkerClient", "AsyncJobFuture"]

R = TypeVar("R")


async def _pause(seconds: float) -> None:
    """`eztinker.client._async_sleep(seconds)`, looked up there when called (tests replace it)."""
    from eztinker import client

    await client._async_sleep(seconds)


class AsyncJobFuture(_FutureBase):
    """A job submitted by `AsyncEZTinkerClient`: `await fut.result()` (or `await fut`), `await fut.done()`."""

    _client: AsyncEZTinkerClient

    async def done(self) -> bool:
        """True once the job has completed or failed. Asks the server once, without waiting, unless known."""
        return await self._client._drive(self._done())

    async def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the job and return its result dict; `JobFailedError` if it failed (see `JobFuture.result`)."""
        return await self._client._drive(self._wait(timeout))

    def __await__(self) -> Generator[Any, None, dict[str, Any]]:
        return self.result().__await__()


class AsyncEZTinkerClient(_ClientBase, _Operations):
    """The asyncio client: the same methods as `EZTinkerClient`, awaited; ops return `AsyncJobFuture`s.

    Use `async with`, or `await client.aclose()` when done.
    """

    def _connect(self, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers, timeout=self.timeout, transport=transport
        )

    # --- life cycle ----------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connections. Calling it again does nothing; any other call afterwards raises."""
        if not self._closed:
            self._closed = True
            await self._http.aclose()

    close = aclose

    async def __aenter__(self) -> Self:
        self._check_open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # --- I/O: running a plan -----------------------------------------------------------------------------

    async def _drive(self, plan: Plan[R]) -> R:
        """As `EZTinkerClient._drive`, awaiting each request and pause."""
        outcome: Any = None
        while not isinstance(step := _advance(plan, outcome), _Done):
            outcome = None
            if isinstance(step, _Pause):
                await _pause(step.seconds)
            else:
                try:
                    outcome = await self._http.send(self._build(step))
                except httpx.TransportError as error:
                    outcome = error
        return step.value

    @staticmethod
    def _method(plan: Callable[..., Plan[R]]) -> Callable[..., Coroutine[Any, Any, R]]:
        """An operation's plan as a coroutine method that runs it (`client_ops._Method`)."""

        @functools.wraps(plan)
        async def run(client: AsyncEZTinkerClient, *args: Any, **kwargs: Any) -> R:
            return await client._drive(plan(client, *args, **kwargs))

        return run

    def _future(
        self, ref: JobRef, finish: Callable[[dict[str, Any]], dict[str, Any]] | None
    ) -> AsyncJobFuture:
        return AsyncJobFuture(self, ref, finish)
