"""`AsyncEZTinkerClient`: the asyncio twin of `EZTinkerClient` (`eztinker.client`), over the same
sans-I/O core (`eztinker.client_core`). Import both from `eztinker.client` (or `eztinker`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import httpx

from eztinker.client_core import (
    DEFAULT_BASE_URL,
    DEFAULT_MAX_RETRIES,
    DEFAULT_POLL_WAIT,
    DEFAULT_TIMEOUT,
    CustomLossFn,
    DatumLike,
    TokenIds,
    _archive_call,
    _Call,
    _ClientBase,
    _create_run_call,
    _custom_backward,
    _custom_datums,
    _FutureBase,
    _job_call,
    _load_call,
    _optim_call,
    _poll_wait,
    _read,
    _sample_call,
    _save_call,
    _seg,
    _train_call,
    _unpack_checkpoint,
    _with_custom_loss,
)
from eztinker.exceptions import JobTimeoutError
from eztinker.models.api import (
    Checkpoint,
    CheckpointRef,
    Health,
    Job,
    JobRef,
    QueueView,
    Run,
    RunMetrics,
    SampleOutput,
    SaveOutput,
    TokenDatum,
)
from eztinker.models.configs import LoRAConfig, LossFunctionConfig

__all__ = ["AsyncEZTinkerClient", "AsyncJobFuture"]


async def _pause(seconds: float) -> None:
    """`eztinker.client._async_sleep(seconds)`, looked up there when called (tests replace it)."""
    from eztinker import client

    await client._async_sleep(seconds)


class AsyncJobFuture(_FutureBase):
    """A job submitted by `AsyncEZTinkerClient`: `await fut.result()` (or `await fut`), `await fut.done()`."""

    def __init__(
        self,
        client: AsyncEZTinkerClient,
        ref: JobRef,
        finish: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(ref, finish)
        self._client = client

    async def done(self) -> bool:
        """True once the job has completed or failed. Asks the server once, without waiting, unless known."""
        if not self._known_done():
            self._update(await self._client.get_job(self.job_id))
        return self._known_done()

    async def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the job and return its result dict; `JobFailedError` if it failed (see `JobFuture.result`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._known_done():
            self._update(
                await self._client.get_job(self.job_id, wait=_poll_wait(deadline, self._client.poll_wait))
            )
            if not self._known_done() and deadline is not None and time.monotonic() >= deadline:
                raise JobTimeoutError(
                    f"job {self.job_id} ({self.op}) is still {self.status} after {timeout} s"
                )
        return self._outcome()

    def __await__(self) -> Generator[Any, None, dict[str, Any]]:
        return self.result().__await__()


class AsyncEZTinkerClient(_ClientBase):
    """The asyncio client: the same methods as `EZTinkerClient`, awaited; ops return `AsyncJobFuture`s.

    Use `async with`, or `await client.aclose()` when done.
    """

    def __init__(
        self,
        *,
        base_url: str | httpx.URL = DEFAULT_BASE_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        poll_wait: int = DEFAULT_POLL_WAIT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """As `EZTinkerClient`."""
        super().__init__(
            base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries, poll_wait=poll_wait
        )
        self._http = httpx.AsyncClient(
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

    # --- sending ---------------------------------------------------------------------------------------

    async def _send(self, call: _Call) -> Any:
        self._check_open()
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    call.method,
                    call.path,
                    json=call.json,
                    params=call.params,
                    timeout=self._timeout_for(call),
                )
            except httpx.TransportError as error:
                delay = self._retry_delay(call, attempt, error=error)
                if delay is None:
                    raise self._connection_error(error) from error
            else:
                delay = self._retry_delay(call, attempt, response=response)
                if delay is None:
                    return _read(response, call.raw)
            await _pause(delay)
            attempt += 1

    async def _submit(self, call: _Call) -> AsyncJobFuture:
        return AsyncJobFuture(self, JobRef.model_validate(await self._send(call)))

    # --- server and runs -------------------------------------------------------------------------------

    async def health(self) -> Health:
        return Health.model_validate(await self._send(_Call("GET", "/health")))

    async def create_run(
        self,
        base_model: str,
        lora_config: LoRAConfig | Mapping[str, Any] | None = None,
        loss_config: LossFunctionConfig | Mapping[str, Any] | None = None,
        run_id: str | None = None,
        from_checkpoint: CheckpointRef | Mapping[str, Any] | None = None,
        *,
        optimizer: Literal["adamw", "dimuon"] | None = None,
    ) -> str:
        call = _create_run_call(base_model, lora_config, loss_config, run_id, from_checkpoint, optimizer)
        return Run.model_validate(await self._send(call)).run_id

    async def get_run(self, run_id: str) -> Run:
        return Run.model_validate(await self._send(_Call("GET", f"/v1/runs/{_seg(run_id)}")))

    async def get_runs(self) -> list[Run]:
        return [Run.model_validate(run) for run in await self._send(_Call("GET", "/v1/runs"))]

    async def delete_run(self, run_id: str) -> None:
        await self._send(_Call("DELETE", f"/v1/runs/{_seg(run_id)}"))

    # --- training ----------------------------------------------------------------------------------------

    async def forward_backward(
        self,
        run_id: str,
        input_ids: TokenIds | Sequence[TokenIds] | None = None,
        target_ids: TokenIds | Sequence[TokenIds] | None = None,
        weights: Sequence[float] | Sequence[Sequence[float]] | None = None,
        *,
        data: Sequence[DatumLike] | None = None,
        loss_config: LossFunctionConfig | Mapping[str, Any] | None = None,
        loss_fn: str | None = None,
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> AsyncJobFuture:
        call = _train_call(
            "forward_backward",
            run_id,
            input_ids,
            target_ids,
            weights,
            data,
            loss_config,
            loss_fn,
            loss_fn_config,
        )
        return await self._submit(call)

    async def forward(
        self,
        run_id: str,
        input_ids: TokenIds | Sequence[TokenIds] | None = None,
        target_ids: TokenIds | Sequence[TokenIds] | None = None,
        weights: Sequence[float] | Sequence[Sequence[float]] | None = None,
        *,
        data: Sequence[DatumLike] | None = None,
        loss_config: LossFunctionConfig | Mapping[str, Any] | None = None,
        loss_fn: str | None = None,
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> AsyncJobFuture:
        call = _train_call(
            "forward", run_id, input_ids, target_ids, weights, data, loss_config, loss_fn, loss_fn_config
        )
        return await self._submit(call)

    async def forward_backward_custom(
        self, run_id: str, data: Sequence[TokenDatum | Mapping[str, Any]], loss_fn: CustomLossFn
    ) -> AsyncJobFuture:
        datums = _custom_datums(data)
        call = _train_call("forward", run_id, None, None, None, datums, None, "cross_entropy", None)
        forward = await (await self._submit(call)).result()
        weighted, loss, metrics = _custom_backward(data, datums, forward, loss_fn)
        call = _train_call(
            "forward_backward", run_id, None, None, None, weighted, None, "cross_entropy", None
        )
        return AsyncJobFuture(
            self, JobRef.model_validate(await self._send(call)), _with_custom_loss(loss, metrics)
        )

    async def optim_step(
        self,
        run_id: str,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.95,
        eps: float = 1e-12,
        grad_clip_norm: float = 0.0,
        *,
        damping: float | None = None,
        rank_lr_correction_exponent: float | None = None,
    ) -> AsyncJobFuture:
        call = _optim_call(
            run_id,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            grad_clip_norm=grad_clip_norm,
            damping=damping,
            rank_lr_correction_exponent=rank_lr_correction_exponent,
        )
        return await self._submit(call)

    # --- sampling ----------------------------------------------------------------------------------------

    async def sample(
        self,
        prompt: str | TokenIds,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        run_id: str | None = None,
        *,
        stop: str | Sequence[str] | Sequence[int] | None = None,
        seed: int | None = None,
        base_model: str | None = None,
    ) -> str:
        output = await self.generate(
            prompt,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            run_id,
            stop=stop,
            seed=seed,
            base_model=base_model,
        )
        return output.samples[0].text

    async def generate(
        self,
        prompt_or_tokens: str | TokenIds,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        run_id: str | None = None,
        *,
        n: int = 1,
        prompt_logprobs: bool = False,
        stop: str | Sequence[str] | Sequence[int] | None = None,
        seed: int | None = None,
        base_model: str | None = None,
    ) -> SampleOutput:
        call = _sample_call(
            prompt_or_tokens,
            run_id,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=stop,
            seed=seed,
            n=n,
            prompt_logprobs=prompt_logprobs,
            base_model=base_model,
        )
        return SampleOutput.model_validate(await (await self._submit(call)).result())

    # --- checkpoints -------------------------------------------------------------------------------------

    async def save_checkpoint(
        self, run_id: str, name: str, kind: Literal["state", "weights"] = "state"
    ) -> dict[str, Any]:
        result = await (await self._submit(_save_call(run_id, name, kind))).result()
        return SaveOutput.model_validate(result).model_dump()

    async def load_checkpoint(
        self, run_id: str, name: str, *, source_run_id: str | None = None, with_optimizer: bool = True
    ) -> Run:
        future = await self._submit(_load_call(run_id, name, source_run_id, with_optimizer))
        return Run.model_validate(await future.result())

    async def get_checkpoints(self, run_id: str) -> list[Checkpoint]:
        answer = await self._send(_Call("GET", f"/v1/runs/{_seg(run_id)}/checkpoints"))
        return [Checkpoint.model_validate(c) for c in answer]

    async def delete_checkpoint(self, run_id: str, name: str) -> None:
        await self._send(_Call("DELETE", f"/v1/runs/{_seg(run_id)}/checkpoints/{_seg(name)}"))

    async def download_checkpoint(self, run_id: str, name: str, dest: str | os.PathLike[str]) -> Path:
        """Download a checkpoint into the new directory `dest` (a PEFT adapter directory); returns it."""
        return _unpack_checkpoint(await self._send(_archive_call(run_id, name)), dest)

    # --- reading -----------------------------------------------------------------------------------------

    async def get_metrics(self, run_id: str) -> RunMetrics:
        return RunMetrics.model_validate(await self._send(_Call("GET", f"/v1/runs/{_seg(run_id)}/metrics")))

    async def get_job(self, job_id: str, wait: float = 0) -> Job:
        return Job.model_validate(await self._send(_job_call(job_id, wait)))

    async def get_queue(self) -> QueueView:
        return QueueView.model_validate(await self._send(_Call("GET", "/v1/queue")))
