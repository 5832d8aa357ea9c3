"""The Tinker SDK's bootstrap calls and sessions: client config, capabilities, heartbeats, telemetry,
and the durable session records (`list_sessions`, `get_session`) that its models and samplers are
named after.

A session ends when its client calls `finish`, or when it has sent no heartbeat for
`session_timeout_seconds` (the SDK heartbeats every 10 s from a background task, so only a client that
crashed, was killed or lost the network stops): its status becomes `expired`, its samples still running
are cancelled (nobody is left to read them), and its sampling snapshots are freed as `finish` frees them.
Expiry is checked whenever a client creates a session or heartbeats (at most once per tenth of the
timeout) — while no client is connected nothing needs the memory back.

A heartbeat for an ended session is a 410 that says to start a new client (the SDK then stops
heartbeating it); its models still train, but nothing new (a model, a sampling session) is made in it."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from eztinker.api import tinker_bodies as bodies
from eztinker.api.deps import OwnerDep, ServiceDep, get_owner
from eztinker.api.tinker_futures import SAMPLERS, SESSIONS, StateDep, TinkerState
from eztinker.engine.errors import NotFoundError
from eztinker.store.facade import FacadeRecord

authed = APIRouter(dependencies=[Depends(get_owner)])


# --- bootstrap, sessions, telemetry ----------------------------------------------------------------------


@authed.post("/client/config")
def client_config() -> dict[str, Any]:
    """The SDK's feature flags: every optional path this server serves is on (`tinker_sampling`)."""
    return {
        "pjwt_auth_enabled": True,
        "proto_compress_fwdbwd": True,
        "custom_loss_server_side": True,
        "sample_use_retrieve_futures": True,
        "sample_join_sampling_session": True,
    }


@authed.post("/client/dynamic_config")
def client_dynamic_config() -> dict[str, Any]:
    return {"sample_cancel_enabled": True}


@authed.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@authed.get("/get_server_capabilities")
def get_server_capabilities(service: ServiceDep) -> dict[str, Any]:
    """Every base model this server serves (its `--model`s and any loaded since), with its context length:
    the smaller of the model config's `max_position_embeddings` (which the engine checks every sequence
    against) and the server's `max_sequence_tokens` (which the service checks first)."""
    names = dict.fromkeys([*service.settings.models, *service.backend.loaded_models])
    limit = service.settings.max_sequence_tokens
    models = []
    for name in names:
        try:
            context: int | None = min(service.backend.max_context_length(name), limit)
        except Exception:  # a configured model that cannot load now: listed, its length unknown
            context = None
        models.append(
            {"model_name": name, "max_context_length": context, "trainable": True, "sampleable": True}
        )
    return {"supported_models": models}


@authed.post("/create_session")
def create_session(body: bodies.CreateSession, owner: OwnerDep, state: StateDep) -> dict[str, Any]:
    session_id = f"sess-{uuid.uuid4().hex[:12]}"
    state.durable.put(SESSIONS, session_id, {**body.model_dump(), "status": "active"}, owner=owner)
    state.heartbeats[session_id] = state.clock()
    expire_idle_sessions(state)
    return {"type": "create_session", "session_id": session_id}


@authed.post("/session_heartbeat", response_model=None)
def session_heartbeat(
    owner: OwnerDep, state: StateDep, body: bodies.SessionHeartbeat | None = None
) -> dict[str, Any] | JSONResponse:
    session_id = body.session_id if body is not None else None
    record = state.durable.get(SESSIONS, session_id) if session_id is not None else None
    if record is not None:  # an unknown id is answered as before sessions existed: the SDK only logs it
        state.service.access.require(record.owner, owner, f"no session {record.key!r}")
        if record.value.get("status") != "active":
            # 410, as hosted Tinker answers: the SDK stops its heartbeat loop on a 410 only (any other
            # error it logs and retries every 10 s, warning of an unreliable connection after 2 minutes).
            return JSONResponse({"error": _ended(record), "category": "user"}, status_code=410)
        state.heartbeats[record.key] = state.clock()
    expire_idle_sessions(state)
    return {"type": "session_heartbeat"}


def _ended(record: FacadeRecord) -> str:
    status = record.value.get("status")
    return f"session {record.key!r} has ended ({status}): create a new ServiceClient to continue"


