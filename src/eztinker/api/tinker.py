"""The Tinker wire API (`/api/v1/...`) so the official `tinker` SDK (0.38.0) runs unmodified.

Thin: each route translates the wire request (`tinker_wire`, `tinker_bodies`), calls the service, and
answers with a future (`{"request_id"}`) that `retrieve_future` long-polls. Failures reach the SDK as
HTTP 200 `{"error", "category"}` (reference/tinker-wire-protocol.md §2.6, §6). Futures, `seq_id` ordering
and idempotent resends are `tinker_futures`; sessions and bootstrap `tinker_sessions`; sampling
sessions, samples and their completion queues `tinker_sampling`; the REST routes (`RestClient`)
`tinker_rest`.

Sessions, sampling sessions and checkpoint metadata are durable (`FacadeState`, in the server's
database): session listing, a `SamplingClient` on a checkpoint, and `public`/TTL survive a restart.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from eztinker.api import tinker_auth, tinker_custom_loss, tinker_sampling
from eztinker.api import tinker_bodies as bodies
from eztinker.api import tinker_rest as rest
from eztinker.api import tinker_sessions as sessions
from eztinker.api import tinker_wire as wire
from eztinker.api.deps import OwnerDep, ServiceDep, get_owner, while_connected
from eztinker.api.errors import failure
from eztinker.api.tinker_futures import (
    CHECKPOINT_META,
    LONG_POLL_SECONDS,
    SAMPLERS,
    StateDep,
    TinkerState,
    answer,
    expect,
    find,
    once,
    ordered,
    refuse,
    submit,
)
from eztinker.engine.checkpoint import parse_age_recipients
from eztinker.engine.errors import ConflictError, EngineError, InvalidInputError, NotFoundError
from eztinker.engine.optimizers import optimizer_config
from eztinker.models import LoRAConfig, api
from eztinker.scheduler import Job
from eztinker.service import Service
from eztinker.service.custom_loss import custom_losses
from eztinker.service.results import RunOutput

router = APIRouter(prefix="/api/v1", tags=["tinker"])  # public routes; the rest need the API key
_authed = APIRouter(dependencies=[Depends(get_owner)])

LORA_ALPHA = 32.0


# --- training models -------------------------------------------------------------------------------------


@_authed.post("/create_model")
def create_model(
    body: bodies.CreateModel, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """Create a LoRA run behind a future; a resent request (same session and model_seq_id) gets the same one."""
    session_id, model_seq_id = body.session_id, body.model_seq_id
    key = service.access.key(owner, "create", session_id, str(model_seq_id))
    return once(state, key, lambda: _create_model(body, service, owner, state))


def _create_model(
    body: bodies.CreateModel, service: Service, owner: str | None, state: TinkerState
) -> dict[str, Any]:
    model_id = wire.model_id(body.session_id, body.model_seq_id)
    sessions.check_new_object(state, body.session_id, owner)
    lora, base_model = body.lora_config, body.base_model
    try:  # an optimizer this server does not have is refused, never trained as another
        optimizer = wire.optimizer_from_config(body.optimizer_config)
    except InvalidInputError as exc:
        return refuse(state, owner, str(exc), model_id=model_id)

    def work() -> RunOutput:
        targets = service.backend.lora_target_modules(
            base_model, train_attn=lora.train_attn, train_mlp=lora.train_mlp, train_unembed=lora.train_unembed
        )
        config = LoRAConfig(r=lora.rank, lora_alpha=LORA_ALPHA, seed=lora.seed, target_modules=targets)
        request = api.CreateRunRequest(
            base_model=base_model, lora_config=config, run_id=model_id, optimizer=optimizer
        )
        run = service.create_run(request, owner)
        rest.keep_run_metadata(state, model_id, body.user_metadata, owner)
        return RunOutput(run)

    expect(state, owner, model_id, 1)
    return submit(state, owner, lambda: service.submit("create_run", None, work, owner), model_id=model_id)


@_authed.post("/get_info")
def get_info(body: bodies.ModelRef, service: ServiceDep, owner: OwnerDep) -> dict[str, Any]:
    run = service.views.get_run(body.model_id, owner)
    return {
        "type": "get_info",
        "model_id": run.run_id,
        "model_data": {"model_name": run.base_model, "tokenizer_id": run.base_model},
        "is_lora": True,
        "lora_rank": run.lora_config.r,
        "model_name": run.base_model,
        "optimizer_config": optimizer_config(run.optimizer),
    }


@_authed.post("/forward_backward")
async def forward_backward(request: Request, service: ServiceDep, owner: OwnerDep, state: StateDep) -> Any:
    """`forward_backward`, or `forward` when `forward_only`: a protobuf body (or the older JSON one)."""
    return await _forward_backward(request, service, owner, state, forward_only=False)


@_authed.post("/forward")
async def forward(request: Request, service: ServiceDep, owner: OwnerDep, state: StateDep) -> Any:
    """`forward` of SDKs <= 0.24 (JSON body); newer SDKs send `forward_backward` with `forward_only`."""
    return await _forward_backward(request, service, owner, state, forward_only=True)


async def _forward_backward(
    request: Request, service: Service, owner: str | None, state: TinkerState, *, forward_only: bool
) -> Any:
    body = await request.body()
    try:
        if "json" in request.headers.get("content-type", ""):
            call = wire.decode_forward_backward_json(_json_body(body), forward_only=forward_only)
        else:
            parsed = wire.parse_forward_backward(body, request.headers.get("content-encoding"))
            try:
                call = wire.forward_backward_call(parsed)
            except InvalidInputError as exc:  # refused, in its turn: else the model's next op waits
                return await run_in_threadpool(  # out the seq_id gap, for an op that will never come
                    ordered, state, owner, parsed.model_id, parsed.seq_id, _refused(exc)
                )
    except InvalidInputError as exc:
        return refuse(state, owner, str(exc))

    def make() -> Job:
        data = call.data
        if call.chunks is not None:  # images: placeholder runs, made on the run's base model
            base = service.views.get_run(call.model_id, owner).base_model
            data = wire.expand_images(
                call, lambda chunks, where: service.sampling.expand_chunks(base, chunks, where)
            ).data
        data, loss = custom_losses(service).resolve(call.loss_fn, call.loss_fn_config, data, owner)
        return service.forward_backward(call.model_id, data, loss, owner, backward=not call.forward_only)

    return await run_in_threadpool(ordered, state, owner, call.model_id, call.seq_id, make)


def _refused(exc: InvalidInputError) -> Callable[[], Job]:
    """An op's `make` that refuses it (its future fails with `exc`, as a user error)."""

    def make() -> Job:
        raise exc

    return make


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except ValueError as exc:
        raise InvalidInputError("body", f"not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidInputError("body", "must be a JSON object")
    return parsed


@_authed.post("/optim_step")
def optim_step(
    body: bodies.OptimStep, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """`adam_params` (an AdamW run) or `optimizer_params` `{"type": "dimuon", ...}` (a Dimuon run); params of
    the other optimizer than the model's, or out of range, fail the future (category "user")."""
    model_id = body.model_id
    params = body.model_dump(include={"adam_params", "optimizer_params", "optim_params"}, exclude_none=True)

    def make() -> Job:
        return service.optim_step(model_id, wire.optim_params(params), owner)

    return ordered(state, owner, model_id, body.seq_id, make)


# --- checkpoints -----------------------------------------------------------------------------------------


@_authed.post("/save_weights")
def save_weights(
    body: bodies.SaveWeights, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """`save_state`: adapter + optimizer state, as `tinker://<run>/weights/<name>`."""
    name = body.path or f"ckpt-{uuid.uuid4().hex[:8]}"
    return _save(state, service, owner, body, "weights", name, "state")


def _save(
    state: TinkerState,
    service: Service,
    owner: str | None,
    body: bodies.SaveWeights | bodies.SaveWeightsExternal,
    kind: str,
    name: str,
    native_kind: Literal["state", "weights"],
    **export: Any,
) -> dict[str, Any]:
    """`export`: `Service.save`'s export options (Tinker module names, age recipients)."""
    model_id, native, ttl = body.model_id, wire.native_checkpoint_name(kind, name), body.ttl_seconds
    overwrite = body.overwrite if isinstance(body, bodies.SaveWeights) else False
    user_metadata = body.user_metadata if isinstance(body, bodies.SaveWeights) else None

    def make() -> Job:
        wire.check_name(name)
        if ttl is not None:
            rest.check_ttl(ttl)
        if export.get("age_recipients") is not None:  # refused naming the wire's field
            parse_age_recipients(export["age_recipients"], field="age_encryption_recipients")
        request = api.SaveRequest(name=native, kind=native_kind, overwrite=overwrite)
        try:
            job = service.checkpoints.save(model_id, request, owner, **export)
        except ConflictError:  # said with the path the SDK knows, not the service's internal name
            path = wire.tinker_path_of(model_id, native)
            raise ConflictError(
                f"{path} already exists: choose another name, or save with overwrite=True"
            ) from None
        if ttl is not None or overwrite:  # the service deletes the checkpoint once it expires (None: never)
            service.checkpoints.set_expiry(
                model_id, native, None if ttl is None else time.time() + ttl, owner
            )
        if overwrite:  # as the SDK documents: the new user_metadata replaces the old, none deletes it
            rest.replace_meta(state, f"{model_id}/{native}", owner, user_metadata=user_metadata)
        elif user_metadata is not None:
            rest.set_meta(state, f"{model_id}/{native}", owner, user_metadata=user_metadata)
        return job

    return ordered(state, owner, model_id, body.seq_id, make)


@_authed.post("/save_weights_for_sampler")
def save_weights_for_sampler(
    body: bodies.SaveWeightsForSampler, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """With `path`: a weights checkpoint. Without: a new sampling session on the model's weights, as
    `kind` says (the SDK's `types/sampling_client_kind.py`):

    - `snapshot`: the weights of now, fixed (an ephemeral snapshot: freed when a later one of the model has
      replaced it and it went unused a while, when the session ends, or when the run is deleted;
      `service.sampling`);
    - `inflight`: the model's one mutable target, which each later inflight save moves on to the newer
      weights for every inflight session of the model, old and new. Each save answers a new session.
    """
    model_id = body.model_id
    if body.path:
        if body.kind != "snapshot":  # the SDK never sends it: a named save is a fixed checkpoint
            message = "kind: 'inflight' saves take no path (they publish the model's shared weights)"
            return refuse(state, owner, message, model_id=model_id)
        return _save(state, service, owner, body, "sampler_weights", body.path, "weights")
    session = model_id.split(":train:")[0] if ":train:" in model_id else model_id
    sampler_id = wire.sampling_session_id(session, body.sampling_session_seq_id or 0)
    inflight = body.kind == "inflight"

    def make() -> Job:
        sessions.check_new_object(state, session, owner)  # a new sampling session: only in an active one
        if inflight:
            job = service.sampling.save_inflight(model_id, sampler_id, owner)
        else:
            job = service.sampling.save_sampler(model_id, sampler_id, owner, ephemeral=True)
        base = service.views.get_run(model_id, owner).base_model
        value = {"base_model": base, "source_run": model_id, **({"inflight": True} if inflight else {})}
        state.durable.put(SAMPLERS, sampler_id, value, owner=owner)
        return job

    return ordered(state, owner, model_id, body.seq_id, make)


@_authed.post("/save_weights_external")
def save_weights_external(
    body: bodies.SaveWeightsExternal, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """The adapter as Tinker exports it, `tinker://<run>/external_weights/<name>`, downloadable per file.

    A PEFT-format directory whose output head is named `model.unembed_tokens`, as in Tinker's exports
    (tinker-cookbook's `weights.build_hf_model` and `build_lora_adapter` expect that name). With
    `age_encryption_recipients` every file is age-encrypted to them and stored as `<file>.age`.
    """
    name = body.path or f"external-{uuid.uuid4().hex[:8]}"
    recipients = body.age_encryption_recipients
    return _save(
        state,
        service,
        owner,
        body,
        "external_weights",
        name,
        "weights",
        module_names="tinker",
        age_recipients=recipients,
    )


@_authed.post("/load_weights")
def load_weights(
    body: bodies.LoadWeights, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """`load_state*` into a model, or create a model from a checkpoint (no `model_id`: create-via-load)."""
    path, optimizer = body.path, body.optimizer
    if body.model_id:
        model_id = body.model_id

        def load() -> Job:
            _refuse_access_token(body)
            source_run, name, _ = wire.parse_tinker_path(path)
            chosen = wire.optimizer_from_config(body.optimizer_config)
            if chosen is not None and chosen != service.views.get_run(model_id, owner).optimizer:
                raise InvalidInputError(
                    "optimizer_config", f"cannot change the optimizer of existing model {model_id!r}"
                )
            if optimizer:
                _require_optimizer_state(service, source_run, name, owner)
            request = api.LoadRequest(name=name, source_run_id=source_run, with_optimizer=optimizer)
            return service.load(model_id, request, owner)

        return ordered(state, owner, model_id, body.seq_id, load)

    if not body.session_id:
        raise InvalidInputError("session_id", "is required to create a model from a checkpoint")
    session_id = body.session_id
    key = service.access.key(owner, "create", session_id, str(body.model_seq_id))
    return once(state, key, lambda: _create_from_checkpoint(body, session_id, service, owner, state))


def _create_from_checkpoint(
    body: bodies.LoadWeights, session_id: str, service: Service, owner: str | None, state: TinkerState
) -> dict[str, Any]:
    path, optimizer = body.path, body.optimizer
    model_id = wire.model_id(session_id, body.model_seq_id)
    sessions.check_new_object(state, session_id, owner)

    def create() -> Job:
        _refuse_access_token(body)
        source_run, name, _ = wire.parse_tinker_path(path)
        chosen = wire.optimizer_from_config(body.optimizer_config)
        base_model = service.views.checkpoint_run(source_run, name, owner).base_model
        if optimizer:
            _require_optimizer_state(service, source_run, name, owner)
        if body.base_model is not None and body.base_model != base_model:  # never trained on another base
            raise InvalidInputError(
                "base_model",
                f"{body.base_model!r} is not the checkpoint's base model {base_model!r}; this server trains a "
                "checkpoint only on the base model it was saved from (omit base_model)",
            )
        # `optimizer` true (…_with_optimizer): weights and optimizer state, whose optimizer the model keeps;
        # false (create_training_client_from_state): the weights only, and a fresh optimizer (AdamW by default).
        request = api.CreateRunRequest(
            base_model=base_model,
            run_id=model_id,
            from_checkpoint=api.CheckpointRef(run_id=source_run, name=name, with_optimizer=optimizer),
            optimizer=chosen if chosen is not None or optimizer else "adamw",
        )

        def work() -> RunOutput:
            created = service.create_run(request, owner)
            rest.keep_run_metadata(state, model_id, body.user_metadata, owner)
            return RunOutput(created, from_checkpoint=True)

        return service.submit("create_run", None, work, owner)

    expect(state, owner, model_id, 1)  # the load is the model's op 0
    return submit(state, owner, create, model_id=model_id)


def _require_optimizer_state(service: Service, run_id: str, name: str, owner: str | None) -> None:
    """A load `_with_optimizer` needs a checkpoint that holds optimizer state (`save_state`'s): from one of
    weights only it is refused, never run with a fresh optimizer instead."""
    _, checkpoint = service.access.readable_checkpoint(run_id, name, owner)
    if checkpoint.kind != "state":
        raise InvalidInputError(
            "path",
            f"{wire.tinker_path_of(run_id, name)} holds weights only, no optimizer state (save_state makes a "
            "checkpoint with it); load it without the optimizer (create_training_client_from_state)",
        )


def _refuse_access_token(body: bodies.LoadWeights) -> None:
    """Refused, never ignored: another key's private checkpoint would be answered as missing, for no reason
    the caller could see."""
    if body.weights_access_token is not None:
        raise InvalidInputError(
            "weights_access_token",
            "access tokens are not served; the owner can publish the checkpoint instead",
        )


@_authed.post("/weights_info")
def weights_info(
    body: bodies.WeightsInfo, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    run_id, name, _ = wire.parse_tinker_path(body.tinker_path)
    run = service.views.checkpoint_run(run_id, name, owner)  # the caller's, or a published one
    meta = state.durable.get(CHECKPOINT_META, f"{run_id}/{name}")
    try:  # what the run adapts, classified by the engine's model-family knowledge
        flags: dict[str, bool | None] = dict(service.backend.tinker_lora_flags(run_id))
    except NotFoundError:  # the run's adapter is not held now (a lost run): not known here
        flags = {"train_attn": None, "train_mlp": None, "train_unembed": None}
    return {
        "base_model": run.base_model,
        "is_lora": True,
        "lora_rank": run.lora_config.r,
        **flags,
        "optimizer_config": optimizer_config(run.optimizer),  # a run's checkpoints all have its optimizer
        "user_metadata": meta.value.get("user_metadata") if meta is not None else None,
    }


# --- futures -----------------------------------------------------------------------------------------------


@_authed.post("/retrieve_future")
async def retrieve_future(
    body: bodies.RetrieveFuture, request: Request, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> Response:
    """Long-poll a future: its result, `try_again` after ~25 s, or a 200 `{"error", "category"}`."""
    request_id = body.request_id
    future = await run_in_threadpool(find, state, request_id, owner)
    if future is None:
        return JSONResponse({"error": f"unknown request {request_id!r}", "category": "user"}, status_code=410)
    started = time.monotonic()
    if not future.submitted.done():  # an op held for seq_id order
        # `asyncio.wait`, not `wait_for`: a poll that times out or is abandoned must not cancel the
        # future itself (the op's `settle` would then raise when the op is submitted).
        submitted = asyncio.wait([asyncio.wrap_future(future.submitted)], timeout=LONG_POLL_SECONDS)
        waited = await while_connected(request, submitted)
        if waited is None or not waited[0]:  # the client hung up (nobody reads this), or time is up
            return _try_again(request_id)
    if future.error is not None:
        return JSONResponse({"error": future.error[0], "category": future.error[1]})
    job = future.job or future.record
    assert job is not None
    if isinstance(job, Job) and not await while_connected(
        request, job.wait(max(0.0, LONG_POLL_SECONDS - (time.monotonic() - started)))
    ):
        return _try_again(request_id)
    if job.status in ("queued", "running"):
        return _try_again(request_id)
    # The answer is final: the request leaves its sampling client's completion queue, if it is in one.
    if state.completions.leave([request_id]):
        await run_in_threadpool(state.completions.flush)
    if job.status != "completed" or job.result is None:
        return JSONResponse(
            {"error": job.error or "the request failed", "category": job.error_category or "unknown"}
        )
    protobuf = wire.PROTOBUF in request.headers.get("accept", "")
    encoded = state.take_encoded(request_id) if protobuf else None  # measured for retrieve_futures
    try:
        result = encoded if encoded is not None else answer(job.op, job.run_id, job.result, protobuf)
    except EngineError as exc:
        message, category = failure(exc)
        return JSONResponse({"error": message, "category": category})
    if isinstance(result, bytes):
        return Response(result, media_type=wire.PROTOBUF)
    return JSONResponse(result)


def _try_again(request_id: str) -> JSONResponse:
    return JSONResponse({"type": "try_again", "request_id": request_id, "queue_state": "active"})


router.include_router(sessions.authed)
router.include_router(tinker_custom_loss.authed)
router.include_router(tinker_sampling.authed)
router.include_router(_authed)  # after the routes above are defined: it copies them
router.include_router(rest.authed)
router.include_router(rest.public)
router.include_router(tinker_auth.authed)
router.include_router(tinker_auth.public)
