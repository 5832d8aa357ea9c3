"""The Tinker wire API (`/api/v1/...`) so the official `tinker` SDK (0.38.0) runs unmodified.

Thin: each route translates the wire request (`tinker_wire`), calls the service, and answers with a
future (`{"request_id"}`) that `retrieve_future` long-polls. Failures reach the SDK as HTTP 200
`{"error", "category"}` (reference/tinker-wire-protocol.md §2.6, §6). Sessions, futures and sampling
sessions are bookkeeping of this facade, kept in memory on the app (`app.state.tinker`).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from eztinker.api import tinker_wire as wire
from eztinker.api.deps import OwnerDep, ServiceDep, get_owner
from eztinker.engine import TokenLoss
from eztinker.engine.errors import EngineError, InvalidInputError, NotFoundError
from eztinker.models import LoRAConfig, api
from eztinker.scheduler import Job

router = APIRouter(prefix="/api/v1", tags=["tinker"], dependencies=[Depends(get_owner)])

LONG_POLL_SECONDS = 25.0  # under the SDK's 45 s read timeout on retrieve_future
MAX_FUTURES = 100_000  # request ids remembered (oldest forgotten first)
LORA_ALPHA = 32.0

Convert = Callable[[dict[str, Any]], dict[str, Any] | bytes]


@dataclass
class _Future:
    job: Job | None
    convert: Convert
    error: tuple[str, str] | None = None  # (message, category) of a request refused before it ran


@dataclass
class _SamplingSession:
    base_model: str
    sampler_id: str | None  # None: the bare base model
    model_path: str | None = None


@dataclass
class TinkerState:
    """What this facade remembers: sessions, futures, models and sampling sessions by their wire ids."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sessions: set[str] = field(default_factory=set)
    futures: OrderedDict[str, _Future] = field(default_factory=OrderedDict)
    created: dict[tuple[str, int], tuple[str, str]] = field(default_factory=dict)  # -> (request, model)
    sampling: dict[str, _SamplingSession] = field(default_factory=dict)
    sampler_requests: dict[str, str] = field(default_factory=dict)  # sampling session -> request id
    # (run, native checkpoint name) -> what RestClient set on it: `public`, `expires_at` (Unix seconds)
    checkpoint_meta: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def add(self, future: _Future, request_id: str | None = None) -> str:
        request_id = request_id or (future.job.job_id if future.job else f"req-{uuid.uuid4().hex}")
        with self.lock:
            self.futures[request_id] = future
            while len(self.futures) > MAX_FUTURES:
                self.futures.popitem(last=False)
        return request_id


def get_state(request: Request) -> TinkerState:
    app_state = request.app.state
    if not hasattr(app_state, "tinker"):
        app_state.tinker = TinkerState()
    return app_state.tinker


StateDep = Annotated[TinkerState, Depends(get_state)]


def _json(result: dict[str, Any]) -> dict[str, Any]:
    return result


def _future(state: TinkerState, submit: Callable[[], Job], convert: Convert, **extra: Any) -> dict[str, Any]:
    """Submit an op; a request the service refuses becomes a failed future, as the SDK expects."""
    try:
        future = _Future(submit(), convert)
    except EngineError as exc:
        future = _Future(None, convert, (str(exc), exc.category))
    return {"request_id": state.add(future), **extra}


# --- bootstrap, sessions, telemetry ----------------------------------------------------------------------


@router.post("/client/config")
def client_config() -> dict[str, Any]:
    return {"pjwt_auth_enabled": False, "proto_compress_fwdbwd": True}


@router.post("/client/dynamic_config")
def client_dynamic_config() -> dict[str, Any]:
    return {}


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/get_server_capabilities")
def get_server_capabilities(service: ServiceDep) -> dict[str, Any]:
    names = dict.fromkeys([*service.settings.models, *service.health().loaded_models])
    return {"supported_models": [{"model_name": n, "trainable": True, "sampleable": True} for n in names]}


@router.post("/create_session")
def create_session(state: StateDep) -> dict[str, Any]:
    session_id = f"sess-{uuid.uuid4().hex[:12]}"
    with state.lock:
        state.sessions.add(session_id)
    return {"type": "create_session", "session_id": session_id}