@authed.post("/sessions/{session_id}/finish")
def finish_session(
    session_id: str, body: bodies.FinishSession, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    _session(state, session_id, owner)
    reason = body.reason.type if body.reason is not None else None
    _end_session(state, session_id, owner, reason or "finished")
    return {}


def _end_session(state: TinkerState, session_id: str, owner: str | None, status: str) -> None:
    """Mark the session ended and free its sampling snapshots and its models' inflight targets, once no
    sample uses them (named checkpoints stay; a session on a checkpoint loads it again if it is named later)."""
    service = state.service
    state.durable.update(SESSIONS, session_id, status=status, finished_at=state.clock())
    state.heartbeats.pop(session_id, None)
    samplers = state.durable.records(
        SAMPLERS, **service.access.listing(owner), prefix=f"{session_id}:sample:"
    )
    runs = [r.run_id for r in service.views.list_runs(owner) if r.run_id.startswith(f"{session_id}:train:")]
    running = state.completions.end_session(session_id, expired=status == "expired")
    if status == "expired":  # its client is gone: nobody will read what its samples make (the SDK's fallback)
        for request_id in running:
            service.sampling.cancel(request_id)
    service.sampling.release(sampler_ids=[s.key for s in samplers], run_ids=runs)


def expire_idle_sessions(state: TinkerState) -> list[str]:
    """End (status `expired`) every active session with no heartbeat for `session_timeout_seconds`, at most
    once per tenth of the timeout; returns their ids. `state.heartbeats` holds every active session: the first
    check adds those this process has not heard from (the server restarted), counted from then, and later
    checks look only there, not at every session ever stored."""
    timeout = state.service.settings.session_timeout_seconds
    now = state.clock()
    with state.lock:
        if now - state.sessions_checked_at < timeout / 10:
            return []
        first_check, state.sessions_checked_at = state.sessions_checked_at == 0.0, now
    if first_check:
        for record in state.durable.records(SESSIONS, include_all=True):
            if record.value.get("status") == "active":
                state.heartbeats.setdefault(record.key, now)
    expired = []
    for session_id, last in list(state.heartbeats.items()):
        if now - last > timeout and state.heartbeats.pop(session_id, None) is not None:  # once, if raced
            record = state.durable.get(SESSIONS, session_id)
            _end_session(state, session_id, record.owner if record else None, "expired")
            expired.append(session_id)
    return expired


@authed.post("/telemetry")
def telemetry() -> dict[str, str]:
    return {"status": "accepted"}


def _session(state: TinkerState, session_id: str, owner: str | None) -> FacadeRecord:
    """The caller's session `session_id` (another key's is answered as missing)."""
    record = state.durable.get(SESSIONS, session_id)
    if record is None:
        raise NotFoundError(f"no session {session_id!r}")
    state.service.access.require(record.owner, owner, f"no session {session_id!r}")
    return record


def check_new_object(state: TinkerState, session_id: str, owner: str | None) -> None:
    """A model or sampling session named after `session_id` may be made only in the caller's session
    (or in one this server never created: SDKs before 0.16 sent no `create_session`), while it is active.

    An ended session's snapshots were freed when it ended, and nothing frees what is made in it after
    that; its client has stopped heartbeating too (on the heartbeat's 410), so it would expire at once."""
    if state.durable.get(SESSIONS, session_id) is not None:
        record = _session(state, session_id, owner)
        if record.value.get("status") != "active":
            raise NotFoundError(_ended(record))


@authed.get("/sessions")
def list_sessions(
    service: ServiceDep, owner: OwnerDep, state: StateDep, page: bodies.Page20
) -> dict[str, Any]:
    """The caller's session ids, newest first."""
    records = state.durable.records(SESSIONS, **service.access.listing(owner))
    return {"sessions": page.of([r.key for r in reversed(records)])}


@authed.get("/sessions/{session_id}")
def get_session(session_id: str, service: ServiceDep, owner: OwnerDep, state: StateDep) -> dict[str, Any]:
    """A session's training runs (`<session>:train:<n>`) and samplers (`<session>:sample:<n>`)."""
    record = _session(state, session_id, owner)
    runs = [r.run_id for r in service.views.list_runs(owner) if r.run_id.startswith(f"{session_id}:train:")]
    samplers = state.durable.records(
        SAMPLERS, **service.access.listing(owner), prefix=f"{session_id}:sample:"
    )
    return {
        "training_run_ids": runs,
        "sampler_ids": [s.key for s in samplers],
        "user_metadata": record.value.get("user_metadata") or None,
        "display_name": record.value.get("display_name"),
    }


@authed.put("/sessions/{session_id}/project")
def assign_session_project(
    session_id: str, body: bodies.AssignProject, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    _session(state, session_id, owner)
    state.durable.update(SESSIONS, session_id, project_id=body.project_id)
    return {}
