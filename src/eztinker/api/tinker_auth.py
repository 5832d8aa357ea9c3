"""The Tinker routes the SDK's `RestClient`/`AdminClient` and the `tinker` CLI call beyond training:
identity (`auth/token`, `auth/apikey/me`), session search, session trace export, and the admin routes,
served where they mean something on one self-hosted server and refused with a clear 400 otherwise.

- `POST /auth/token`: the JWT the SDK exchanges its API key for (`service.identity`); `whoami` reads it.
- `GET /auth/apikey/me`: the key's metadata, which `tinker auth login` checks and stores.
- `POST /sessions/search`: the caller's sessions, newest first, filtered as `SessionSearchRequest` says.
- `GET /sessions/{id}/trace_export`: a signed URL (no key needed, an hour) of the session's timeline as a
  Chrome/Perfetto JSON trace: one slice per op of its training runs and samplers, queued then running.
- `GET /billing/usage/checkpoints/current`: the caller's checkpoint storage (no prices).
- Not served (`NotServedError`, 400): deleting a key (`DELETE /auth/apikey/me`: keys are the server's
  configuration), billing usage events and the audit log (a self-hosted server has neither).
"""

from __future__ import annotations

import hmac
import json
import time
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from eztinker.api.deps import OwnerDep, ServiceDep, get_owner
from eztinker.api.tinker_futures import SAMPLERS, SESSIONS, StateDep, TinkerState
from eztinker.api.tinker_rest import _sign, iso_time, run_project, user_metadata
from eztinker.api.tinker_sessions import _session
from eztinker.engine.errors import EngineError, NotFoundError
from eztinker.service import Service, identity
from eztinker.store.facade import FacadeRecord

authed = APIRouter(dependencies=[Depends(get_owner)])
public = APIRouter()

TRACE_URL_SECONDS = 3600
DEFAULT_PROJECT = "default"


class NotServedError(EngineError):
    """A Tinker route this server deliberately does not serve (answered 400, category user)."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what} is not served by EZTinker: {reason}")


# --- identity ----------------------------------------------------------------------------------------------


@authed.post("/auth/token")
def auth_token(service: ServiceDep, owner: OwnerDep) -> dict[str, str]:
    """A short-lived JWT for the caller's key (the SDK sends it as its key from then on)."""
    return {"jwt": identity.mint(service.access, owner)}


@authed.get("/auth/apikey/me")
def get_self_api_key(owner: OwnerDep) -> dict[str, Any]:
    """The caller's key as `tinker auth login` stores it: an id, a name, and who it belongs to."""
    short = identity.short_id(owner)
    return {
        "key_id": identity.key_id(owner),
        "name": f"eztinker-{short}",
        "note": "an API key of a self-hosted EZTinker server",
        "details": {
            "org_details": {"name": identity.ORG_ID},
            "user_details": {"email": f"{short}@eztinker.local"},
        },
    }


@authed.delete("/auth/apikey/me")
def delete_self_api_key() -> None:
    raise NotServedError(
        "deleting an API key", "keys are the server's configuration (--api-key); remove it there"
    )


# --- admin -----------------------------------------------------------------------------------------------


@authed.get("/audit")
def audit_log() -> None:
    raise NotServedError("the audit log", "a self-hosted server keeps no organization audit log")


@authed.get("/billing/usage/events")
def billing_usage() -> None:
    raise NotServedError("billing usage", "a self-hosted server bills nothing")


@authed.get("/billing/usage/checkpoints/current")
def checkpoint_storage_usage(
    service: ServiceDep, owner: OwnerDep, state: StateDep, project_id: str | None = None
) -> dict[str, Any]:
    """The caller's checkpoints' count and bytes, by project (no rate: nothing is billed)."""
    by_project: dict[str, list[int]] = {}
    for c in service.views.list_checkpoints(None, owner):
        project = run_project(state, c.run_id)
        if project_id is not None and project != project_id:
            continue
        entry = by_project.setdefault(project or "", [0, 0])
        entry[0] += 1
        entry[1] += c.size_bytes
    return {
        "effective_rate_usd_per_gigabyte_month": None,
        "data": [
            {
                "project_id": project or None,
                "org_user_urn": identity.user_urn(owner),
                "checkpoint_count": count,
                "size_bytes": size,
                "size_gigabytes": size / 1e9,
            }
            for project, (count, size) in sorted(by_project.items())
        ],
    }


