"""The native API's operations, written once for both clients: each is a plan (`client_core.Plan`) that
builds its request, yields it, and reads the answer into its result.

`EZTinkerClient` (`eztinker.client`) runs a plan with blocking I/O and `AsyncEZTinkerClient`
(`eztinker.client_async`) with asyncio; both expose every function here as a method of the same name,
signature and documentation (`client.forward_backward(run_id, ...)`, or `await ...` on the async client).
Ops that submit a job answer with the client's future (`JobFuture` / `AsyncJobFuture`) at once; `sample`,
`generate`, `save_checkpoint` and `load_checkpoint` wait for their own result.
"""

from __future__ import annotations

import inspect
import os
import types
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, Generic, Literal, ParamSpec, Self, TypeVar, overload

from eztinker.client_core import (
    Chat,
    CustomLossFn,
    DatumLike,
    Plan,
    TokenIds,
    _archive_call,
    _Call,
    _ClientBase,
    _create_run_call,
    _FutureBase,
    _job_call,
    _load_call,
    _optim_call,
    _sample_call,
    _save_call,
    _seg,
    _train_call,
    _unpack_checkpoint,
)
from eztinker.exceptions import EZTinkerError
from eztinker.models.api import (
    Checkpoint,
    CheckpointRef,
    Health,
    Job,
    QueueView,
    Run,
    RunMetrics,
    SampleOutput,
    SaveOutput,
    TokenDatum,
)
from eztinker.models.configs import LoRAConfig, LossFunctionConfig

if TYPE_CHECKING:
    from eztinker.client import EZTinkerClient, JobFuture
    from eztinker.client_async import AsyncEZTinkerClient, AsyncJobFuture

P = ParamSpec("P")
TrainOp = Literal["forward_backward", "forward"]

# --- server and runs -------------------------------------------------------------------------------


def health(client: _ClientBase) -> Plan[Health]:
    """The server's version, device, loaded base models and queue depth."""
    return Health.model_validate((yield from client._request(_Call("GET", "/health"))))


def create_run(
    client: _ClientBase,
    base_model: str,
    lora_config: LoRAConfig | Mapping[str, Any] | None = None,
    loss_config: LossFunctionConfig | Mapping[str, Any] | None = None,
    run_id: str | None = None,
    from_checkpoint: CheckpointRef | Mapping[str, Any] | None = None,
    *,
    optimizer: Literal["adamw", "dimuon"] | None = None,
) -> Plan[str]:
    """Create a LoRA training run and return its id. Waits while the server loads `base_model` the first
    time (up to DEFAULT_CREATE_RUN_TIMEOUT). `from_checkpoint={"run_id": ..., "name": ...}` starts from a
    saved checkpoint (add `"with_optimizer": False` for its weights only). `optimizer` ("adamw", the
    default, or "dimuon") is fixed for the run's life; `optim_step` then takes its settings."""
    call = _create_run_call(base_model, lora_config, loss_config, run_id, from_checkpoint, optimizer)
    return Run.model_validate((yield from client._request(call))).run_id


def get_run(client: _ClientBase, run_id: str) -> Plan[Run]:
    return Run.model_validate((yield from client._request(_Call("GET", f"/v1/runs/{_seg(run_id)}"))))


def get_runs(client: _ClientBase) -> Plan[list[Run]]:
    return [Run.model_validate(run) for run in (yield from client._request(_Call("GET", "/v1/runs")))]


def delete_run(client: _ClientBase, run_id: str) -> Plan[None]:
    """Delete the run: its adapter, its checkpoints (files, records, publication) and its metrics. Copies
    made of its checkpoints with `copy_weights` stay: their files are their own."""
    yield from client._request(_Call("DELETE", f"/v1/runs/{_seg(run_id)}"))


# --- training ----------------------------------------------------------------------------------------


def _training(
    client: _ClientBase,
    op: TrainOp,
    run_id: str,
    input_ids: TokenIds | Sequence[TokenIds] | None = None,
    target_ids: TokenIds | Sequence[TokenIds] | None = None,
    weights: Sequence[float] | Sequence[Sequence[float]] | None = None,
    *,
    data: Sequence[DatumLike] | None = None,
    loss_config: LossFunctionConfig | Mapping[str, Any] | None = None,
    loss_fn: str | None = None,
    loss_fn_config: Mapping[str, float] | None = None,
) -> Plan[_FutureBase]:
    """`forward_backward` or `forward` (`op`): the same arguments, one route each."""
    call = _train_call(op, run_id, input_ids, target_ids, weights, data, loss_config, loss_fn, loss_fn_config)
    return (yield from client._submit(call))


