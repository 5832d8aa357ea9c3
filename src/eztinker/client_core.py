"""The sans-I/O core of the native clients: requests described before they are sent (`_Call` and its
builders), plans, the futures' shared state, the retry policy and reading answers.

A plan is a generator that yields what to do and gets back what happened: a `_Call` to send once (it
gets the `httpx.Response`, or the transport error thrown in), or a `_Pause` to wait. Sending with retries
(`_ClientBase._request`), waiting for a job (`_FutureBase._wait`) and every operation of the API
(`eztinker.client_ops`) are plans, so `EZTinkerClient` (`eztinker.client`) and `AsyncEZTinkerClient`
(`eztinker.client_async`) only do the I/O: each runs a plan with its own `_drive`.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import quote

import httpx
import pydantic
from pydantic import BaseModel

from eztinker import __version__
from eztinker.exceptions import (
    APIConnectionError,
    APITimeoutError,
    ClientClosedError,
    EZTinkerError,
    InvalidRequestError,
    JobFailedError,
    JobTimeoutError,
    error_from_response,
    retry_after_seconds,
)
from eztinker.models.api import (
    CheckpointRef,
    CreateRunRequest,
    ForwardBackwardRequest,
    Job,
    JobRef,
    JobStatus,
    LoadRequest,
    NativeDatum,
    Op,
    OptimStepRequest,
    SampleRequest,
    SaveRequest,
    TokenDatum,
    field_path,
)
from eztinker.models.configs import LoRAConfig, LossFunctionConfig

if TYPE_CHECKING:
    import torch

DEFAULT_BASE_URL = "http://localhost:8000"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
DEFAULT_CREATE_RUN_TIMEOUT = 1800.0  # seconds to read create_run's answer: a first load downloads the model
DEFAULT_MAX_RETRIES = 3
DEFAULT_RETRY_DELAY = 0.5  # seconds before the first retry; doubles each time
DEFAULT_MAX_RETRY_DELAY = 30.0  # no wait between retries is longer, whatever Retry-After says
DEFAULT_POLL_WAIT = 30  # seconds one long-poll of a job may wait on the server
MAX_POLL_WAIT = 60  # the server's limit for `?wait=`
API_KEY_ENV = "EZTINKER_API_KEY"

_POLL_MARGIN = 10.0  # a long-poll's read timeout is its wait plus this
_TERMINAL = ("completed", "failed")

TokenIds = Sequence[int]
# A chat, `[{"role": "user", "content": "..."}, ...]`: the base model's chat template renders it.
Chat = Sequence[Mapping[str, str]]
DatumLike = NativeDatum | TokenDatum | Mapping[str, Any]
CustomLossFn = Callable[[list[Any], list["torch.Tensor"]], tuple["torch.Tensor", Mapping[str, Any]]]
"""`loss_fn(data, logprobs_list) -> (loss, metrics)` for `forward_backward_custom`."""


# --- requests, described before they are sent ----------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    """One HTTP request to send (once: retrying is the plan's business)."""

    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    read_timeout: float | None = None  # at least this long to read the answer (None: the client's timeout)
    raw: bool = False  # the answer is bytes (an archive), not JSON


@dataclass(frozen=True)
class _Pause:
    """Wait this many seconds before going on (the backoff between retries)."""

    seconds: float


R = TypeVar("R")
Plan = Generator[_Call | _Pause, Any, R]
"""What a plan yields (a `_Call` to send, a `_Pause`), what it is sent back (the response), and returns."""


@dataclass(frozen=True)
class _Done:
    """A plan has returned `value`."""

    value: Any


def _advance(plan: Plan[Any], outcome: Any) -> _Call | _Pause | _Done:
    """The plan's next step, given the outcome of the last: a response (or None) is sent in, a transport
    error thrown in."""
    try:
        return plan.throw(outcome) if isinstance(outcome, httpx.TransportError) else plan.send(outcome)
    except StopIteration as finished:
        return _Done(finished.value)


def _seg(value: str) -> str:
    """One path segment: run ids and checkpoint names are quoted, so no value can change the route.

    `.` and `..` are quoted too: httpx resolves them as dot-segments, so `delete_checkpoint(run, "..")`
    would otherwise send `DELETE /v1/runs/{run}` and delete the run itself."""
    quoted = quote(value, safe="")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


def _dump(schema: type[BaseModel], **fields: Any) -> dict[str, Any]:
    """Validate a body against its shared schema and serialise only what was given (None = not given)."""
    given = {name: value for name, value in fields.items() if value is not None}
    try:
        return schema(**given).model_dump(mode="json", exclude_unset=True)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        field = field_path(first["loc"])
        raise InvalidRequestError(first["msg"], field=field) from None


def _plain(value: Any) -> Any:
    """Arrays and tensors (and their scalars) as plain Python lists and numbers."""
    return value.tolist() if hasattr(value, "tolist") else value


def _is_seq(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def _as_batch(name: str, value: Any) -> list[list[Any]]:
    """One sequence `[1, 2, 3]` or a batch `[[1, 2], [3]]` (lists, tuples, arrays, tensors) as a batch."""
    value = _plain(value)
    if not _is_seq(value) or len(value) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of numbers, or a batch of them")
    items = [_plain(item) for item in value]
    nested = [_is_seq(item) for item in items]
    if all(nested):
        return [list(item) for item in items]
    if any(nested):
        raise ValueError(f"{name} mixes numbers and sequences: give one sequence, or a batch of sequences")
    return [items]


def _native_data(input_ids: Any, target_ids: Any, weights: Any) -> list[dict[str, Any]]:
    inputs = _as_batch("input_ids", input_ids)
    targets = inputs if target_ids is None else _as_batch("target_ids", target_ids)
    batch_weights = None if weights is None else _as_batch("weights", weights)
    for name, other in (("target_ids", targets), ("weights", batch_weights)):
        if other is not None and len(other) != len(inputs):
            raise ValueError(f"{name} has {len(other)} sequences but input_ids has {len(inputs)}")
    return [
        {"input_ids": ids, "target_ids": targets[i]}
        | ({} if batch_weights is None else {"weights": batch_weights[i]})
        for i, ids in enumerate(inputs)
    ]


def _train_call(
    op: Literal["forward_backward", "forward"],
    run_id: str,
    input_ids: Any,
    target_ids: Any,
    weights: Any,
    data: Sequence[DatumLike] | None,
    loss_config: LossFunctionConfig | Mapping[str, Any] | None,
    loss_fn: str | None,
    loss_fn_config: Mapping[str, float] | None,
) -> _Call:
    if data is None:
        if input_ids is None:
            raise TypeError(f"{op} needs input_ids (one sequence or a batch) or data (a list of datums)")
        data = _native_data(input_ids, target_ids, weights)
    elif input_ids is not None or target_ids is not None or weights is not None:
        raise TypeError(f"{op} takes either data or input_ids/target_ids/weights, not both")
    body = _dump(
        ForwardBackwardRequest,
        data=list(data),
        loss_config=loss_config,
        loss_fn=loss_fn,
        loss_fn_config=loss_fn_config,
    )
    return _Call("POST", f"/v1/runs/{_seg(run_id)}/{op}", json=body)


def _create_run_call(
    base_model: str,
    lora_config: LoRAConfig | Mapping[str, Any] | None,
    loss_config: LossFunctionConfig | Mapping[str, Any] | None,
    run_id: str | None,
    from_checkpoint: CheckpointRef | Mapping[str, Any] | None,
    optimizer: Literal["adamw", "dimuon"] | None = None,
) -> _Call:
    body = _dump(
        CreateRunRequest,
        base_model=base_model,
        lora_config=lora_config,
        loss_config=loss_config,
        run_id=run_id,
        from_checkpoint=from_checkpoint,
        optimizer=optimizer,
    )
    return _Call("POST", "/v1/runs", json=body, read_timeout=DEFAULT_CREATE_RUN_TIMEOUT)


def _optim_call(run_id: str, **params: float | None) -> _Call:
    return _Call("POST", f"/v1/runs/{_seg(run_id)}/optim_step", json=_dump(OptimStepRequest, **params))


def _sample_call(prompt: str | TokenIds | Chat, run_id: str | None, **params: Any) -> _Call:
    """A text prompt, token ids, or a chat (a sequence of role/content mappings)."""
    prompt = _plain(prompt)
    if isinstance(prompt, str):
        params["prompt"] = prompt
    elif _is_seq(prompt) and prompt and all(isinstance(turn, Mapping) for turn in prompt):
        params["messages"] = [dict(turn) for turn in prompt]
    else:
        params["prompt_tokens"] = list(prompt)
    if _is_seq(params.get("stop")):  # a tuple of stop strings or token ids travels as a list
        params["stop"] = list(params["stop"])
    body = _dump(SampleRequest, **params)
    return _Call("POST", "/v1/sample" if run_id is None else f"/v1/runs/{_seg(run_id)}/sample", json=body)


def _save_call(run_id: str, name: str, kind: Literal["state", "weights"]) -> _Call:
    return _Call("POST", f"/v1/runs/{_seg(run_id)}/save", json=_dump(SaveRequest, name=name, kind=kind))


def _load_call(run_id: str, name: str, source_run_id: str | None, with_optimizer: bool) -> _Call:
    body = _dump(LoadRequest, name=name, source_run_id=source_run_id, with_optimizer=with_optimizer)
    return _Call("POST", f"/v1/runs/{_seg(run_id)}/load", json=body)


def _archive_call(run_id: str, name: str) -> _Call:
    path = f"/v1/runs/{_seg(run_id)}/checkpoints/{_seg(name)}/archive"
    return _Call("GET", path, read_timeout=600.0, raw=True)


def _unpack_checkpoint(archive: bytes, dest: str | os.PathLike[str]) -> Path:
    """Extract a checkpoint archive (one top-level folder) so that its files land directly in `dest`."""
    import io
    import shutil
    import tarfile
    import tempfile

    target = Path(dest)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty")
    with tempfile.TemporaryDirectory(dir=target.parent if target.parent.exists() else None) as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            tar.extractall(tmp, filter="data")  # "data": no absolute paths, links out, or devices
        [folder] = [p for p in Path(tmp).iterdir() if p.is_dir()]
        target.mkdir(parents=True, exist_ok=True)
        for item in folder.iterdir():
            shutil.move(str(item), target / item.name)
    return target


def _job_call(job_id: str, wait: float) -> _Call:
    if not 0 <= wait <= MAX_POLL_WAIT:
        raise ValueError(f"wait must be between 0 and {MAX_POLL_WAIT} seconds, not {wait}")
    return _Call("GET", f"/v1/jobs/{_seg(job_id)}", params={"wait": wait}, read_timeout=wait + _POLL_MARGIN)


def _poll_wait(deadline: float | None, poll_wait: int) -> int:
    """Whole seconds for the next long-poll: `poll_wait`, or what is left before `deadline`."""
    if deadline is None:
        return poll_wait
    return max(0, min(poll_wait, math.ceil(deadline - time.monotonic())))


# --- futures -------------------------------------------------------------------------------------------


class _FutureBase(Mapping[str, Any]):
    """A submitted job: a read-only mapping over its `JobRef` (`job_id`, `status`, `run_id`, `op`).

    `status` is the status last seen; it changes only when the future asks the server (`done`, `result`).
    """

    def __init__(
        self,
        client: _ClientBase,
        ref: JobRef,
        finish: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self._client = client
        self._ref = ref
        self._job: Job | None = None
        self._finish = finish
        self._result: dict[str, Any] | None = None

    @property
    def job_id(self) -> str:
        return self._ref.job_id

    @property
    def status(self) -> JobStatus:
        return self._ref.status

    @property
    def op(self) -> Op:
        return self._ref.op

    @property
    def run_id(self) -> str | None:
        return self._ref.run_id

    @property
    def job(self) -> Job | None:
        """The last `Job` fetched from the server (None until the future has asked)."""
        return self._job

    def __getitem__(self, key: str) -> Any:
        return self._ref.model_dump()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ref.model_dump())

    def __len__(self) -> int:
        return len(self._ref.model_dump())

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in self.items())
        return f"{type(self).__name__}({fields})"

    def _known_done(self) -> bool:
        return self._job is not None and self._job.status in _TERMINAL

    def _update(self, job: Job) -> None:
        self._job = job
        self._ref = JobRef(job_id=job.job_id, status=job.status, run_id=job.run_id, op=job.op)

    def _poll(self, wait: float) -> Plan[None]:
        answer = yield from self._client._request(_job_call(self.job_id, wait))
        self._update(Job.model_validate(answer))

    def _done(self) -> Plan[bool]:
        """True once the job has completed or failed. Asks the server once, without waiting, unless known."""
        if not self._known_done():
            yield from self._poll(0)
        return self._known_done()

    def _wait(self, timeout: float | None) -> Plan[dict[str, Any]]:
        """Long-poll until the job is done; its result dict, or `JobFailedError` if it failed.

        `timeout` (seconds, to within one) raises `JobTimeoutError` first; the job goes on running.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._known_done():
            yield from self._poll(_poll_wait(deadline, self._client.poll_wait))
            if not self._known_done() and deadline is not None and time.monotonic() >= deadline:
                raise JobTimeoutError(
                    f"job {self.job_id} ({self.op}) is still {self.status} after {timeout} s"
                )
        return self._outcome()

    def _outcome(self) -> dict[str, Any]:
        """The result of a finished job, or `JobFailedError`."""
        assert self._job is not None and self._job.status in _TERMINAL, self._job
        if self._job.status == "failed":
            raise JobFailedError(self._job)
        if self._result is None:
            result = dict(self._job.result or {})
            self._result = self._finish(result) if self._finish is not None else result
        return self._result


# --- clients -------------------------------------------------------------------------------------------


class _ClientBase:
    """What both clients share: configuration, headers, and sending with retries, submitting jobs and
    reading answers (as plans). A client adds its connection (`_connect`), its futures (`_future`), and
    how it runs a plan (`_drive`, `_method`)."""

    def __init__(
        self,
        *,
        base_url: str | httpx.URL = DEFAULT_BASE_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        poll_wait: int = DEFAULT_POLL_WAIT,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`api_key` defaults to the EZTINKER_API_KEY environment variable; `transport` replaces the network
        (tests pass an `httpx.MockTransport`)."""
        if max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, not {max_retries}")
        if not 0 < poll_wait <= MAX_POLL_WAIT:
            raise ValueError(f"poll_wait must be between 1 and {MAX_POLL_WAIT} seconds, not {poll_wait}")
        if api_key is None:
            api_key = os.environ.get(API_KEY_ENV) or None  # read once, here, never mid-request
        self.base_url = _server_url(base_url)
        self.max_retries = max_retries
        self.poll_wait = poll_wait
        self.timeout = httpx.Timeout(timeout)
        self._headers = {"User-Agent": f"eztinker-python/{__version__}", "Accept": "application/json"}
        if api_key:
            self._headers["X-API-Key"] = api_key
        self._closed = False
        self._http = self._connect(transport)

    def _connect(self, transport: Any) -> Any:
        """The client's `httpx.Client` (or `httpx.AsyncClient`) over `transport`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={str(self.base_url)!r})"

    @property
    def is_closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            name = type(self).__name__
            raise ClientClosedError(
                f"This client has been closed; create a new {name} to make more requests."
            )

    def _future(self, ref: JobRef, finish: Callable[[dict[str, Any]], dict[str, Any]] | None) -> _FutureBase:
        raise NotImplementedError

    def _request(self, call: _Call) -> Plan[Any]:
        """Send `call`, retrying as the policy allows (`_retry_delay`); the answer's JSON (bytes if raw)."""
        self._check_open()
        attempt = 0
        while True:
            try:
                response = yield call
            except httpx.TransportError as error:
                delay = self._retry_delay(call, attempt, error=error)
                if delay is None:
                    raise self._connection_error(error) from error
            else:
                delay = self._retry_delay(call, attempt, response=response)
                if delay is None:
                    return _read(response, call.raw)
            yield _Pause(delay)
            attempt += 1

    def _submit(
        self, call: _Call, finish: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    ) -> Plan[_FutureBase]:
        """Submit a job: the client's future for it, at once."""
        return self._future(JobRef.model_validate((yield from self._request(call))), finish)

    def _build(self, call: _Call) -> httpx.Request:
        """The `httpx.Request` of `call` (building one does no I/O: `Client.request` is build, then send)."""
        return self._http.build_request(
            call.method, call.path, json=call.json, params=call.params, timeout=self._timeout_for(call)
        )

    def _timeout_for(self, call: _Call) -> httpx.Timeout:
        read = self.timeout.read
        if call.read_timeout is not None and read is not None:
            read = max(read, call.read_timeout)
        return httpx.Timeout(
            connect=self.timeout.connect, read=read, write=self.timeout.write, pool=self.timeout.pool
        )

    def _retry_delay(
        self,
        call: _Call,
        attempt: int,
        *,
        response: httpx.Response | None = None,
        error: Exception | None = None,
    ) -> float | None:
        """Seconds to wait before re-sending `call`, or None to give up (attempt counts from 0)."""
        if attempt >= self.max_retries:
            return None
        retry_after = None
        if response is not None:
            if response.status_code != 429:
                return None
            retry_after = retry_after_seconds(response)
        elif not _safe_to_resend(call.method, error):
            return None
        if retry_after is not None:
            return min(retry_after, DEFAULT_MAX_RETRY_DELAY)
        backoff = min(DEFAULT_RETRY_DELAY * 2**attempt, DEFAULT_MAX_RETRY_DELAY)
        return backoff * random.uniform(0.75, 1.0)  # noqa: S311  (jitter spreads out many clients' retries)

    def _connection_error(self, error: httpx.TransportError) -> APIConnectionError:
        request = _request_of(error)
        if isinstance(error, httpx.TimeoutException):
            message = (
                f"no answer from the EZTinker server at {self.base_url} in time ({type(error).__name__})"
            )
            return APITimeoutError(message, request=request)
        return APIConnectionError(
            f"could not reach the EZTinker server at {self.base_url} ({type(error).__name__}: {error}); "
            "is it running (`eztinker server`)?",
            request=request,
        )


def _server_url(base_url: str | httpx.URL) -> httpx.URL:
    """The server's URL; one without `http://` or `https://` is refused here, saying so, rather than
    failing every request as a server that cannot be reached."""
    text = str(base_url)
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        example = f"http://{text}" if text and "://" not in text else DEFAULT_BASE_URL
        raise ValueError(f"base_url {text!r} is not an http:// or https:// URL; give one such as {example}")
    return url


def _safe_to_resend(method: str, error: Exception | None) -> bool:
    """A GET can always be re-sent; another method only if the request cannot have reached the server."""
    if not isinstance(error, httpx.TransportError):
        return False
    return method == "GET" or isinstance(error, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


def _request_of(error: httpx.TransportError) -> httpx.Request | None:
    try:
        return error.request
    except RuntimeError:  # httpx raises when the error was never tied to a request
        return None


def _read(response: httpx.Response, raw: bool = False) -> Any:
    """The JSON of a successful answer (None for 204; bytes if `raw`), or the `APIStatusError` for an error."""
    if response.is_error:
        raise error_from_response(response)
    if raw:
        return response.content
    if response.status_code == 204 or not response.content:
        return None
    try:
        return response.json()
    except ValueError as exc:
        raise EZTinkerError(
            f"the server answered {response.status_code} with a body that is not JSON", response=response
        ) from exc
