"""Clients for EZTinker's native REST API: `EZTinkerClient` (sync) and `AsyncEZTinkerClient` (asyncio).

```python
from eztinker.client import EZTinkerClient, LossFunctionConfig

with EZTinkerClient(base_url="http://localhost:8000") as client:
    run_id = client.create_run(base_model="gpt2", lora_config={"r": 8})
    for step in range(10):
        client.forward_backward(run_id, input_ids=input_ids)            # a JobFuture: nothing waits
        optim = client.optim_step(run_id, learning_rate=2e-4)
    print(optim.result())                 # {"step": 10, "grad_norm": ..., "learning_rate": 0.0002}
    client.save_checkpoint(run_id, name="checkpoint_v1")  # {"status": "completed", "adapter_path": ...}
```

Every op answers at once with a `JobFuture`: the server runs one run's jobs in the order they were
submitted, so a loop can submit forward_backward and optim_step without waiting and read a result only
when it needs one. `JobFuture.result()` long-polls `GET /v1/jobs/{id}?wait=...`. `sample`, `generate`,
`save_checkpoint` and `load_checkpoint` wait for their own result.

Request bodies are built with the schemas in `eztinker.models.api`, so a malformed argument fails here,
before anything is sent, and only the fields the caller gave travel (the server fills in its defaults).

Retries: a 429 (honouring `Retry-After`), and a connection failure that cannot have reached the server,
are retried up to `max_retries` times with exponential backoff. A POST that may have reached the server
(a read timeout) is never re-sent: submitting forward_backward twice would double the gradients.

Errors: see `eztinker.exceptions` — one tree, rooted at `EZTinkerError`.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from eztinker.client_async import AsyncEZTinkerClient, AsyncJobFuture
from eztinker.client_core import (
    API_KEY_ENV,
    DEFAULT_BASE_URL,
    DEFAULT_CREATE_RUN_TIMEOUT,
    DEFAULT_MAX_RETRIES,
    DEFAULT_MAX_RETRY_DELAY,
    DEFAULT_POLL_WAIT,
    DEFAULT_RETRY_DELAY,
    DEFAULT_TIMEOUT,
    MAX_POLL_WAIT,
    CustomLossFn,
    Plan,
    _advance,
    _ClientBase,
    _Done,
    _FutureBase,
    _Pause,
)
from eztinker.client_ops import _Operations
from eztinker.models.api import JobRef
from eztinker.models.configs import LoRAConfig, LossFunctionConfig

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_BASE_URL",
    "DEFAULT_CREATE_RUN_TIMEOUT",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_MAX_RETRY_DELAY",
    "DEFAULT_POLL_WAIT",
    "DEFAULT_RETRY_DELAY",
    "DEFAULT_TIMEOUT",
    "MAX_POLL_WAIT",
    "AsyncEZTinkerClient",
    "AsyncJobFuture",
    "CustomLossFn",
    "EZTinkerClient",
    "JobFuture",
    "LoRAConfig",
    "LossFunctionConfig",
]

_sleep = time.sleep  # module-level so that tests can skip the waiting
_async_sleep = asyncio.sleep  # (what `AsyncEZTinkerClient` waits with)

R = TypeVar("R")


class JobFuture(_FutureBase):
    """A job submitted by `EZTinkerClient`. `fut["job_id"]`, `fut.status`, `fut.done()`, `fut.result()`."""

    _client: EZTinkerClient

    def done(self) -> bool:
        """True once the job has completed or failed. Asks the server once, without waiting, unless known."""
        return self._client._drive(self._done())

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the job and return its result dict; `JobFailedError` if it failed.

        `timeout` (seconds, to within one) raises `JobTimeoutError` first; the job goes on running.
        """
        return self._client._drive(self._wait(timeout))


class EZTinkerClient(_ClientBase, _Operations):
    """A synchronous client. Use it as a context manager, or call `close()` when done.

    Thread-safe: several threads may submit ops and wait on futures through one client. Its methods are
    the operations of `eztinker.client_ops`, each documented there.
    """

    def _connect(self, transport: httpx.BaseTransport | None) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, headers=self._headers, timeout=self.timeout, transport=transport
        )

    # --- life cycle ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connections. Calling it again does nothing; any other call afterwards raises."""
        if not self._closed:
            self._closed = True
            self._http.close()

    def __enter__(self) -> Self:
        self._check_open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- I/O: running a plan -----------------------------------------------------------------------------

    def _drive(self, plan: Plan[R]) -> R:
        """Run `plan`: send each request it yields and hand it the response (or throw in the transport
        error), sleep through each pause, and return what it returns."""
        outcome: Any = None
        while not isinstance(step := _advance(plan, outcome), _Done):
            outcome = None
            if isinstance(step, _Pause):
                _sleep(step.seconds)
            else:
                try:
                    outcome = self._http.send(self._build(step))
                except httpx.TransportError as error:
                    outcome = error
        return step.value

    @staticmethod
    def _method(plan: Callable[..., Plan[R]]) -> Callable[..., R]:
        """An operation's plan as a method that runs it (`client_ops._Method`)."""

        @functools.wraps(plan)
        def run(client: EZTinkerClient, *args: Any, **kwargs: Any) -> R:
            return client._drive(plan(client, *args, **kwargs))

        return run

    def _future(self, ref: JobRef, finish: Callable[[dict[str, Any]], dict[str, Any]] | None) -> JobFuture:
        return JobFuture(self, ref, finish)
