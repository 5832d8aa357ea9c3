"""The native REST API (`/v1/...`) for `EZTinkerClient`: validate, translate, call the service, return.

Ops answer 202 with a `JobRef` at once; `GET /v1/jobs/{id}?wait=s` long-polls for the result, encoded
here from the job's typed result (`result_json`). Native bodies become engine types at this boundary:
`input_ids` / `target_ids` / `weights` datums, an optim_step body read as a step of the run's optimizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from eztinker.api.chat import chat_template_ids, require_chat_template
from eztinker.api.deps import OwnerDep, ServiceDep, while_connected
from eztinker.api.reasoning import opens_thinking
from eztinker.api.structured import Answer, choice_answer, json_answer, regex_answer
from eztinker.engine import AdamParams, Datum, DimuonParams, SamplingParams, TokenLoss
from eztinker.engine.errors import InvalidInputError
from eztinker.engine.optimizers import OptimizerName
from eztinker.engine.sampler import SampleRequest
from eztinker.models import LossFunctionConfig, api
from eztinker.scheduler import Job
from eztinker.service import JobView, SampleSpec, Service
from eztinker.service import results as r
from eztinker.service.custom_loss import custom_losses
from eztinker.service.imports import import_adapter

router = APIRouter(prefix="/v1", tags=["native"])

MAX_WAIT_SECONDS = 60.0


def _ref(job: Job) -> api.JobRef:
    return api.JobRef(job_id=job.job_id, status=job.status, run_id=job.run_id, op=job.op)


# --- native bodies -> engine types ---------------------------------------------------------------


def _engine_data(
    service: Service, body: api.ForwardBackwardRequest, owner: str | None
) -> tuple[list[Datum], LossFunctionConfig | TokenLoss | None]:
    """Wire data as engine `Datum`s, and the loss to use (None: the run's own loss). A token loss is
    resolved as on the Tinker routes: a built-in by name, or the caller's own uploaded custom loss."""
    if body.loss_fn is not None:
        data = [Datum(d.tokens, d.loss_inputs) for d in body.data if isinstance(d, api.TokenDatum)]
        return custom_losses(service).resolve(body.loss_fn, body.loss_fn_config or {}, data, owner)
    data = [
        Datum.from_labels(d.input_ids, d.target_ids, d.weights)
        for d in body.data
        if isinstance(d, api.NativeDatum)
    ]
    return data, body.loss_config


def _native_field(field: str) -> str:
    """The engine's name for a native datum's field -> the name the caller sent (`target_ids`, ...)."""
    for engine_name, wire_name in (
        (".loss_inputs.labels", ".target_ids"),
        (".loss_inputs.weights", ".weights"),
        (".tokens", ".input_ids"),
    ):
        if field.endswith(engine_name):
            return field[: -len(engine_name)] + wire_name
    return field


def _forward_backward(
    service: Service, run_id: str, body: api.ForwardBackwardRequest, owner: str | None, backward: bool
) -> Job:
    data, loss = _engine_data(service, body, owner)
    try:
        return service.forward_backward(run_id, data, loss, owner, backward=backward)
    except InvalidInputError as exc:
        if body.loss_fn is not None:
            raise
        raise InvalidInputError(_native_field(exc.field), exc.message) from None


_ADAM_ONLY = ("weight_decay", "beta2", "eps")
_ADAM_SETTINGS = {"learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"}
_DIMUON_ONLY = ("damping", "rank_lr_correction_exponent")


def step_params(body: api.OptimStepRequest, optimizer: OptimizerName) -> AdamParams | DimuonParams:
    """A native optim_step body as a step of `optimizer`; a setting the optimizer lacks is refused."""
    if optimizer == "dimuon":
        defaults = api.OptimStepRequest()
        for name in _ADAM_ONLY:
            if getattr(body, name) != getattr(defaults, name):
                raise InvalidInputError(name, f"the run's optimizer, Dimuon, has no {name}: leave it out")
        extra = {name: getattr(body, name) for name in _DIMUON_ONLY if getattr(body, name) is not None}
        return DimuonParams(
            learning_rate=body.learning_rate, beta1=body.beta1, grad_clip_norm=body.grad_clip_norm, **extra
        )
    for name in _DIMUON_ONLY:
        if getattr(body, name) is not None:
            raise InvalidInputError(name, "is a Dimuon setting; the run's optimizer is AdamW")
    return AdamParams(**body.model_dump(include=_ADAM_SETTINGS))


def _sample_spec(
    service: Service, run_id: str | None, body: api.SampleRequest, owner: str | None
) -> SampleSpec:
    """A run's live adapter, a sampler snapshot, or a base model. The request is checked now when its
    model is loaded (a bad one is a 422, not a failed job); else its text is tokenized when the job starts."""
    if run_id is not None:
        target = service.sampling.target(owner, run_id=run_id)
    elif body.sampler_id is not None:
        target = service.sampling.target(owner, sampler_id=body.sampler_id)
    else:
        target = service.sampling.target(owner, base_model=body.base_model)
    _check_target_fields(body, run_id, target.base_model)
    check_now = target.base_model in service.backend.loaded_models  # (checking needs the model itself)
    same = body.model_dump(
        include={
            "temperature",
            "top_p",
            "top_k",
            "stop",
            "seed",
            "frequency_penalty",
            "presence_penalty",
            "logit_bias",
        }
    )
    params = SamplingParams(max_tokens=body.max_new_tokens, **same)
    prompt = list(body.prompt_tokens or [])
    text = body.prompt  # (None for ids or a chat)
    answer = _answer(body)
    if body.messages is not None:  # rendered now: a chat template is the tokenizer's, which loads alone
        tokenizer = service.backend.tokenizer(target.base_model)
        require_chat_template(tokenizer, target.base_model, "messages", "send `prompt` or `prompt_tokens`")
        prompt = chat_template_ids(tokenizer, [turn.model_dump() for turn in body.messages])
        if answer is not None:  # a reasoning model thinks first: the answer after it has the shape
            params = replace(params, grammar=answer.grammar(opens_thinking(tokenizer, prompt)))
    else:
        if text is not None and (check_now or answer is not None):  # tokenized now, to check it with the rest
            tokenizer = service.backend.tokenizer(target.base_model)
            prompt, text = list(tokenizer(text, add_special_tokens=False)["input_ids"]), None
        if answer is not None:
            params = replace(params, grammar=answer.grammar(None))
    request = SampleRequest(
        prompt=prompt,
        params=params,
        num_samples=body.n,
        prompt_logprobs=body.prompt_logprobs,
    )
    check_now = check_now or answer is not None
    return SampleSpec(target, [request], text_prompt=text, decode=True, check_now=check_now)


def _check_target_fields(body: api.SampleRequest, run_id: str | None, base_model: str) -> None:
    """Refuse a `sampler_id` or `base_model` the route would not sample: answering from another model
    than the one asked for, as if the field had not been sent, would hide the caller's mistake."""
    if run_id is not None and body.sampler_id is not None:
        raise InvalidInputError(
            "sampler_id",
            f"this route samples run {run_id!r}; sample a snapshot with POST /v1/sample, or leave it out",
        )
    if body.base_model is not None and body.base_model != base_model:
        sampled = f"run {run_id!r}" if run_id is not None else f"sampler {body.sampler_id!r}"
        raise InvalidInputError(
            "base_model", f"is {body.base_model!r}, but {sampled} is on {base_model!r}: leave it out"
        )


def _answer(body: api.SampleRequest) -> Answer | None:
    """The shape the sample must have (constrained decoding), from `json_schema`, `regex` or `choice`."""
    if body.json_schema is not None:
        return json_answer(body.json_schema, "json_schema")
    if body.regex is not None:
        return regex_answer(body.regex, "regex")
    if body.choice is not None:
        return choice_answer(body.choice, "choice")
    return None


def _sample(service: Service, run_id: str | None, body: api.SampleRequest, owner: str | None) -> Job:
    """The sampling job; a grammar the engine refuses is named by the field that asked for it."""
    spec = _sample_spec(service, run_id, body, owner)
    try:
        return service.sampling.sample(spec, owner)
    except InvalidInputError as exc:  # named by the engine's request: renamed to what the caller sent
        field = _sample_field(body, exc.field)
        if field == exc.field:
            raise
        raise InvalidInputError(field, exc.message) from None


def _sample_field(body: api.SampleRequest, field: str) -> str:
    """The native body's name for an engine `SampleRequest` field (`sampling_params.top_k` -> `top_k`)."""
    if field == "sampling_params.grammar":
        return next(f for f in ("json_schema", "regex", "choice") if getattr(body, f) is not None)
    if field == "sampling_params.max_tokens":
        return "max_new_tokens"
    name = field.removeprefix("sampling_params.")
    if name != field and name in api.SampleRequest.model_fields:
        return name
    return field  # `prompt` names the prompt in whichever form it came (as the limits name it)


# --- job results -> native JSON ----------------------------------------------------------------------


def result_json(result: r.Result | dict[str, Any] | None) -> dict[str, Any] | None:
    """A job's result as the native API shows it (see `eztinker.models.api`)."""
    if isinstance(result, r.SampleOutput) and result.texts is not None:
        (sampled,), (texts,) = result.results, result.texts
        samples = [
            api.Sample(text=text, tokens=s.tokens, logprobs=s.logprobs, stop_reason=s.stop_reason)
            for s, text in zip(sampled.sequences, texts, strict=True)
        ]
        output = api.SampleOutput(
            samples=samples, prompt_tokens=result.prompts[0], prompt_logprobs=sampled.prompt_logprobs
        )
        return output.model_dump()
    if isinstance(result, r.SaveOutput):
        return api.SaveOutput(
            name=result.name,
            step=result.step,
            adapter_path=result.adapter_path,
            optimizer_path=result.optimizer_path,
        ).model_dump()
    if isinstance(result, r.RunOutput):
        return result.run.model_dump()
    return r.to_json(result)


def job_model(job: JobView) -> api.Job:
    fields: dict[str, Any] = {f.name: getattr(job, f.name) for f in dataclasses.fields(job)}
    fields["result"] = result_json(job.result)
    return api.Job(**fields)


# --- routes ------------------------------------------------------------------------------------------


@router.post("/runs", status_code=status.HTTP_201_CREATED)
def create_run(body: api.CreateRunRequest, service: ServiceDep, owner: OwnerDep) -> api.Run:
    """Create a LoRA run on a base model (loaded on first use, so the first call may take a while)."""
    return service.create_run(body, owner)


@router.post("/runs/import", status_code=status.HTTP_201_CREATED)
async def import_run(
    request: Request,
    service: ServiceDep,
    owner: OwnerDep,
    base_model: Annotated[str, Query(min_length=1, description="The base model the adapter was trained on.")],
    lora_rank: Annotated[int | None, Query(ge=1, description="If given, must be the adapter's rank.")] = None,
    target_modules: Annotated[
        list[str] | None, Query(description="If given (repeated), must be the adapter's target modules.")
    ] = None,
    run_id: Annotated[str | None, Query(min_length=1)] = None,
) -> api.Run:
    """A new run from a PEFT LoRA adapter directory, sent as a tar archive (plain or gzip) of it, that
    trains on from there (step 0, a fresh optimizer). A mismatch with `adapter_config.json` is a 422 naming
    the field; the adapter stays as the run's checkpoint `imported`. See `eztinker.service.imports`."""
    archive = await request.body()
    return await run_in_threadpool(
        import_adapter,
        service,
        archive,
        owner,
        base_model=base_model,
        lora_rank=lora_rank,
        target_modules=target_modules,
        run_id=run_id,
    )


@router.get("/runs")
def list_runs(service: ServiceDep, owner: OwnerDep) -> list[api.Run]:
    return service.views.list_runs(owner)


@router.get("/runs/{run_id}")
def get_run(run_id: str, service: ServiceDep, owner: OwnerDep) -> api.Run:
    return service.views.get_run(run_id, owner)


@router.delete("/runs/{run_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_run(run_id: str, service: ServiceDep, owner: OwnerDep) -> Response:
    service.delete_run(run_id, owner)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/runs/{run_id}/forward_backward", status_code=status.HTTP_202_ACCEPTED)
def forward_backward(
    run_id: str, body: api.ForwardBackwardRequest, service: ServiceDep, owner: OwnerDep
) -> api.JobRef:
    """Compute the loss and accumulate its gradients (applied by the next optim_step)."""
    return _ref(_forward_backward(service, run_id, body, owner, backward=True))


@router.post("/runs/{run_id}/forward", status_code=status.HTTP_202_ACCEPTED)
def forward(
    run_id: str, body: api.ForwardBackwardRequest, service: ServiceDep, owner: OwnerDep
) -> api.JobRef:
    """Compute the loss and per-token logprobs without touching the run."""
    return _ref(_forward_backward(service, run_id, body, owner, backward=False))


@router.post("/runs/{run_id}/optim_step", status_code=status.HTTP_202_ACCEPTED)
def optim_step(run_id: str, body: api.OptimStepRequest, service: ServiceDep, owner: OwnerDep) -> api.JobRef:
    """Apply the accumulated gradients with the run's optimizer and zero them; the body is read as a
    step of that optimizer (see `api.OptimStepRequest`)."""
    optimizer = service.optimizer_of(run_id, owner)
    if body.optimizer is not None and body.optimizer != optimizer:
        raise InvalidInputError(
            "optimizer",
            f"is {body.optimizer!r}, but run {run_id!r} uses {optimizer} (fixed when it was created)",
        )
    try:
        return _ref(service.optim_step(run_id, step_params(body, optimizer), owner))
    except InvalidInputError as exc:  # the engine names a setting as the Tinker wire does (adam_params.x)
        field = _optim_field(exc.field)
        if field == exc.field:
            raise
        raise InvalidInputError(field, exc.message) from None


def _optim_field(field: str) -> str:
    """The engine's name for an optim_step setting -> the native body's (its fields are top-level)."""
    for wire in ("adam_params.", "optimizer_params."):
        if field.startswith(wire):
            return field[len(wire) :]
    return field


@router.post("/runs/{run_id}/sample", status_code=status.HTTP_202_ACCEPTED)
def sample_run(run_id: str, body: api.SampleRequest, service: ServiceDep, owner: OwnerDep) -> api.JobRef:
    """Sample from the run's current adapter."""
    return _ref(_sample(service, run_id, body, owner))


@router.post("/sample", status_code=status.HTTP_202_ACCEPTED)
def sample_base(body: api.SampleRequest, service: ServiceDep, owner: OwnerDep) -> api.JobRef:
    """Sample from a base model (default: the server's first model) or a sampler snapshot."""
    return _ref(_sample(service, None, body, owner))


@router.post("/runs/{run_id}/save", status_code=status.HTTP_202_ACCEPTED)
def save(run_id: str, body: api.SaveRequest, service: ServiceDep, owner: OwnerDep) -> api.JobRef:
    """Save a checkpoint: `state` (adapter + optimizer + step) or `weights` (the adapter alone)."""
    return _ref(service.checkpoints.save(run_id, body, owner))


@router.post("/runs/{run_id}/load", status_code=status.HTTP_202_ACCEPTED)
def load(run_id: str, body: api.LoadRequest, service: ServiceDep, owner: OwnerDep) -> api.JobRef:
    """Load a checkpoint into the run (how a run lost in a restart resumes)."""
    return _ref(service.load(run_id, body, owner))


@router.get("/runs/{run_id}/checkpoints")
def list_checkpoints(run_id: str, service: ServiceDep, owner: OwnerDep) -> list[api.Checkpoint]:
    return service.views.list_checkpoints(run_id, owner)


def archive_response(archive: Path, filename: str) -> FileResponse:
    """A temporary .tar.gz as a download, deleted once sent."""
    return FileResponse(
        archive,
        media_type="application/gzip",
        filename=filename,
        background=BackgroundTask(archive.unlink, missing_ok=True),
    )


@router.get("/runs/{run_id}/checkpoints/{name}/archive", response_class=FileResponse)
def download_checkpoint(run_id: str, name: str, service: ServiceDep, owner: OwnerDep) -> FileResponse:
    """The checkpoint directory as a .tar.gz (a PEFT adapter directory, plus optimizer state if saved)."""
    return archive_response(service.views.checkpoint_archive(run_id, name, owner), f"{run_id}-{name}.tar.gz")


@router.delete("/runs/{run_id}/checkpoints/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_checkpoint(run_id: str, name: str, service: ServiceDep, owner: OwnerDep) -> Response:
    service.checkpoints.delete(run_id, name, owner)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/runs/{run_id}/metrics")
def run_metrics(run_id: str, service: ServiceDep, owner: OwnerDep) -> api.RunMetrics:
    """Loss, learning rate and gradient norm at every optimizer step."""
    return service.views.metrics(run_id, owner)


@router.get("/queue")
def queue(service: ServiceDep, owner: OwnerDep) -> api.QueueView:
    """What runs and what waits, in start order, with each job's position and estimated start."""
    return service.views.queue(owner)


@router.get("/jobs/{job_id}")
async def get_job(
    job_id: str,
    request: Request,
    service: ServiceDep,
    owner: OwnerDep,
    wait: Annotated[
        float, Query(ge=0, le=MAX_WAIT_SECONDS, description="Seconds to wait for completion.")
    ] = 0,
) -> api.Job:
    """A job's status and result; with `wait`, answers as soon as it finishes (long-poll)."""
    view = service.views.get_job(job_id, owner)  # first: another key's job is missing at once, not waited on
    job = service.scheduler.get(job_id)
    if job is None or wait <= 0 or view.status in ("completed", "failed"):
        return job_model(view)
    await while_connected(request, job.wait(wait))
    return job_model(service.views.get_job(job_id, owner))