# --- session search ----------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchOwner(_Strict):
    type: Literal["own", "accessible", "user"] = "own"
    owner_urns: list[str] | None = Field(None, min_length=1, max_length=10)


class StatusQuery(_Strict):
    type: Literal["active", "cancelled", "failed", "client_finished"]
    reasons: list[Literal["success", "errored", "interrupted"]] | None = Field(None, min_length=1)


class SearchCursor(BaseModel):
    last_created_at: AwareDatetime
    last_session_id: str


class SessionSearch(_Strict):
    """`SessionSearchRequest` of the SDK."""

    session_id: str | None = None
    project_ids: list[str] | None = None
    user_metadata: dict[str, str] = Field(default_factory=dict)
    display_name: str | None = Field(None, min_length=1)
    owner: SearchOwner = Field(default_factory=SearchOwner)
    statuses: list[StatusQuery] | None = Field(None, min_length=1)
    limit: int = Field(50, ge=1, le=200)
    cursor: SearchCursor | None = None


_FINISH_REASONS = ("success", "errored", "interrupted")


def _status(value: dict[str, Any]) -> dict[str, Any] | None:
    """A session's `SessionStatus`: active, or finished by its client (with the reason it gave)."""
    status = value.get("status", "active")
    if status == "active":
        return {"type": "active"}
    reason = status if status in _FINISH_REASONS else "success"
    return {"type": "client_finished", "reason": {"type": reason}}


def _matches(body: SessionSearch, record: FacadeRecord, owner: str | None) -> bool:
    value = record.value
    if body.owner.type == "user" and identity.user_urn(owner) not in (body.owner.owner_urns or []):
        return False  # only the caller's own sessions are reachable: another user's match nothing
    named = []
    if body.session_id is not None:
        named.append(record.key == body.session_id)
    if body.display_name is not None:
        name = (value.get("display_name") or "").lower()
        named.append(all(word in name for word in body.display_name.lower().split()))
    if named and not any(named):
        return False
    project = value.get("project_id") or DEFAULT_PROJECT
    if body.project_ids is not None and project not in body.project_ids:
        return False
    metadata = user_metadata(value.get("user_metadata")) or {}
    if any(metadata.get(k) != v for k, v in body.user_metadata.items()):
        return False
    if body.statuses is not None:
        status = _status(value) or {}
        if not any(_status_matches(q, status) for q in body.statuses):
            return False
    return True


def _status_matches(query: StatusQuery, status: dict[str, Any]) -> bool:
    if query.type != status.get("type"):
        return False
    return query.reasons is None or status.get("reason", {}).get("type") in query.reasons


def _summary(service: Service, record: FacadeRecord, owner: str | None) -> dict[str, Any]:
    runs = [r.run_id for r in service.views.list_runs(owner) if r.run_id.startswith(f"{record.key}:train:")]
    checkpoints = [c for run_id in runs for c in service.views.list_checkpoints(run_id, owner)]
    metadata = record.value.get("user_metadata")
    return {
        "session_id": record.key,
        "created_at": iso_time(record.created_at),
        "owner": identity.user_urn(owner),
        "project_id": record.value.get("project_id") or DEFAULT_PROJECT,
        "status": _status(record.value),
        "checkpoints_count": len(checkpoints),
        "display_name": record.value.get("display_name"),
        "user_metadata": user_metadata(metadata),
        "checkpoint_storage_bytes": sum(c.size_bytes for c in checkpoints),
    }