def _with_op(
    plan: Callable[Concatenate[_ClientBase, TrainOp, P], Plan[R]], op: TrainOp, doc: str
) -> Callable[Concatenate[_ClientBase, P], Plan[R]]:
    """`plan` with its `op` argument given: named, documented and signed as that op."""

    def op_plan(client: _ClientBase, *args: P.args, **kwargs: P.kwargs) -> Plan[R]:
        return plan(client, op, *args, **kwargs)

    signature = inspect.signature(plan)
    client, _, *rest = signature.parameters.values()
    op_plan.__signature__ = signature.replace(parameters=[client, *rest])  # ty: ignore[missing-attribute]
    op_plan.__name__ = op_plan.__qualname__ = op
    op_plan.__doc__ = doc
    return op_plan


forward_backward = _with_op(
    _training,
    "forward_backward",
    """Accumulate gradients for one sequence or a batch; the result is `{loss, logprobs, metrics}`.

    `input_ids` is one sequence or a batch; `target_ids` (aligned labels, -100 ignored) defaults to
    `input_ids`. The run's loss applies unless `loss_config` overrides it. Or pass `data`: prebuilt
    NativeDatum dicts, or TokenDatum dicts `{tokens, loss_inputs}` with a Tinker `loss_fn`.
    """,
)
forward = _with_op(
    _training,
    "forward",
    """As `forward_backward`, without the backward pass: loss and logprobs only, no gradients.""",
)


# forward_backward_custom: the loss is computed here, its gradient travels as weights


