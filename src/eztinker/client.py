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
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

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


class JobFuture(_FutureBase):
    """A job submitted by `EZTinkerClient`. `fut["job_id"]`, `fut.status`, `fut.done()`, `fut.result()`."""

    def __init__(
        self,
        client: EZTinkerClient,
        ref: JobRef,
        finish: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(ref, finish)
        self._client = client

    def done(self) -> bool:
        """True once the job has completed or failed. Asks the server once, without waiting, unless known."""
        if not self._known_done():
            self._update(self._client.get_job(self.job_id))
        return self._known_done()

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the job and return its result dict; `JobFailedError` if it failed.

        `timeout` (seconds, to within one) raises `JobTimeoutError` first; the job goes on running.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._known_done():
            self._update(self._client.get_job(self.job_id, wait=_poll_wait(deadline, self._client.poll_wait)))
            if not self._known_done() and deadline is not None and time.monotonic() >= deadline:
                raise JobTimeoutError(
                    f"job {self.job_id} ({self.op}) is still {self.status} after {timeout} s"
                )
        return self._outcome()


class EZTinkerClient(_ClientBase):
    """A synchronous client. Use it as a context manager, or call `close()` when done.

    Thread-safe: several threads may submit ops and wait on futures through one client.
    """

    def __init__(
        self,
        *,
        base_url: str | httpx.URL = DEFAULT_BASE_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        poll_wait: int = DEFAULT_POLL_WAIT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """`api_key` defaults to the EZTINKER_API_KEY environment variable; `transport` replaces the network
        (tests pass an `httpx.MockTransport`)."""
        super().__init__(
            base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries, poll_wait=poll_wait
        )
        self._http = httpx.Client(
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

    # --- sending ---------------------------------------------------------------------------------------

    def _send(self, call: _Call) -> Any:
        self._check_open()
        attempt = 0
        while True:
            try:
                response = self._http.request(
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
            _sleep(delay)
            attempt += 1

    def _submit(self, call: _Call) -> JobFuture:
        return JobFuture(self, JobRef.model_validate(self._send(call)))

    # --- server and runs -------------------------------------------------------------------------------

    def health(self) -> Health:
        """The server's version, device, loaded base models and queue depth."""
        return Health.model_validate(self._send(_Call("GET", "/health")))

    def create_run(
        self,
        base_model: str,
        lora_config: LoRAConfig | Mapping[str, Any] | None = None,
        loss_config: LossFunctionConfig | Mapping[str, Any] | None = None,
        run_id: str | None = None,
        from_checkpoint: CheckpointRef | Mapping[str, Any] | None = None,
        *,
        optimizer: Literal["adamw", "dimuon"] | None = None,
    ) -> str:
        """Create a LoRA training run and return its id. Waits while the server loads `base_model` the first
        time (up to DEFAULT_CREATE_RUN_TIMEOUT). `from_checkpoint={"run_id": ..., "name": ...}` starts from a
        saved checkpoint (add `"with_optimizer": False` for its weights only). `optimizer` ("adamw", the
        default, or "dimuon") is fixed for the run's life; `optim_step` then takes its settings."""
        call = _create_run_call(base_model, lora_config, loss_config, run_id, from_checkpoint, optimizer)
        return Run.model_validate(self._send(call)).run_id

    def get_run(self, run_id: str) -> Run:
        return Run.model_validate(self._send(_Call("GET", f"/v1/runs/{_seg(run_id)}")))

    def get_runs(self) -> list[Run]:
        return [Run.model_validate(run) for run in self._send(_Call("GET", "/v1/runs"))]

    def delete_run(self, run_id: str) -> None:
        """Free the run's adapter on the server. Its checkpoints stay until deleted."""
        self._send(_Call("DELETE", f"/v1/runs/{_seg(run_id)}"))

    # --- training ----------------------------------------------------------------------------------------

    def forward_backward(
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
    ) -> JobFuture:
        """Accumulate gradients for one sequence or a batch; the result is `{loss, logprobs, metrics}`.

        `input_ids` is one sequence or a batch; `target_ids` (aligned labels, -100 ignored) defaults to
        `input_ids`. The run's loss applies unless `loss_config` overrides it. Or pass `data`: prebuilt
        NativeDatum dicts, or TokenDatum dicts `{tokens, loss_inputs}` with a Tinker `loss_fn`.
        """
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
        return self._submit(call)

    def forward(
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
    ) -> JobFuture:
        """As `forward_backward`, without the backward pass: loss and logprobs only, no gradients."""
        call = _train_call(
            "forward", run_id, input_ids, target_ids, weights, data, loss_config, loss_fn, loss_fn_config
        )
        return self._submit(call)

    def forward_backward_custom(
        self, run_id: str, data: Sequence[TokenDatum | Mapping[str, Any]], loss_fn: CustomLossFn
    ) -> JobFuture:
        """Train on a loss computed here, in torch: `loss_fn(data, logprobs_list) -> (loss, metrics)`.

        Runs `forward` (cross_entropy) for each datum's target-token logprobs, calls `loss_fn` on them as
        tensors requiring grad, and submits `forward_backward` with cross_entropy weights −dloss/dlogprob,
        whose gradient on the server equals the custom loss's. Waits for the forward pass; the returned
        future's result carries `loss_fn`'s loss and metrics. Needs torch on the client.
        """
        datums = _custom_datums(data)
        forward = self._submit(
            _train_call("forward", run_id, None, None, None, datums, None, "cross_entropy", None)
        )
        weighted, loss, metrics = _custom_backward(data, datums, forward.result(), loss_fn)
        call = _train_call(
            "forward_backward", run_id, None, None, None, weighted, None, "cross_entropy", None
        )
        return JobFuture(self, JobRef.model_validate(self._send(call)), _with_custom_loss(loss, metrics))

    def optim_step(
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
    ) -> JobFuture:
        """One step of the run's optimizer on the accumulated gradients; the result is `{step, grad_norm,
        learning_rate}`. AdamW uses the six positional settings; Dimuon uses `learning_rate`, `beta1`,
        `grad_clip_norm`, `damping` and `rank_lr_correction_exponent` (None: Tinker's defaults)."""
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
        return self._submit(call)

    # --- sampling ----------------------------------------------------------------------------------------

    def sample(
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
        """Generate from `run_id`'s adapter (or a base model when None), wait, and return the text."""
        output = self.generate(
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

    def generate(
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
        """As `sample`, returning all `n` samples with their tokens and logprobs (and the prompt's, if asked)."""
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
        return SampleOutput.model_validate(self._submit(call).result())

    # --- checkpoints -------------------------------------------------------------------------------------

    def save_checkpoint(
        self, run_id: str, name: str, kind: Literal["state", "weights"] = "state"
    ) -> dict[str, Any]:
        """Save the adapter (and, for kind "state", the optimizer and step); wait and return
        `{"status": "completed", "name", "step", "adapter_path", "optimizer_path"}`."""
        return SaveOutput.model_validate(self._submit(_save_call(run_id, name, kind)).result()).model_dump()

    def load_checkpoint(
        self, run_id: str, name: str, *, source_run_id: str | None = None, with_optimizer: bool = True
    ) -> Run:
        """Load a checkpoint (this run's, or `source_run_id`'s) into the run, wait, and return the run.
        Also how a run `lost` in a server restart resumes."""
        return Run.model_validate(
            self._submit(_load_call(run_id, name, source_run_id, with_optimizer)).result()
        )

    def get_checkpoints(self, run_id: str) -> list[Checkpoint]:
        return [
            Checkpoint.model_validate(c)
            for c in self._send(_Call("GET", f"/v1/runs/{_seg(run_id)}/checkpoints"))
        ]

    def delete_checkpoint(self, run_id: str, name: str) -> None:
        self._send(_Call("DELETE", f"/v1/runs/{_seg(run_id)}/checkpoints/{_seg(name)}"))

    def download_checkpoint(self, run_id: str, name: str, dest: str | os.PathLike[str]) -> Path:
        """Download a checkpoint into the new directory `dest` (a PEFT adapter directory); returns it."""
        return _unpack_checkpoint(self._send(_archive_call(run_id, name)), dest)

    # --- reading -----------------------------------------------------------------------------------------

    def get_metrics(self, run_id: str) -> RunMetrics:
        """The run's history: loss, learning rate, grad norm and tokens per optimizer step."""
        return RunMetrics.model_validate(self._send(_Call("GET", f"/v1/runs/{_seg(run_id)}/metrics")))

    def get_job(self, job_id: str, wait: float = 0) -> Job:
        """A job's state; with `wait` (up to MAX_POLL_WAIT seconds) the server answers once it finishes."""
        return Job.model_validate(self._send(_job_call(job_id, wait)))

    def get_queue(self) -> QueueView:
        """Running and queued jobs (yours, when the server uses API keys) in start order, with each one's
        position and estimated start, and the scheduler's utilisation and throughput."""
        return QueueView.model_validate(self._send(_Call("GET", "/v1/queue")))