@router.post("/session_heartbeat")
def session_heartbeat() -> dict[str, Any]:
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
def finish_session(session_id: str, state: StateDep) -> dict[str, Any]:
    with state.lock:
        state.sessions.discard(session_id)
    return {}


@router.post("/telemetry")
def telemetry() -> dict[str, str]:
    return {"status": "accepted"}


# --- training models -------------------------------------------------------------------------------------


@router.post("/create_model")
def create_model(
    body: dict[str, Any], service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """Create a LoRA run behind a future; a resent request (same session and model_seq_id) gets the same one."""
    key = (str(body.get("session_id")), int(body.get("model_seq_id", 0)))
    with state.lock:
        if key in state.created:
            request_id, model_id = state.created[key]
            return {"request_id": request_id, "model_id": model_id}
    model_id = wire.model_id(*key)
    lora = body.get("lora_config") or {}
    base_model = str(body.get("base_model"))

    def work() -> dict[str, Any]:
        targets = wire.lora_target_modules(
            service.default_lora_targets(base_model),
            attn=lora.get("train_attn", True),
            mlp=lora.get("train_mlp", True),
        )
        config = LoRAConfig(
            r=int(lora.get("rank", 32)), lora_alpha=LORA_ALPHA, seed=lora.get("seed"), target_modules=targets
        )
        service.create_run(
            api.CreateRunRequest(base_model=base_model, lora_config=config, run_id=model_id), owner
        )
        return {"model_id": model_id, "type": "create_model"}

    answer = _future(state, lambda: service.submit("create_run", None, work, owner), _json, model_id=model_id)
    with state.lock:
        state.created[key] = (answer["request_id"], model_id)
    return answer


@router.post("/get_info")
def get_info(body: dict[str, Any], service: ServiceDep, owner: OwnerDep) -> dict[str, Any]:
    run = service.get_run(str(body.get("model_id")), owner)
    return {
        "type": "get_info",
        "model_id": run.run_id,
        "model_data": {"model_name": run.base_model, "tokenizer_id": run.base_model},
        "is_lora": True,
        "lora_rank": run.lora_config.r,
        "model_name": run.base_model,
    }


@router.post("/forward_backward")
async def forward_backward(request: Request, service: ServiceDep, owner: OwnerDep, state: StateDep) -> Any:
    """`forward_backward`, or `forward` when `forward_only`: a protobuf body; a protobuf result."""
    body = await request.body()
    try:
        call = wire.decode_forward_backward(body, request.headers.get("content-encoding"))
    except InvalidInputError as exc:
        return {"request_id": state.add(_Future(None, _json, (str(exc), "user")))}

    def submit() -> Job:
        loss = TokenLoss(call.loss_fn, call.loss_fn_config)
        return service.forward_backward_data(
            call.model_id, call.data, loss, owner, backward=not call.forward_only
        )

    def convert(result: dict[str, Any]) -> bytes:
        return wire.encode_forward_backward_output(result["logprobs"], result["metrics"])

    return await run_in_threadpool(_future, state, submit, convert, model_id=call.model_id)


@router.post("/optim_step")
def optim_step(body: dict[str, Any], service: ServiceDep, owner: OwnerDep, state: StateDep) -> dict[str, Any]:
    model_id = str(body.get("model_id"))
    adam = body.get("adam_params") or {}
    params = api.OptimStepRequest(**{k: v for k, v in adam.items() if k in api.OptimStepRequest.model_fields})

    def convert(result: dict[str, Any]) -> dict[str, Any]:
        return {
            "metrics": {
                "grad_norm:mean": result["grad_norm"],
                "learning_rate:mean": result["learning_rate"],
                "step:max": float(result["step"]),
            }
        }

    return _future(state, lambda: service.optim_step(model_id, params, owner), convert, model_id=model_id)


# --- checkpoints -----------------------------------------------------------------------------------------


@router.post("/save_weights")
def save_weights(
    body: dict[str, Any], service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """`save_state`: adapter + optimizer state, as `tinker://<run>/weights/<name>`."""
    model_id = str(body.get("model_id"))
    name = str(body.get("path") or f"ckpt-{uuid.uuid4().hex[:8]}")

    def submit() -> Job:
        return service.save(model_id, api.SaveRequest(name=wire.check_name(name), kind="state"), owner)

    path = wire.tinker_path(model_id, "weights", name)
    return _future(state, submit, lambda _: {"type": "save_weights", "path": path}, model_id=model_id)


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(
    body: dict[str, Any], service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """With `path`: a weights checkpoint. Without: a sampler snapshot named by a new sampling session."""
    model_id = str(body.get("model_id"))
    name = body.get("path")
    if name:
        native = wire.native_checkpoint_name("sampler_weights", str(name))

        def save() -> Job:
            wire.check_name(str(name))
            return service.save(model_id, api.SaveRequest(name=native, kind="weights"), owner)

        path = wire.tinker_path(model_id, "sampler_weights", str(name))
        return _future(
            state, save, lambda _: {"type": "save_weights_for_sampler", "path": path}, model_id=model_id
        )

    session = model_id.split(":train:")[0] if ":train:" in model_id else model_id
    sampler_id = wire.sampling_session_id(session, int(body.get("sampling_session_seq_id", 0)))
    with state.lock:
        if sampler_id in state.sampler_requests:
            return {"request_id": state.sampler_requests[sampler_id], "model_id": model_id}

    def snapshot(result: dict[str, Any]) -> dict[str, Any]:
        with state.lock:
            state.sampling[sampler_id] = _SamplingSession(result["base_model"], sampler_id)
        return {"type": "save_weights_for_sampler", "sampling_session_id": sampler_id}

    answer = _future(
        state, lambda: service.save_sampler(model_id, sampler_id, owner), snapshot, model_id=model_id
    )
    with state.lock:
        state.sampler_requests[sampler_id] = answer["request_id"]
    return answer


@router.post("/load_weights")
def load_weights(
    body: dict[str, Any], service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """`load_state*` into a model, or create a model from a checkpoint (no `model_id`: create-via-load)."""
    path = str(body.get("path"))
    optimizer = bool(body.get("optimizer", False))
    model_id = body.get("model_id") or wire.model_id(
        str(body.get("session_id")), int(body.get("model_seq_id", 0))
    )
    answer = {"type": "load_weights", "path": path, "model_id": model_id}

    def submit() -> Job:
        source_run, name, _ = wire.parse_tinker_path(path)
        if body.get("model_id"):
            request = api.LoadRequest(name=name, source_run_id=source_run, with_optimizer=optimizer)
            return service.load(model_id, request, owner)
        base_model = service.get_run(source_run, owner).base_model
        create = api.CreateRunRequest(
            base_model=base_model,
            run_id=model_id,
            from_checkpoint=api.CheckpointRef(run_id=source_run, name=name),
        )
        return service.submit(
            "create_run", None, lambda: service.create_run(create, owner).model_dump(), owner
        )

    return _future(state, submit, lambda _: answer, model_id=model_id)


# --- sampling ----------------------------------------------------------------------------------------------


@router.post("/create_sampling_session")
def create_sampling_session(
    body: dict[str, Any], service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """A sampling session on a base model, or on a checkpoint (`model_path`, loaded as a snapshot)."""
    sampler_id = wire.sampling_session_id(
        str(body.get("session_id")), int(body.get("sampling_session_seq_id", 0))
    )
    with state.lock:
        known = sampler_id in state.sampling
    if not known:
        model_path = body.get("model_path")
        if model_path:
            run_id, name, _ = wire.parse_tinker_path(str(model_path))
            base = service.sampler_from_checkpoint(run_id, name, sampler_id, owner)
            session = _SamplingSession(base, sampler_id, str(model_path))
        else:
            session = _SamplingSession(str(body.get("base_model") or service.default_base_model()), None)
        with state.lock:
            state.sampling[sampler_id] = session
    return {"type": "create_sampling_session", "sampling_session_id": sampler_id}


def _sampling_session(state: TinkerState, service: Any, sampler_id: str) -> _SamplingSession:
    with state.lock:
        session = state.sampling.get(sampler_id)
    if session is None:
        base = service.sampler_base_model(sampler_id)
        if base is None:
            raise NotFoundError(f"no sampling session {sampler_id!r}")
        session = _SamplingSession(base, sampler_id)
    return session


@router.get("/samplers/{sampler_id:path}")
def get_sampler(sampler_id: str, service: ServiceDep, state: StateDep) -> dict[str, Any]:
    session = _sampling_session(state, service, sampler_id)
    return {"sampler_id": sampler_id, "base_model": session.base_model, "model_path": session.model_path}


@router.post("/asample")
def asample(body: dict[str, Any], service: ServiceDep, owner: OwnerDep, state: StateDep) -> dict[str, Any]:
    """`sample` and `compute_logprobs`: a future with one sequence id per sample; a protobuf result."""
    sampler_id = str(body.get("sampling_session_id"))
    num_samples = int(body.get("num_samples", 1))
    seq_id = body.get("seq_id", 0)

    def submit() -> Job:
        session = _sampling_session(state, service, sampler_id)
        return service.sample_tokens(
            wire.prompt_tokens(body.get("prompt") or {}),
            wire.sampling_params(body.get("sampling_params") or {}),
            owner,
            num_samples=num_samples,
            sampler_id=session.sampler_id,
            base_model=session.base_model if session.sampler_id is None else None,
            prompt_logprobs=bool(body.get("prompt_logprobs", False)),
        )

    ids = [f"{sampler_id}:{seq_id}:{i}" for i in range(num_samples)]
    return _future(state, submit, wire.encode_sample_response, sample_sequence_ids=ids)


# --- REST (RestClient): training runs and checkpoints ------------------------------------------------------

TTL_RANGE = (3600, 10 * 365 * 24 * 3600)  # seconds, as the SDK documents for set_checkpoint_ttl
ARCHIVE_URL_SECONDS = 3600


def _rest_checkpoints(state: TinkerState, checkpoints: list[api.Checkpoint]) -> list[dict[str, Any]]:
    with state.lock:
        metas = [state.checkpoint_meta.get((c.run_id, c.name)) for c in checkpoints]
    return [
        wire.rest_checkpoint(c.run_id, c.name, c.created_at, c.size_bytes, meta)
        for c, meta in zip(checkpoints, metas, strict=True)
    ]


def _training_run(service: Any, state: TinkerState, run: api.Run, owner: str | None) -> dict[str, Any]:
    checkpoints = _rest_checkpoints(state, service.list_checkpoints(run.run_id, owner))
    return wire.rest_training_run(
        run.run_id, run.base_model, owner, run.lora_config.r, run.updated_at or run.created_at, checkpoints
    )


@router.get("/training_runs")
def list_training_runs(
    service: ServiceDep,
    owner: OwnerDep,
    state: StateDep,
    limit: Annotated[int, Query(ge=0)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    runs = service.list_runs(owner)
    page = [_training_run(service, state, r, owner) for r in runs[offset : offset + limit]]
    return {"training_runs": page, "cursor": wire.cursor(offset, limit, len(runs))}


@router.get("/training_runs/{run_id}")
def get_training_run(run_id: str, service: ServiceDep, owner: OwnerDep, state: StateDep) -> dict[str, Any]:
    return _training_run(service, state, service.get_run(run_id, owner), owner)


@router.get("/training_runs/{run_id}/checkpoints")
def list_run_checkpoints(
    run_id: str, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    return {"checkpoints": _rest_checkpoints(state, service.list_checkpoints(run_id, owner))}


@router.get("/checkpoints")
def list_user_checkpoints(
    service: ServiceDep,
    owner: OwnerDep,
    state: StateDep,
    limit: Annotated[int, Query(ge=0)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    checkpoints = service.list_checkpoints(None, owner)
    page = _rest_checkpoints(state, checkpoints[offset : offset + limit])
    return {"checkpoints": page, "cursor": wire.cursor(offset, limit, len(checkpoints))}


@router.post("/weights_info")
def weights_info(body: dict[str, Any], service: ServiceDep, owner: OwnerDep) -> dict[str, Any]:
    run_id, name, _ = wire.parse_tinker_path(str(body.get("tinker_path")))
    run = service.get_run(run_id, owner)
    if name not in {c.name for c in service.list_checkpoints(run_id, owner)}:
        raise NotFoundError(f"run {run_id!r} has no checkpoint {body.get('tinker_path')!r}")
    every_layer = run.lora_config.target_modules in (None, "all-linear")
    return {
        "base_model": run.base_model,
        "is_lora": True,
        "lora_rank": run.lora_config.r,
        "train_unembed": False,
        "train_attn": True if every_layer else None,  # None: a custom target list, not classified here
        "train_mlp": True if every_layer else None,
    }


# `checkpoint_id` is `<kind>/<name>`, with a slash: these routes take it as a `path` parameter, so the ones
# with a suffix (`/publish`, `/ttl`, `/archive`) come before the bare one.
_CHECKPOINT = "/training_runs/{run_id}/checkpoints/{checkpoint_id:path}"


def _checkpoint_key(run_id: str, checkpoint_id: str, service: Any, owner: str | None) -> tuple[str, str]:
    """(run, native name) of an existing checkpoint of the caller's."""
    name, path = wire.parse_checkpoint_id(run_id, checkpoint_id)
    if name not in {c.name for c in service.list_checkpoints(run_id, owner)}:
        raise NotFoundError(f"no checkpoint {path!r}")
    return run_id, name


def _set_meta(state: TinkerState, key: tuple[str, str], **values: Any) -> None:
    with state.lock:
        state.checkpoint_meta.setdefault(key, {}).update(values)


@router.post(_CHECKPOINT + "/publish")
def publish_checkpoint(
    run_id: str, checkpoint_id: str, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> None:
    """Marks the checkpoint public (local metadata: this server has no other users' access control)."""
    _set_meta(state, _checkpoint_key(run_id, checkpoint_id, service, owner), public=True)


@router.delete(_CHECKPOINT + "/publish")
def unpublish_checkpoint(
    run_id: str, checkpoint_id: str, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> None:
    _set_meta(state, _checkpoint_key(run_id, checkpoint_id, service, owner), public=False)


@router.put(_CHECKPOINT + "/ttl")
def set_checkpoint_ttl(
    run_id: str,
    checkpoint_id: str,
    body: dict[str, Any],
    service: ServiceDep,
    owner: OwnerDep,
    state: StateDep,
) -> None:
    """Records when the checkpoint expires (reported as `expires_at`; nothing deletes it automatically)."""
    key = _checkpoint_key(run_id, checkpoint_id, service, owner)
    ttl = body.get("ttl_seconds")
    if ttl is not None and not (isinstance(ttl, int) and TTL_RANGE[0] <= ttl <= TTL_RANGE[1]):
        raise InvalidInputError("ttl_seconds", f"must be null or {TTL_RANGE[0]}..{TTL_RANGE[1]} seconds")
    _set_meta(state, key, expires_at=None if ttl is None else time.time() + ttl)


@router.get(_CHECKPOINT + "/archive")
def checkpoint_archive_url(
    run_id: str, checkpoint_id: str, request: Request, service: ServiceDep, owner: OwnerDep
) -> dict[str, Any]:
    """Where to download the checkpoint as a .tar.gz: the native archive route of this server (same API key)."""
    _, name = _checkpoint_key(run_id, checkpoint_id, service, owner)
    url = request.url_for("download_checkpoint", run_id=run_id, name=name)
    return {"url": str(url), "expires": wire.iso_time(time.time() + ARCHIVE_URL_SECONDS)}


@router.delete(_CHECKPOINT)
def delete_checkpoint(
    run_id: str, checkpoint_id: str, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> None:
    key = _checkpoint_key(run_id, checkpoint_id, service, owner)
    service.delete_checkpoint(*key, owner)
    with state.lock:
        state.checkpoint_meta.pop(key, None)


# --- futures -----------------------------------------------------------------------------------------------


@router.post("/retrieve_future")
async def retrieve_future(body: dict[str, Any], state: StateDep) -> Response:
    """Long-poll a future: its result, `try_again` after ~25 s, or a 200 `{"error", "category"}`."""
    request_id = str(body.get("request_id"))
    with state.lock:
        future = state.futures.get(request_id)
    if future is None:
        return JSONResponse({"error": f"unknown request {request_id!r}", "category": "user"}, status_code=410)
    if future.error is not None:
        return JSONResponse({"error": future.error[0], "category": future.error[1]})
    job = future.job
    assert job is not None
    if not await job.wait(LONG_POLL_SECONDS):
        return JSONResponse({"type": "try_again", "request_id": request_id, "queue_state": "active"})
    if job.status == "failed" or job.result is None:
        return JSONResponse(
            {"error": job.error or "the request failed", "category": job.error_category or "unknown"}
        )
    try:
        result = future.convert(job.result)
    except EngineError as exc:
        return JSONResponse({"error": str(exc), "category": exc.category})
    if isinstance(result, bytes):
        return Response(result, media_type=wire.PROTOBUF)
    return JSONResponse(result)