def _custom_datums(data: Sequence[TokenDatum | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each datum as `{tokens, loss_inputs: {target_tokens}}`: the only inputs the cross_entropy passes need."""
    datums = []
    for i, datum in enumerate(data):
        raw = datum.model_dump() if isinstance(datum, TokenDatum) else datum
        try:
            datums.append(
                {
                    "tokens": list(raw["tokens"]),
                    "loss_inputs": {"target_tokens": raw["loss_inputs"]["target_tokens"]},
                }
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"forward_backward_custom: data[{i}] must be a token datum "
                "{'tokens': [...], 'loss_inputs': {'target_tokens': [...]}}"
            ) from exc
    if not datums:
        raise ValueError("forward_backward_custom needs at least one datum")
    return datums


def _custom_backward(
    data: Sequence[Any], datums: list[dict[str, Any]], forward: dict[str, Any], loss_fn: CustomLossFn
) -> tuple[list[dict[str, Any]], float, dict[str, float]]:
    """Run `loss_fn` on the forward pass's logprobs; return the cross_entropy data whose weights are −dC/dlp."""
    import torch

    from eztinker.engine.losses import weights_from_logprob_grads

    if len(forward["logprobs"]) != len(datums):
        raise EZTinkerError(
            f"the forward pass returned {len(forward['logprobs'])} logprobs for {len(datums)} datums"
        )
    logprobs = [
        torch.tensor(lp[: len(d["loss_inputs"]["target_tokens"])], dtype=torch.float32, requires_grad=True)
        for lp, d in zip(forward["logprobs"], datums, strict=True)
    ]
    returned = loss_fn(list(data), logprobs)
    loss, metrics = returned if isinstance(returned, tuple) and len(returned) == 2 else (None, None)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError(
            "loss_fn must return (loss, metrics) with loss a scalar tensor computed from the logprobs"
        )
    metrics = _custom_metrics(metrics)
    if not torch.isfinite(loss.detach()).all():  # its gradient would be too: nothing is sent
        raise ValueError(
            f"loss_fn's loss is {float(loss.detach())}; nothing was sent and the run is unchanged"
        )
    loss.backward()
    grads = [lp.grad for lp in logprobs if lp.grad is not None]
    if not all(torch.isfinite(g).all() for g in grads):
        raise ValueError("loss_fn's gradient has NaN or infinity; nothing was sent and the run is unchanged")
    weighted = [
        {
            "tokens": d["tokens"],
            "loss_inputs": {
                "target_tokens": d["loss_inputs"]["target_tokens"],
                "weights": weights_from_logprob_grads(
                    lp.grad if lp.grad is not None else torch.zeros_like(lp)
                ).tolist(),
            },
        }
        for d, lp in zip(datums, logprobs, strict=True)
    ]
    return weighted, float(loss.detach()), metrics


def _custom_metrics(metrics: Any) -> dict[str, float]:
    """`loss_fn`'s metrics as names -> floats; anything else is the loss function's mistake, named."""
    if not isinstance(metrics, Mapping):
        raise ValueError(
            f"loss_fn must return (loss, metrics) with metrics a dict, not {type(metrics).__name__}"
        )
    out = {}
    for name, value in metrics.items():
        try:
            out[str(name)] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"loss_fn's metric {name!r} is {value!r}, not a number") from None
    return out


def _with_custom_loss(loss: float, metrics: dict[str, float]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def finish(result: dict[str, Any]) -> dict[str, Any]:
        return result | {"loss": loss, "metrics": {**result.get("metrics", {}), **metrics}}

    return finish


def forward_backward_custom(
    client: _ClientBase, run_id: str, data: Sequence[TokenDatum | Mapping[str, Any]], loss_fn: CustomLossFn
) -> Plan[_FutureBase]:
    """Train on a loss computed here, in torch: `loss_fn(data, logprobs_list) -> (loss, metrics)`.

    Runs `forward` (cross_entropy) for each datum's target-token logprobs, calls `loss_fn` on them as
    tensors requiring grad, and submits `forward_backward` with cross_entropy weights −dloss/dlogprob,
    whose gradient on the server equals the custom loss's. Waits for the forward pass; the returned
    future's result carries `loss_fn`'s loss and metrics. Needs torch on the client.
    """
    datums = _custom_datums(data)
    call = _train_call("forward", run_id, None, None, None, datums, None, "cross_entropy", None)
    forward_pass = yield from client._submit(call)
    weighted, loss, metrics = _custom_backward(data, datums, (yield from forward_pass._wait(None)), loss_fn)
    call = _train_call("forward_backward", run_id, None, None, None, weighted, None, "cross_entropy", None)
    return (yield from client._submit(call, _with_custom_loss(loss, metrics)))


def optim_step(
    client: _ClientBase,
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
) -> Plan[_FutureBase]:
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
    return (yield from client._submit(call))


# --- sampling ----------------------------------------------------------------------------------------


def sample(
    client: _ClientBase,
    prompt: str | TokenIds | Chat,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    run_id: str | None = None,
    *,
    stop: str | Sequence[str] | Sequence[int] | None = None,
    seed: int | None = None,
    base_model: str | None = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    logit_bias: Mapping[int, float] | None = None,
    json_schema: Mapping[str, Any] | None = None,
    regex: str | None = None,
    choice: Sequence[str] | None = None,
) -> Plan[str]:
    """Generate from `run_id`'s adapter (or a base model when None), wait, and return the text.

    `prompt`: text, token ids, or a chat (`[{"role": "user", "content": "Hi"}]`, rendered by the base
    model's chat template, ready for the assistant's turn). The penalties and `logit_bias` are OpenAI's,
    over the tokens generated so far. At most one of `json_schema`, `regex` and `choice` constrains the
    text (constrained decoding): JSON matching the schema, text matching the regex, one of the strings
    (after a reasoning model's thinking, for a chat)."""
    output = yield from generate(
        client,
        prompt,
        max_new_tokens,
        temperature,
        top_p,
        top_k,
        run_id,
        stop=stop,
        seed=seed,
        base_model=base_model,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        logit_bias=logit_bias,
        json_schema=json_schema,
        regex=regex,
        choice=choice,
    )
    return output.samples[0].text


def generate(
    client: _ClientBase,
    prompt_or_tokens: str | TokenIds | Chat,
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
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    logit_bias: Mapping[int, float] | None = None,
    json_schema: Mapping[str, Any] | None = None,
    regex: str | None = None,
    choice: Sequence[str] | None = None,
) -> Plan[SampleOutput]:
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
        **_shaping(frequency_penalty, presence_penalty, logit_bias),
        **_constraint(json_schema, regex, choice),
    )
    future = yield from client._submit(call)
    return SampleOutput.model_validate((yield from future._wait(None)))


def _shaping(frequency: float, presence: float, bias: Mapping[int, float] | None) -> dict[str, Any]:
    """The penalties and bias that are set: a server from before them still takes a request without."""
    given = {"frequency_penalty": frequency, "presence_penalty": presence, "logit_bias": dict(bias or {})}
    return {name: value for name, value in given.items() if value}


def _constraint(
    json_schema: Mapping[str, Any] | None, regex: str | None, choice: Sequence[str] | None
) -> dict[str, Any]:
    """The constraint that is set (a server from before them still takes a request without)."""
    given = {
        "json_schema": None if json_schema is None else dict(json_schema),
        "regex": regex,
        "choice": None if choice is None else list(choice),
    }
    return {name: value for name, value in given.items() if value is not None}


# --- checkpoints -------------------------------------------------------------------------------------


def save_checkpoint(
    client: _ClientBase, run_id: str, name: str, kind: Literal["state", "weights"] = "state"
) -> Plan[dict[str, Any]]:
    """Save the adapter (and, for kind "state", the optimizer and step); wait and return
    `{"status": "completed", "name", "step", "adapter_path", "optimizer_path"}`."""
    future = yield from client._submit(_save_call(run_id, name, kind))
    return SaveOutput.model_validate((yield from future._wait(None))).model_dump()


def load_checkpoint(
    client: _ClientBase,
    run_id: str,
    name: str,
    *,
    source_run_id: str | None = None,
    with_optimizer: bool = True,
) -> Plan[Run]:
    """Load a checkpoint (this run's, or `source_run_id`'s) into the run, wait, and return the run.
    Also how a run `lost` in a server restart resumes."""
    future = yield from client._submit(_load_call(run_id, name, source_run_id, with_optimizer))
    return Run.model_validate((yield from future._wait(None)))


def get_checkpoints(client: _ClientBase, run_id: str) -> Plan[list[Checkpoint]]:
    answer = yield from client._request(_Call("GET", f"/v1/runs/{_seg(run_id)}/checkpoints"))
    return [Checkpoint.model_validate(c) for c in answer]


def delete_checkpoint(client: _ClientBase, run_id: str, name: str) -> Plan[None]:
    yield from client._request(_Call("DELETE", f"/v1/runs/{_seg(run_id)}/checkpoints/{_seg(name)}"))


def download_checkpoint(
    client: _ClientBase, run_id: str, name: str, dest: str | os.PathLike[str]
) -> Plan[Path]:
    """Download a checkpoint into the new directory `dest` (a PEFT adapter directory); returns it."""
    return _unpack_checkpoint((yield from client._request(_archive_call(run_id, name))), dest)


# --- reading -----------------------------------------------------------------------------------------


def get_metrics(client: _ClientBase, run_id: str) -> Plan[RunMetrics]:
    """The run's history: loss, learning rate, grad norm and tokens per optimizer step."""
    answer = yield from client._request(_Call("GET", f"/v1/runs/{_seg(run_id)}/metrics"))
    return RunMetrics.model_validate(answer)


def get_job(client: _ClientBase, job_id: str, wait: float = 0) -> Plan[Job]:
    """A job's state; with `wait` (up to MAX_POLL_WAIT seconds) the server answers once it finishes."""
    return Job.model_validate((yield from client._request(_job_call(job_id, wait))))


def get_queue(client: _ClientBase) -> Plan[QueueView]:
    """Running and queued jobs (yours, when the server uses API keys) in start order, with each one's
    position and estimated start, and the scheduler's utilisation and throughput."""
    return QueueView.model_validate((yield from client._request(_Call("GET", "/v1/queue"))))


# --- the operations as methods of both clients ------------------------------------------------------------

R = TypeVar("R")  # what a method returns on `EZTinkerClient`
A = TypeVar("A")  # what it returns, awaited, on `AsyncEZTinkerClient`


class _Method(Generic[P, R, A]):
    """A plan above as a client method: bound to a client, it takes the plan's arguments and runs the plan
    with that client's I/O (`_method`: blocking on `EZTinkerClient`, a coroutine on the async one)."""

    def __init__(self, plan: Callable[Concatenate[Any, P], Plan[Any]]) -> None:
        self._plan = plan
        self._runs: dict[type, Callable[..., Any]] = {}
        self.__doc__ = plan.__doc__

    @overload
    def __get__(self, client: None, owner: type | None = None) -> Self: ...
    @overload
    def __get__(self, client: EZTinkerClient, owner: type | None = None) -> Callable[P, R]: ...
    @overload
    def __get__(
        self, client: AsyncEZTinkerClient, owner: type | None = None
    ) -> Callable[P, Coroutine[Any, Any, A]]: ...
    def __get__(self, client: Any, owner: type | None = None) -> Any:
        if client is None:
            return self
        kind = type(client)
        if kind not in self._runs:
            self._runs[kind] = kind._method(self._plan)
        return types.MethodType(self._runs[kind], client)


def _answers(plan: Callable[Concatenate[Any, P], Plan[R]]) -> _Method[P, R, R]:
    """A method that answers with what the plan returns."""
    return _Method(plan)


def _submits(plan: Callable[Concatenate[Any, P], Plan[_FutureBase]]) -> _Method[P, JobFuture, AsyncJobFuture]:
    """A method that submits a job and answers with the client's future for it."""
    return _Method(plan)


class _Operations:
    """Every operation of the native API, as a method (the clients' base: `client_core._ClientBase`)."""

    health = _answers(health)
    create_run = _answers(create_run)
    get_run = _answers(get_run)
    get_runs = _answers(get_runs)
    delete_run = _answers(delete_run)
    forward_backward = _submits(forward_backward)
    forward = _submits(forward)
    forward_backward_custom = _submits(forward_backward_custom)
    optim_step = _submits(optim_step)
    sample = _answers(sample)
    generate = _answers(generate)
    save_checkpoint = _answers(save_checkpoint)
    load_checkpoint = _answers(load_checkpoint)
    get_checkpoints = _answers(get_checkpoints)
    delete_checkpoint = _answers(delete_checkpoint)
    download_checkpoint = _answers(download_checkpoint)
    get_metrics = _answers(get_metrics)
    get_job = _answers(get_job)
    get_queue = _answers(get_queue)