@authed.post("/sessions/search")
def search_sessions(
    body: SessionSearch, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """The caller's sessions that match, newest first, `limit` a page; `next_cursor` while more remain.
    Every key reaches only its own sessions, so `owner` "accessible" searches the same ones as "own"."""
    records = state.durable.records(SESSIONS, **service.access.listing(owner))
    records.sort(key=lambda r: (r.created_at, r.key), reverse=True)
    if body.cursor is not None:  # compared as the cursor carries it: to the microsecond
        last = (body.cursor.last_created_at, body.cursor.last_session_id)
        records = [r for r in records if (datetime.fromtimestamp(r.created_at, UTC), r.key) < last]
    matched = [r for r in records if _matches(body, r, owner)]
    page = matched[: body.limit]
    next_cursor = None
    if len(matched) > body.limit:
        last_record = page[-1]
        next_cursor = {
            "last_created_at": iso_time(last_record.created_at),
            "last_session_id": last_record.key,
        }
    return {"sessions": [_summary(service, r, owner) for r in page], "next_cursor": next_cursor}


# --- session trace export ----------------------------------------------------------------------------------

_TRACE, _TRACE_FILE = "session-trace", "trace.json"


@authed.get("/sessions/{session_id}/trace_export")
def export_session_trace(
    session_id: str, request: Request, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """The trace is built when downloaded, so it is always `ready`: a URL signed for an hour."""
    _session(state, session_id, owner)
    expires = int(time.time()) + TRACE_URL_SECONDS
    token = _sign(state, session_id, _TRACE, _TRACE_FILE, expires)
    url = request.url_for("session_trace_file", session_id=session_id)
    return {"status": "ready", "url": f"{url}?expires={expires}&token={token}"}


@public.get("/session_traces/{session_id}", name="session_trace_file")
def session_trace_file(session_id: str, expires: int, token: str, state: StateDep) -> Response:
    """The session's timeline for a URL signed by `trace_export`, as trace-event JSON (Perfetto opens it)."""
    valid = hmac.compare_digest(token, _sign(state, session_id, _TRACE, _TRACE_FILE, expires))
    record = state.durable.get(SESSIONS, session_id)
    if not valid or expires < time.time() or record is None:
        raise NotFoundError("this download URL is invalid or has expired; ask for a new one")
    trace = session_trace(state, session_id, record.owner)
    return Response(
        json.dumps(trace).encode(),
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{session_id}.pftrace"'},
    )


def session_trace(state: TinkerState, session_id: str, owner: str | None) -> dict[str, Any]:
    """Trace events: a thread per training run and sampler of the session, a slice per op of it (its time
    queued, then its time running), in microseconds."""
    service = state.service
    runs = [r.run_id for r in service.views.list_runs(owner) if r.run_id.startswith(f"{session_id}:train:")]
    samplers = [
        s.key
        for s in state.durable.records(
            SAMPLERS, **service.access.listing(owner), prefix=f"{session_id}:sample:"
        )
    ]
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": f"session {session_id}"}}
    ]
    for tid, object_id in enumerate([*runs, *samplers], start=1):
        events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": object_id}})
        category = "training" if object_id in runs else "sampling"
        for job in reversed(service.store.list_jobs(run_id=object_id, limit=100_000)):
            if not service.access.allows(job.owner, owner):
                continue
            args = {"job_id": job.job_id, "status": job.status}
            started = job.started_at or job.finished_at
            if started is not None and started > job.created_at:
                events.append(_slice(f"{job.op} (queued)", "queue", job.created_at, started, tid, args))
            if started is not None and job.finished_at is not None:
                events.append(_slice(job.op, category, started, job.finished_at, tid, args))
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _slice(
    name: str, category: str, start: float, end: float, tid: int, args: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": name,
        "cat": category,
        "ph": "X",
        "ts": int(start * 1e6),
        "dur": max(1, int((end - start) * 1e6)),
        "pid": 1,
        "tid": tid,
        "args": args,
    }
