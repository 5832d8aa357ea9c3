"""The Tinker wire API (`/api/v1/...`) so the official `tinker` SDK (0.38.0) runs unmodified.

Thin: each route translates the wire request (`tinker_wire`), calls the service, and answers with a
future (`{"request_id"}`) that `retrieve_future` long-polls. Failures reach the SDK as HTTP 200
`{"error", "category"}` (reference/tinker-wire-protocol.md §2.6, §6).

What this facade keeps, and why:
- **Futures are jobs.** A request id is its job's id, so an answer is derived from the job's op and
  result alone (`_answer`): after a restart the store still has every finished job, and a request that
  was in flight is reported failed with the reason — never a 410 "promise lost".
- **A model's training ops run in `seq_id` order**, not arrival order (`_Sequencer`): the SDK sends the
  chunks of one `forward_backward` concurrently with the first one last. An op that arrives early is
  held (its POST answered at once) until the gap fills, for at most `SEQ_GAP_WAIT_SECONDS`.
- **Retries are idempotent.** A resent op (same model and `seq_id`; same session and `model_seq_id` for
  `create_model`; same sampler and `seq_id` for `asample`) gets the first one's future.
- **Sessions, sampling sessions and checkpoint metadata are durable** (`FacadeState`, in the server's
  database): session listing, a `SamplingClient` on a checkpoint, and `public`/TTL survive a restart.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from eztinker.api import tinker_bodies as bodies
from eztinker.api import tinker_wire as wire
from eztinker.api.deps import OwnerDep, ServiceDep, get_owner
from eztinker.api.native import while_connected
from eztinker.engine import TokenLoss
from eztinker.engine.checkpoint import parse_age_recipients
from eztinker.engine.errors import EngineError, InvalidInputError, NotFoundError
from eztinker.engine.optimizers import optimizer_config
from eztinker.models import LoRAConfig, api
from eztinker.scheduler import Job
from eztinker.service import Service
from eztinker.store.facade import FacadeRecord, FacadeState

router = APIRouter(prefix="/api/v1", tags=["tinker"])  # public routes; the rest need the API key
_authed = APIRouter(dependencies=[Depends(get_owner)])

LONG_POLL_SECONDS = 25.0  # under the SDK's 45 s read timeout on retrieve_future
MAX_FUTURES = 100_000  # request ids remembered in memory (oldest forgotten first; jobs stay in the store)
SEQ_GAP_WAIT_SECONDS = 2.0  # how long an op that arrived early waits for the ops before it
LORA_ALPHA = 32.0
SDK_VERSIONS = "0.24 - 0.38 (tested: 0.38.0 in the suite, 0.24.0 by hand; 0.24 sends JSON forward_backward bodies)"

# FacadeState namespaces
SESSIONS, SAMPLERS, CHECKPOINT_META, FUTURES, SECRETS = "session", "sampler", "ckpt_meta", "future", "secret"
RUN_META = "run_meta"  # a training run's `user_metadata`

Convert = Callable[[dict[str, Any]], dict[str, Any] | bytes]


@dataclass
class _Future:
    """A request id's answer: its job (once submitted), or the error that refused it before it ran.

    `owner` is the key that sent the request: only it can retrieve the answer (`retrieve_future`).
    """

    owner: str | None
    job: Job | None = None
    record: api.Job | None = None  # a job finished before this process started (read from the store)
    error: tuple[str, str] | None = None  # (message, category)
    submitted: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)

    def settle(self, job: Job | None = None, error: tuple[str, str] | None = None) -> None:
        self.job, self.error = job, error
        self.submitted.set_result(None)


@dataclass
class _Sequencer:
    """One model's training ops, submitted in `seq_id` order; early ones wait in `held`."""

    next_seq: int | None = None  # None: not known yet (the first op seen sets it)
    held: dict[int, tuple[_Future, str, Callable[[], Job]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one submission at a time
    timer: threading.Timer | None = None


@dataclass
class TinkerState:
    """What this facade remembers in memory (the durable part is in `durable`)."""

    service: Service
    durable: FacadeState
    lock: threading.Lock = field(default_factory=threading.Lock)
    futures: OrderedDict[str, _Future] = field(default_factory=OrderedDict)
    answers: OrderedDict[tuple[str, ...], dict[str, Any]] = field(default_factory=OrderedDict)  # retries
    sequencers: dict[tuple[str, ...], _Sequencer] = field(default_factory=dict)  # by (owner, model)

    def add(self, future: _Future, request_id: str) -> str:
        with self.lock:
            self.futures[request_id] = future
            while len(self.futures) > MAX_FUTURES:
                self.futures.popitem(last=False)
        return request_id

    def remember(self, key: tuple[str, ...], answer: dict[str, Any]) -> dict[str, Any]:
        """Keep `answer` for a resent request with the same `key` (under `lock`)."""
        self.answers[key] = answer
        while len(self.answers) > MAX_FUTURES:
            self.answers.popitem(last=False)
        return answer


_state_lock = threading.Lock()


def get_state(request: Request) -> TinkerState:
    app_state = request.app.state
    if not hasattr(app_state, "tinker"):
        with _state_lock:
            if not hasattr(app_state, "tinker"):
                service: Service = app_state.service
                app_state.tinker = TinkerState(service, FacadeState(service.store))
    return app_state.tinker


StateDep = Annotated[TinkerState, Depends(get_state)]


# --- submitting ops -----------------------------------------------------------------------------------


def _submit(state: TinkerState, owner: str | None, submit: Callable[[], Job], **extra: Any) -> dict[str, Any]:
    """Submit an op now; a request the service refuses becomes a failed future, as the SDK expects."""
    future = _Future(owner)
    try:
        job = submit()
    except EngineError as exc:
        future.settle(error=(str(exc), exc.category))
        return {"request_id": state.add(future, f"req-{uuid.uuid4().hex}"), **extra}
    future.settle(job)
    return {"request_id": state.add(future, job.job_id), **extra}


def _refused(state: TinkerState, owner: str | None, message: str, **extra: Any) -> dict[str, Any]:
    """A request refused before it became an op: a future that settles at once with a user error."""
    future = _Future(owner)
    future.settle(error=(message, "user"))
    return {"request_id": state.add(future, f"req-{uuid.uuid4().hex}"), **extra}


def _ordered(
    state: TinkerState, owner: str | None, model_id: str, seq_id: int | None, submit: Callable[[], Job]
) -> dict[str, Any]:
    """Submit a training op of `model_id` in `seq_id` order (see the module docstring); idempotent.

    Sequencers and retry answers are the caller's own: another key's ops never take a place in them.
    """
    if not seq_id:
        return _submit(state, owner, submit, model_id=model_id)
    key = state.service.access.key(owner, "op", model_id, str(seq_id))
    with state.lock:
        seq = state.sequencers.setdefault(state.service.access.key(owner, model_id), _Sequencer())
    with seq.lock:
        with state.lock:
            if key in state.answers:  # a resent request: the first one's future
                return state.answers[key]
            if seq.next_seq is None:
                seq.next_seq = seq_id
            early = seq_id > seq.next_seq
        if early:
            future = _Future(owner)
            request_id = state.add(future, f"req-{uuid.uuid4().hex}")
            seq.held[seq_id] = (future, request_id, submit)
            if seq.timer is None:
                _arm(state, seq)
            answer = {"request_id": request_id, "model_id": model_id}
        else:
            answer = _submit(state, owner, submit, model_id=model_id)
            seq.next_seq = max(seq.next_seq, seq_id + 1)
            _flush(state, seq)
        with state.lock:
            return state.remember(key, answer)


def _flush(state: TinkerState, seq: _Sequencer) -> None:
    """Submit the held ops that are now next in order (caller holds `seq.lock`)."""
    assert seq.next_seq is not None
    while seq.next_seq in seq.held:
        future, request_id, submit = seq.held.pop(seq.next_seq)
        _settle_held(state, future, request_id, submit)
        seq.next_seq += 1
    if not seq.held and seq.timer is not None:
        seq.timer.cancel()
        seq.timer = None


def _settle_held(state: TinkerState, future: _Future, request_id: str, submit: Callable[[], Job]) -> None:
    try:
        job = submit()
    except EngineError as exc:
        future.settle(error=(str(exc), exc.category))
        return
    except Exception as exc:  # e.g. a full queue: the op's POST was answered long ago, so fail its future
        future.settle(error=(f"{type(exc).__name__}: {exc}", "server"))
        return
    future.settle(job)
    # The request id is not the job's id: remember which job answers it, for after a restart.
    state.durable.put(FUTURES, request_id, {"job_id": job.job_id}, owner=job.owner)


def _arm(state: TinkerState, seq: _Sequencer) -> None:
    """After the bounded wait, give up on the gap: submit what is held, in order, from the lowest."""

    def give_up() -> None:
        with seq.lock:
            seq.timer = None
            if seq.held:
                seq.next_seq = min(seq.held)
                _flush(state, seq)
            if seq.held:  # a second gap further on: wait for it too
                _arm(state, seq)

    seq.timer = threading.Timer(SEQ_GAP_WAIT_SECONDS, give_up)
    seq.timer.daemon = True
    seq.timer.start()


def _expect(state: TinkerState, owner: str | None, model_id: str, next_seq: int) -> None:
    """A new model's first op will carry `next_seq`."""
    with state.lock:
        state.sequencers[state.service.access.key(owner, model_id)] = _Sequencer(next_seq=next_seq)


# --- answers ------------------------------------------------------------------------------------------


def _answer(op: str, run_id: str | None, result: dict[str, Any], protobuf: bool) -> dict[str, Any] | bytes:
    """The wire answer of a finished job, from its op and result alone (so it survives a restart).

    `protobuf`: the caller accepts protobuf (SDK 0.25+); older SDKs get the JSON forms.
    """
    if op in ("forward_backward", "forward"):
        if protobuf:
            return wire.encode_forward_backward_output(result["logprobs"], result["metrics"])
        return wire.forward_backward_output_json(result["logprobs"], result["metrics"])
    if op == "sample":
        return wire.encode_sample_response(result) if protobuf else wire.sample_response_json(result)
    if op == "optim_step":
        metrics = {
            "grad_norm:mean": result["grad_norm"],
            "learning_rate:mean": result["learning_rate"],
            "step:max": float(result["step"]),
        }
        return {"metrics": metrics}
    if op == "save" and run_id is not None:
        answer: dict[str, Any] = {"path": wire.tinker_path_of(run_id, result["name"])}
        if result["name"].startswith("external_weights."):
            answer["size_bytes"] = result.get("size_bytes")
        return answer
    if op == "save_sampler":
        return {"type": "save_weights_for_sampler", "sampling_session_id": result["sampler_id"]}
    if op == "load":
        return {"type": "load_weights", "model_id": run_id}
    if op == "create_run" and "model_id" not in result:  # create-via-load
        return {"type": "load_weights", "model_id": result["run_id"]}
    return result


# --- bootstrap, sessions, telemetry ----------------------------------------------------------------------


@_authed.post("/client/config")
def client_config() -> dict[str, Any]:
    return {"pjwt_auth_enabled": False, "proto_compress_fwdbwd": True}


@_authed.post("/client/dynamic_config")
def client_dynamic_config() -> dict[str, Any]:
    return {}


@_authed.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@_authed.get("/get_server_capabilities")
def get_server_capabilities(service: ServiceDep) -> dict[str, Any]:
    names = dict.fromkeys([*service.settings.models, *service.health().loaded_models])
    return {"supported_models": [{"model_name": n, "trainable": True, "sampleable": True} for n in names]}


@_authed.post("/create_session")
def create_session(body: bodies.CreateSession, owner: OwnerDep, state: StateDep) -> dict[str, Any]:
    session_id = f"sess-{uuid.uuid4().hex[:12]}"
    state.durable.put(SESSIONS, session_id, {**body.model_dump(), "status": "active"}, owner=owner)
    return {"type": "create_session", "session_id": session_id}


@_authed.post("/session_heartbeat")
def session_heartbeat() -> dict[str, Any]:
    return {"type": "session_heartbeat"}


@_authed.post("/sessions/{session_id}/finish")
def finish_session(
    session_id: str, body: bodies.FinishSession, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    _session(state, session_id, owner)
    reason = body.reason.type if body.reason is not None else None
    state.durable.update(SESSIONS, session_id, status=reason or "finished", finished_at=time.time())
    return {}


@_authed.post("/telemetry")
def telemetry() -> dict[str, str]:
    return {"status": "accepted"}


def _session(state: TinkerState, session_id: str, owner: str | None) -> FacadeRecord:
    """The caller's session `session_id` (another key's is answered as missing)."""
    record = state.durable.get(SESSIONS, session_id)
    if record is None:
        raise NotFoundError(f"no session {session_id!r}")
    state.service.access.require(record.owner, owner, f"no session {session_id!r}")
    return record


def _check_session_of_new_object(state: TinkerState, session_id: str, owner: str | None) -> None:
    """A model or sampling session named after `session_id` may be made only in the caller's session
    (or in one this server never created: SDKs before 0.16 sent no `create_session`)."""
    if state.durable.get(SESSIONS, session_id) is not None:
        _session(state, session_id, owner)


@_authed.get("/sessions")
def list_sessions(
    service: ServiceDep,
    owner: OwnerDep,
    state: StateDep,
    limit: Annotated[int, Query(ge=0)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    """The caller's session ids, newest first."""
    records = state.durable.records(SESSIONS, owner=owner, include_all=not service.auth_enabled)
    ids = [r.key for r in reversed(records)]
    return {"sessions": ids[offset : offset + limit]}


@_authed.get("/sessions/{session_id}")
def get_session(session_id: str, service: ServiceDep, owner: OwnerDep, state: StateDep) -> dict[str, Any]:
    """A session's training runs (`<session>:train:<n>`) and samplers (`<session>:sample:<n>`)."""
    record = _session(state, session_id, owner)
    runs = [r.run_id for r in service.list_runs(owner) if r.run_id.startswith(f"{session_id}:train:")]
    samplers = state.durable.records(
        SAMPLERS, owner=owner, include_all=not service.auth_enabled, prefix=f"{session_id}:sample:"
    )
    return {
        "training_run_ids": runs,
        "sampler_ids": [s.key for s in samplers],
        "user_metadata": record.value.get("user_metadata") or None,
        "display_name": record.value.get("display_name"),
    }


@_authed.put("/sessions/{session_id}/project")
def assign_session_project(
    session_id: str, body: bodies.AssignProject, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    _session(state, session_id, owner)
    state.durable.update(SESSIONS, session_id, project_id=body.project_id)
    return {}


# --- training models -------------------------------------------------------------------------------------


@_authed.post("/create_model")
def create_model(
    body: bodies.CreateModel, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """Create a LoRA run behind a future; a resent request (same session and model_seq_id) gets the same one."""
    session_id, model_seq_id = body.session_id, body.model_seq_id
    key = service.access.key(owner, "create", session_id, str(model_seq_id))
    model_id = wire.model_id(session_id, model_seq_id)
    with state.lock:
        if key in state.answers:
            return state.answers[key]
    _check_session_of_new_object(state, session_id, owner)
    lora, base_model = body.lora_config, body.base_model
    try:  # an optimizer this server does not have is refused, never trained as another
        optimizer = wire.optimizer_from_config(body.optimizer_config)
    except InvalidInputError as exc:
        return _refused(state, owner, str(exc), model_id=model_id)

    def work() -> dict[str, Any]:
        head = service.output_head_name(base_model) if lora.train_unembed else None
        targets = wire.lora_target_modules(
            service.default_lora_targets(base_model), attn=lora.train_attn, mlp=lora.train_mlp, head=head
        )
        config = LoRAConfig(r=lora.rank, lora_alpha=LORA_ALPHA, seed=lora.seed, target_modules=targets)
        service.create_run(
            api.CreateRunRequest(
                base_model=base_model, lora_config=config, run_id=model_id, optimizer=optimizer
            ),
            owner,
        )
        _keep_run_metadata(state, model_id, body.user_metadata, owner)
        return {"model_id": model_id, "type": "create_model"}

    _expect(state, owner, model_id, 1)
    answer = _submit(state, owner, lambda: service.submit("create_run", None, work, owner), model_id=model_id)
    with state.lock:
        return state.remember(key, answer)


def _trains_head(run: api.Run) -> bool:
    targets = run.lora_config.target_modules
    return isinstance(targets, list) and any(
        t.rsplit(".", 1)[-1] in ("lm_head", "embed_out") for t in targets
    )


@_authed.post("/get_info")
def get_info(body: bodies.ModelRef, service: ServiceDep, owner: OwnerDep) -> dict[str, Any]:
    run = service.get_run(body.model_id, owner)
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
            call = wire.decode_forward_backward(body, request.headers.get("content-encoding"))
    except InvalidInputError as exc:
        return _refused(state, owner, str(exc))

    def submit() -> Job:
        loss = TokenLoss(call.loss_fn, call.loss_fn_config)
        return service.forward_backward_data(
            call.model_id, call.data, loss, owner, backward=not call.forward_only
        )

    return await run_in_threadpool(_ordered, state, owner, call.model_id, call.seq_id, submit)


def _json_body(body: bytes) -> dict[str, Any]:
    import json

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

    def submit() -> Job:
        return service.optim_step_params(model_id, wire.optim_params(params), owner)

    return _ordered(state, owner, model_id, body.seq_id, submit)


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
    if body.overwrite if isinstance(body, bodies.SaveWeights) else False:
        message = "overwrite: replacing a checkpoint is not served yet; save under a new name"
        return _refused(state, owner, message, model_id=model_id)
    user_metadata = body.user_metadata if isinstance(body, bodies.SaveWeights) else None

    def submit() -> Job:
        wire.check_name(name)
        if ttl is not None:
            _check_ttl(ttl)
        if export.get("age_recipients") is not None:  # refused naming the wire's field
            parse_age_recipients(export["age_recipients"], field="age_encryption_recipients")
        job = service.save(model_id, api.SaveRequest(name=native, kind=native_kind), owner, **export)
        meta = {
            **({"expires_at": time.time() + ttl} if ttl is not None else {}),
            **({"user_metadata": user_metadata} if user_metadata is not None else {}),
        }
        if meta:
            _set_meta(state, f"{model_id}/{native}", owner, **meta)
        return job

    return _ordered(state, owner, model_id, body.seq_id, submit)


@_authed.post("/save_weights_for_sampler")
def save_weights_for_sampler(
    body: bodies.SaveWeightsForSampler, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """With `path`: a weights checkpoint. Without: a sampler snapshot named by a new sampling session.

    Only `kind="snapshot"` (fixed weights) is served; `inflight` (weights that follow later saves) is
    refused rather than served as a snapshot, which would sample other weights than asked.
    """
    model_id = body.model_id
    if body.kind != "snapshot":
        message = f"kind: {body.kind!r} sampling clients are not served yet; use kind='snapshot'"
        return _refused(state, owner, message, model_id=model_id)
    if body.path:
        return _save(state, service, owner, body, "sampler_weights", body.path, "weights")
    session = model_id.split(":train:")[0] if ":train:" in model_id else model_id
    sampler_id = wire.sampling_session_id(session, body.sampling_session_seq_id or 0)

    def submit() -> Job:
        job = service.save_sampler(model_id, sampler_id, owner)
        base = service.get_run(model_id, owner).base_model
        state.durable.put(SAMPLERS, sampler_id, {"base_model": base, "source_run": model_id}, owner=owner)
        return job

    return _ordered(state, owner, model_id, body.seq_id, submit)


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
            source_run, name, _ = wire.parse_tinker_path(path)
            chosen = wire.optimizer_from_config(body.optimizer_config)
            if chosen is not None and chosen != service.run_optimizer(model_id):
                raise InvalidInputError(
                    "optimizer_config", f"cannot change the optimizer of existing model {model_id!r}"
                )
            request = api.LoadRequest(name=name, source_run_id=source_run, with_optimizer=optimizer)
            return service.load(model_id, request, owner)

        return _ordered(state, owner, model_id, body.seq_id, load)

    if not body.session_id:
        raise InvalidInputError("session_id", "is required to create a model from a checkpoint")
    session_id, model_seq_id = body.session_id, body.model_seq_id
    model_id = wire.model_id(session_id, model_seq_id)
    key = service.access.key(owner, "create", session_id, str(model_seq_id))
    with state.lock:
        if key in state.answers:
            return state.answers[key]
    _check_session_of_new_object(state, session_id, owner)

    def create() -> Job:
        source_run, name, _ = wire.parse_tinker_path(path)
        chosen = wire.optimizer_from_config(body.optimizer_config)
        base_model = service.get_run(source_run, owner).base_model
        # `optimizer` true (…_with_optimizer): weights and optimizer state, whose optimizer the model keeps;
        # false (create_training_client_from_state): the weights only, and a fresh optimizer (AdamW by default).
        request = api.CreateRunRequest(
            base_model=base_model,
            run_id=model_id,
            from_checkpoint=api.CheckpointRef(run_id=source_run, name=name, with_optimizer=optimizer),
            optimizer=chosen if chosen is not None or optimizer else "adamw",
        )

        def work() -> dict[str, Any]:
            created = service.create_run(request, owner).model_dump()
            _keep_run_metadata(state, model_id, body.user_metadata, owner)
            return created

        return service.submit("create_run", None, work, owner)

    _expect(state, owner, model_id, 1)  # the load is the model's op 0
    answer = _submit(state, owner, create, model_id=model_id)
    with state.lock:
        return state.remember(key, answer)


# --- sampling ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SamplingSession:
    base_model: str
    sampler_id: str | None  # None: the bare base model
    model_path: str | None = None


@_authed.post("/create_sampling_session")
def create_sampling_session(
    body: bodies.CreateSamplingSession, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """A sampling session on a base model, or on a checkpoint (`model_path`, loaded as a snapshot)."""
    sampler_id = wire.sampling_session_id(body.session_id, body.sampling_session_seq_id)
    _check_session_of_new_object(state, body.session_id, owner)
    existing = state.durable.get(SAMPLERS, sampler_id)
    if existing is not None:
        service.access.require(existing.owner, owner, f"no sampling session {sampler_id!r}")
    else:
        if body.model_path:
            run_id, name, _ = wire.parse_tinker_path(body.model_path)
            base = service.sampler_from_checkpoint(run_id, name, sampler_id, owner)
            value = {"base_model": base, "model_path": body.model_path}
        else:
            value = {"base_model": body.base_model or service.default_base_model()}
        state.durable.put(SAMPLERS, sampler_id, value, owner=owner)
    return {"type": "create_sampling_session", "sampling_session_id": sampler_id}


def _sampling_session(
    state: TinkerState, service: Service, sampler_id: str, owner: str | None
) -> _SamplingSession:
    """Which weights `sampler_id` samples; a checkpoint's snapshot is loaded again after a restart."""
    record = state.durable.get(SAMPLERS, sampler_id)
    if record is not None:
        service.access.require(record.owner, owner, f"no sampling session {sampler_id!r}")
    live_base = service.sampler_base_model(sampler_id, owner)
    if record is None:
        if live_base is None:
            raise NotFoundError(f"no sampling session {sampler_id!r}")
        return _SamplingSession(live_base, sampler_id)
    value = record.value
    if "source_run" not in value and "model_path" not in value:
        return _SamplingSession(value["base_model"], None)
    if live_base is None:
        if not value.get("model_path"):
            raise NotFoundError(
                f"sampling session {sampler_id!r} held weights saved in memory, which the server lost when it "
                "restarted; save them again (save_weights_and_get_sampling_client)"
            )
        run_id, name, _ = wire.parse_tinker_path(value["model_path"])
        service.sampler_from_checkpoint(run_id, name, sampler_id, owner)
    return _SamplingSession(value["base_model"], sampler_id, value.get("model_path"))


@_authed.get("/samplers/{sampler_id:path}")
def get_sampler(sampler_id: str, service: ServiceDep, owner: OwnerDep, state: StateDep) -> dict[str, Any]:
    session = _sampling_session(state, service, sampler_id, owner)
    return {"sampler_id": sampler_id, "base_model": session.base_model, "model_path": session.model_path}


@_authed.post("/asample")
def asample(body: bodies.ASample, service: ServiceDep, owner: OwnerDep, state: StateDep) -> dict[str, Any]:
    """`sample` and `compute_logprobs`: a future with one sequence id per sample; a protobuf result."""
    sampler_id, num_samples, seq_id = body.sampling_session_id, body.num_samples, body.seq_id
    key = service.access.key(owner, "sample", sampler_id, str(seq_id))
    with state.lock:
        if key in state.answers:
            return state.answers[key]

    def submit() -> Job:
        session = _sampling_session(state, service, sampler_id, owner)
        request, echo = wire.sample_request(body.wire(), session.sampler_id)
        base_model = session.base_model if session.sampler_id is None else None
        return service.sample_request(request, owner, base_model=base_model, echo=echo)

    ids = [f"{sampler_id}:{seq_id}:{i}" for i in range(num_samples)]
    answer = _submit(state, owner, submit, sample_sequence_ids=ids)
    with state.lock:
        return state.remember(key, answer)


# --- REST (RestClient): training runs and checkpoints ------------------------------------------------------

TTL_RANGE = (3600, 10 * 365 * 24 * 3600)  # seconds, as the SDK documents for set_checkpoint_ttl
ARCHIVE_URL_SECONDS = 3600


def _check_ttl(ttl: Any) -> None:
    if ttl is not None and not (isinstance(ttl, int) and TTL_RANGE[0] <= ttl <= TTL_RANGE[1]):
        raise InvalidInputError("ttl_seconds", f"must be null or {TTL_RANGE[0]}..{TTL_RANGE[1]} seconds")


def _metas(state: TinkerState, run_id: str | None) -> dict[str, dict[str, Any]]:
    """`<run>/<native name>` -> what REST set on that checkpoint (`public`, `expires_at`)."""
    records = state.durable.records(
        CHECKPOINT_META, include_all=True, prefix=None if run_id is None else f"{run_id}/"
    )
    return {r.key: r.value for r in records}


def _rest_checkpoints(
    state: TinkerState, checkpoints: list[api.Checkpoint], run_id: str | None
) -> list[dict[str, Any]]:
    metas = _metas(state, run_id)
    return [
        wire.rest_checkpoint(c.run_id, c.name, c.created_at, c.size_bytes, metas.get(f"{c.run_id}/{c.name}"))
        for c in checkpoints
    ]


def _training_run(service: Service, state: TinkerState, run: api.Run, owner: str | None) -> dict[str, Any]:
    checkpoints = _rest_checkpoints(state, service.list_checkpoints(run.run_id, owner), run.run_id)
    meta = state.durable.get(RUN_META, run.run_id)
    return wire.rest_training_run(
        run.run_id,
        run.base_model,
        owner,
        run.lora_config.r,
        run.updated_at or run.created_at,
        checkpoints,
        user_metadata=wire.user_metadata(meta.value.get("user_metadata")) if meta is not None else None,
    )


def _keep_run_metadata(
    state: TinkerState, run_id: str, user_metadata: dict[str, Any] | None, owner: str | None
) -> None:
    """Store a new run's `user_metadata` (returned by `get_training_run`; the cookbook keeps its
    renderer name there to check it on resume)."""
    if user_metadata is not None:
        state.durable.put(RUN_META, run_id, {"user_metadata": user_metadata}, owner=owner)


@_authed.get("/training_runs")
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


@_authed.get("/training_runs/{run_id}")
def get_training_run(run_id: str, service: ServiceDep, owner: OwnerDep, state: StateDep) -> dict[str, Any]:
    return _training_run(service, state, service.get_run(run_id, owner), owner)


@_authed.get("/training_runs/{run_id}/checkpoints")
def list_run_checkpoints(
    run_id: str, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    return {"checkpoints": _rest_checkpoints(state, service.list_checkpoints(run_id, owner), run_id)}


@_authed.get("/checkpoints")
def list_user_checkpoints(
    service: ServiceDep,
    owner: OwnerDep,
    state: StateDep,
    limit: Annotated[int, Query(ge=0)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    checkpoints = service.list_checkpoints(None, owner)
    page = _rest_checkpoints(state, checkpoints[offset : offset + limit], None)
    return {"checkpoints": page, "cursor": wire.cursor(offset, limit, len(checkpoints))}


@_authed.post("/weights_info")
def weights_info(
    body: bodies.WeightsInfo, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    run_id, name, _ = wire.parse_tinker_path(body.tinker_path)
    run = service.get_run(run_id, owner)
    if name not in {c.name for c in service.list_checkpoints(run_id, owner)}:
        raise NotFoundError(f"run {run_id!r} has no checkpoint {body.tinker_path!r}")
    meta = state.durable.get(CHECKPOINT_META, f"{run_id}/{name}")
    targets = run.lora_config.target_modules
    every_layer = targets in (None, "all-linear") or (
        isinstance(targets, list) and all("." not in t for t in targets)
    )
    return {
        "base_model": run.base_model,
        "is_lora": True,
        "lora_rank": run.lora_config.r,
        "train_unembed": _trains_head(run),
        "train_attn": True if every_layer else None,  # None: a custom target list, not classified here
        "train_mlp": True if every_layer else None,
        "optimizer_config": optimizer_config(run.optimizer),  # a run's checkpoints all have its optimizer
        "user_metadata": meta.value.get("user_metadata") if meta is not None else None,
    }


# `checkpoint_id` is `<kind>/<name>`, with a slash: these routes take it as a `path` parameter, so the ones
# with a suffix (`/publish`, `/ttl`, `/archive`) come before the bare one.
_CHECKPOINT = "/training_runs/{run_id}/checkpoints/{checkpoint_id:path}"


def _checkpoint_key(run_id: str, checkpoint_id: str, service: Service, owner: str | None) -> str:
    """`<run>/<native name>` of an existing checkpoint of the caller's."""
    name, path = wire.parse_checkpoint_id(run_id, checkpoint_id)
    if name not in {c.name for c in service.list_checkpoints(run_id, owner)}:
        raise NotFoundError(f"no checkpoint {path!r}")
    return f"{run_id}/{name}"


def _set_meta(state: TinkerState, key: str, owner: str | None, **values: Any) -> None:
    if state.durable.update(CHECKPOINT_META, key, **values) is None:
        state.durable.put(CHECKPOINT_META, key, values, owner=owner)


@_authed.post(_CHECKPOINT + "/publish")
def publish_checkpoint(
    run_id: str, checkpoint_id: str, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> None:
    """Marks the checkpoint public (local metadata: this server has no other users' access control)."""
    _set_meta(state, _checkpoint_key(run_id, checkpoint_id, service, owner), owner, public=True)


@_authed.delete(_CHECKPOINT + "/publish")
def unpublish_checkpoint(
    run_id: str, checkpoint_id: str, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> None:
    _set_meta(state, _checkpoint_key(run_id, checkpoint_id, service, owner), owner, public=False)


@_authed.put(_CHECKPOINT + "/ttl")
def set_checkpoint_ttl(
    run_id: str,
    checkpoint_id: str,
    body: bodies.CheckpointTtl,
    service: ServiceDep,
    owner: OwnerDep,
    state: StateDep,
) -> None:
    """Records when the checkpoint expires (reported as `expires_at`; nothing deletes it automatically)."""
    key = _checkpoint_key(run_id, checkpoint_id, service, owner)
    ttl = body.ttl_seconds
    _check_ttl(ttl)
    _set_meta(state, key, owner, expires_at=None if ttl is None else time.time() + ttl)


@_authed.get(_CHECKPOINT + "/archive")
def checkpoint_archive_url(
    run_id: str, checkpoint_id: str, request: Request, service: ServiceDep, owner: OwnerDep
) -> dict[str, Any]:
    """Where to download the checkpoint as a .tar.gz: the native archive route of this server (same API key)."""
    name = _checkpoint_key(run_id, checkpoint_id, service, owner).split("/", 1)[1]
    url = request.url_for("download_checkpoint", run_id=run_id, name=name)
    return {"url": str(url), "expires": wire.iso_time(time.time() + ARCHIVE_URL_SECONDS)}


@_authed.get(_CHECKPOINT + "/external_weights_urls")
def external_weights_urls(
    run_id: str, checkpoint_id: str, request: Request, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """One signed URL per file of an external-weights checkpoint, served by this server (no key needed)."""
    key = _checkpoint_key(run_id, checkpoint_id, service, owner)
    name = key.split("/", 1)[1]
    root = _checkpoint_dir(service, run_id, name, owner)
    expires = int(time.time()) + ARCHIVE_URL_SECONDS
    urls = {}
    for file in sorted(f for f in root.rglob("*") if f.is_file()):
        relpath = file.relative_to(root).as_posix()
        token = _sign(state, run_id, name, relpath, expires)
        url = request.url_for("external_weights_file", run_id=run_id, name=name, relpath=relpath)
        urls[relpath] = f"{url}?expires={expires}&token={token}"
    return {"urls": urls, "expires": wire.iso_time(expires)}


def _checkpoint_dir(service: Service, run_id: str, name: str, owner: str | None) -> Path:
    for checkpoint in service.list_checkpoints(run_id, owner):
        if checkpoint.name == name:
            return Path(checkpoint.adapter_path)
    raise NotFoundError(f"run {run_id!r} has no checkpoint {name!r}")


def _sign(state: TinkerState, run_id: str, name: str, relpath: str, expires: int) -> str:
    """An HMAC of what a download URL grants, with a secret kept in the database (URLs survive a restart)."""
    record = state.durable.get(SECRETS, "download-url")
    if record is None:
        state.durable.put(SECRETS, "download-url", {"key": secrets.token_hex(32)})
        record = state.durable.get(SECRETS, "download-url")
    assert record is not None
    message = f"{run_id}\n{name}\n{relpath}\n{expires}".encode()
    return hmac.new(bytes.fromhex(record.value["key"]), message, hashlib.sha256).hexdigest()


@router.get("/external_weights/{run_id}/{name}/{relpath:path}", name="external_weights_file")
def external_weights_file(
    run_id: str, name: str, relpath: str, expires: int, token: str, service: ServiceDep, state: StateDep
) -> FileResponse:
    """A file of an external-weights checkpoint, for a URL signed by `external_weights_urls`."""
    valid = hmac.compare_digest(token, _sign(state, run_id, name, relpath, expires))
    if not valid or expires < time.time():
        raise NotFoundError("this download URL is invalid or has expired; ask for new ones")
    record = service.store.get_checkpoint(run_id, name)
    if record is None:
        raise NotFoundError(f"run {run_id!r} has no checkpoint {name!r}")
    root = Path(record.path).resolve()
    file = (root / relpath).resolve()
    if not file.is_file() or root not in file.parents:
        raise NotFoundError(f"checkpoint {name!r} has no file {relpath!r}")
    return FileResponse(file, filename=file.name)


@_authed.delete(_CHECKPOINT)
def delete_checkpoint(
    run_id: str, checkpoint_id: str, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> None:
    key = _checkpoint_key(run_id, checkpoint_id, service, owner)
    service.delete_checkpoint(run_id, key.split("/", 1)[1], owner)
    state.durable.delete(CHECKPOINT_META, key)


# --- futures -----------------------------------------------------------------------------------------------


def _recover(state: TinkerState, service: Service, request_id: str, owner: str | None) -> _Future | None:
    """A request id this process does not remember: its job, live or from the store (after a restart)."""
    mapped = state.durable.get(FUTURES, request_id)
    job_id = mapped.value["job_id"] if mapped is not None else request_id
    job = service.scheduler.get(job_id)
    if job is not None:
        if not service.access.allows(job.owner, owner):
            return None  # another key's: answered like an unknown request
        future = _Future(job.owner)
        future.settle(job)
        return future
    try:
        record = service.get_job(job_id, owner)
    except NotFoundError:
        return None
    future = _Future(owner, record=record)
    future.submitted.set_result(None)
    return future


@_authed.post("/retrieve_future")
async def retrieve_future(
    body: bodies.RetrieveFuture, request: Request, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> Response:
    """Long-poll a future: its result, `try_again` after ~25 s, or a 200 `{"error", "category"}`."""
    request_id = body.request_id
    with state.lock:
        future = state.futures.get(request_id)
    if future is not None and not service.access.allows(future.owner, owner):
        future = None  # another key's request: answered exactly like an unknown one
    if future is None:
        future = await run_in_threadpool(_recover, state, service, request_id, owner)
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
    if job.status != "completed" or job.result is None:
        if job.status in ("queued", "running"):
            return _try_again(request_id)
        return JSONResponse(
            {"error": job.error or "the request failed", "category": job.error_category or "unknown"}
        )
    protobuf = wire.PROTOBUF in request.headers.get("accept", "")
    try:
        result = _answer(job.op, job.run_id, job.result, protobuf)
    except EngineError as exc:
        return JSONResponse({"error": str(exc), "category": exc.category})
    if isinstance(result, bytes):
        return Response(result, media_type=wire.PROTOBUF)
    return JSONResponse(result)


def _try_again(request_id: str) -> JSONResponse:
    return JSONResponse({"type": "try_again", "request_id": request_id, "queue_state": "active"})


router.include_router(_authed)  # last: it copies the routes defined above
