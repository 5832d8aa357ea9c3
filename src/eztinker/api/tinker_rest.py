"""The Tinker REST routes (`RestClient`): training runs and checkpoints as the SDK's models, their
metadata (`public`, TTL, `user_metadata`), and downloads (an archive, or signed per-file URLs).

What REST sets on a checkpoint or a run lives in the server's database (`FacadeState`), beside the
service's own tables, so it survives a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse

from eztinker.api import tinker_bodies as bodies
from eztinker.api import tinker_sessions as sessions
from eztinker.api import tinker_wire as wire
from eztinker.api.deps import OwnerDep, ServiceDep, get_owner
from eztinker.api.tinker_futures import (
    CHECKPOINT_META,
    RUN_META,
    SECRETS,
    SESSIONS,
    StateDep,
    TinkerState,
    once,
)
from eztinker.engine.errors import ConflictError, InvalidInputError, NotFoundError
from eztinker.models import api
from eztinker.service import Service
from eztinker.store import CheckpointRecord
from eztinker.store.facade import FacadeState

public = APIRouter()  # signed download URLs: no API key
authed = APIRouter(dependencies=[Depends(get_owner)])

TTL_RANGE = (3600, 10 * 365 * 24 * 3600)  # seconds, as the SDK documents for set_checkpoint_ttl
ARCHIVE_URL_SECONDS = 3600


# --- the SDK's REST models ------------------------------------------------------------------------------

_CHECKPOINT_TYPES = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}


def parse_checkpoint_id(run_id: str, checkpoint_id: str) -> tuple[str, str]:
    """(native checkpoint name, tinker path) of a REST `checkpoint_id` such as `weights/ckpt-1`."""
    path = f"tinker://{run_id}/{checkpoint_id}"
    _, name, _ = wire.parse_tinker_path(path)
    return name, path


def iso_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat()


def rest_checkpoint(
    run_id: str, native_name: str, created_at: float, size_bytes: int, meta: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A `types.Checkpoint`; `meta` holds what was set on it (`public`, `expires_at` in Unix seconds,
    `user_metadata`)."""
    ckpt_id = wire.checkpoint_id(native_name)
    meta = meta or {}
    expires_at = meta.get("expires_at")
    return {
        "checkpoint_id": ckpt_id,
        "checkpoint_type": _CHECKPOINT_TYPES[ckpt_id.split("/", 1)[0]],
        "time": iso_time(created_at),
        "tinker_path": f"tinker://{run_id}/{ckpt_id}",
        "size_bytes": size_bytes,
        "public": bool(meta.get("public", False)),
        "expires_at": None if expires_at is None else iso_time(expires_at),
        "user_metadata": meta.get("user_metadata"),
    }


def rest_training_run(
    run_id: str,
    base_model: str,
    owner: str | None,
    lora_rank: int,
    last_request_time: float,
    checkpoints: Sequence[Mapping[str, Any]] = (),
    user_metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A `types.TrainingRun`; `checkpoints` are `rest_checkpoint`s of the run, oldest first."""

    def last(kind: str) -> Mapping[str, Any] | None:
        return next((c for c in reversed(checkpoints) if c["checkpoint_type"] == kind), None)

    return {
        "training_run_id": run_id,
        "base_model": base_model,
        "model_owner": owner or "local",
        "is_lora": True,
        "corrupted": False,
        "lora_rank": lora_rank,
        "last_request_time": iso_time(last_request_time),
        "last_checkpoint": last("training"),
        "last_sampler_checkpoint": last("sampler"),
        "user_metadata": None if user_metadata is None else dict(user_metadata),
    }


def user_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str] | None:
    """`user_metadata` as the SDK reads it back (`dict[str, str]`): a non-string value (create_model
    and load_weights accept any JSON) is kept as its JSON text."""
    if metadata is None:
        return None
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


# --- routes ---------------------------------------------------------------------------------------------


def check_ttl(ttl: Any) -> None:
    if ttl is not None and not (isinstance(ttl, int) and TTL_RANGE[0] <= ttl <= TTL_RANGE[1]):
        raise InvalidInputError("ttl_seconds", f"must be null or {TTL_RANGE[0]}..{TTL_RANGE[1]} seconds")


def _metas(state: TinkerState, run_id: str | None) -> dict[str, dict[str, Any]]:
    """`<run>/<native name>` -> what REST set on that checkpoint (`public`, `expires_at`)."""
    records = state.durable.records(
        CHECKPOINT_META, include_all=True, prefix=None if run_id is None else f"{run_id}/"
    )
    return {r.key: r.value for r in records}


def _rest_checkpoints(
    service: Service, state: TinkerState, checkpoints: list[api.Checkpoint], run_id: str | None
) -> list[dict[str, Any]]:
    """`expires_at` is the service's (it deletes the checkpoint then); the rest is what REST set."""
    metas, expiries = _metas(state, run_id), service.checkpoints.expiries(run_id)
    return [
        rest_checkpoint(
            c.run_id,
            c.name,
            c.created_at,
            c.size_bytes,
            {
                **metas.get(f"{c.run_id}/{c.name}", {}),
                "expires_at": expiries.get((c.run_id, c.name)),
                "public": service.access.is_public(c.run_id, c.name),
            },
        )
        for c in checkpoints
    ]


def _training_run(service: Service, state: TinkerState, run: api.Run, owner: str | None) -> dict[str, Any]:
    checkpoints = _rest_checkpoints(
        service, state, service.views.list_checkpoints(run.run_id, owner), run.run_id
    )
    meta = state.durable.get(RUN_META, run.run_id)
    return rest_training_run(
        run.run_id,
        run.base_model,
        owner,
        run.lora_config.r,
        run.updated_at or run.created_at,
        checkpoints,
        user_metadata=user_metadata(meta.value.get("user_metadata")) if meta is not None else None,
    )


def keep_run_metadata(
    state: TinkerState, run_id: str, user_metadata: dict[str, Any] | None, owner: str | None
) -> None:
    """Store a new run's `user_metadata` (returned by `get_training_run`; the cookbook keeps its
    renderer name there to check it on resume)."""
    if user_metadata is not None:
        state.durable.put(RUN_META, run_id, {"user_metadata": user_metadata}, owner=owner)


def run_project(state: TinkerState, run_id: str) -> str | None:
    """The project a run is in: the one it was copied into, else its session's (moved with the session)."""
    meta = state.durable.get(RUN_META, run_id)
    if meta is not None and meta.value.get("project_id"):
        return meta.value["project_id"]
    if ":train:" not in run_id:
        return None
    session = state.durable.get(SESSIONS, run_id.split(":train:")[0])
    return session.value.get("project_id") if session is not None else None


@authed.get("/training_runs")
def list_training_runs(
    service: ServiceDep,
    owner: OwnerDep,
    state: StateDep,
    page: bodies.Page20,
    project_id: str | None = None,
) -> dict[str, Any]:
    """The caller's training runs, newest first, as hosted Tinker lists them (`tinker run list` shows the
    latest); with `project_id`, only those in that project."""
    runs = _newest_first(service.views.list_runs(owner))
    if project_id is not None:
        runs = [r for r in runs if run_project(state, r.run_id) == project_id]
    listed = [_training_run(service, state, r, owner) for r in page.of(runs)]
    return {"training_runs": listed, "cursor": page.cursor(len(runs))}


@authed.get("/training_runs/{run_id}")
def get_training_run(run_id: str, service: ServiceDep, owner: OwnerDep, state: StateDep) -> dict[str, Any]:
    return _training_run(service, state, service.views.get_run(run_id, owner), owner)


@authed.get("/training_runs/{run_id}/checkpoints")
def list_run_checkpoints(
    run_id: str, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    return {
        "checkpoints": _rest_checkpoints(
            service, state, service.views.list_checkpoints(run_id, owner), run_id
        )
    }


@authed.get("/checkpoints")
def list_user_checkpoints(
    service: ServiceDep, owner: OwnerDep, state: StateDep, page: bodies.Page100
) -> dict[str, Any]:
    """Every checkpoint of the caller's, newest first, as hosted Tinker lists them (`tinker checkpoint
    list` shows the latest)."""
    checkpoints = _newest_first(service.views.list_checkpoints(None, owner))
    return {
        "checkpoints": _rest_checkpoints(service, state, page.of(checkpoints), None),
        "cursor": page.cursor(len(checkpoints)),
    }


_Created = TypeVar("_Created", api.Run, api.Checkpoint)


def _newest_first(items: list[_Created]) -> list[_Created]:
    """By creation, newest first (a stable order, so paging with `offset` neither skips nor repeats)."""
    return sorted(items, key=lambda item: item.created_at, reverse=True)


# `checkpoint_id` is `<kind>/<name>`, with a slash: these routes take it as a `path` parameter, so the ones
# with a suffix (`/publish`, `/ttl`, `/archive`) come before the bare one.
_CHECKPOINT = "/training_runs/{run_id}/checkpoints/{checkpoint_id:path}"


def _checkpoint_key(run_id: str, checkpoint_id: str, service: Service, owner: str | None) -> str:
    """`<run>/<native name>` of an existing checkpoint of the caller's."""
    name, path = parse_checkpoint_id(run_id, checkpoint_id)
    if name not in {c.name for c in service.views.list_checkpoints(run_id, owner)}:
        raise NotFoundError(f"no checkpoint {path!r}")
    return f"{run_id}/{name}"


def _readable_checkpoint(
    run_id: str, checkpoint_id: str, service: Service, owner: str | None
) -> CheckpointRecord:
    """An existing checkpoint the caller may read: its own, or one another key published."""
    name, _ = parse_checkpoint_id(run_id, checkpoint_id)
    return service.access.readable_checkpoint(run_id, name, owner)[1]


def forget_deleted_checkpoints(service: Service) -> None:
    """Drop what REST set on a checkpoint when the service deletes it (by any route, or once it expired),
    so a later checkpoint of the same name starts without it."""
    durable = FacadeState(service.store)
    service.checkpoints.on_deleted.append(
        lambda run_id, name: durable.delete(CHECKPOINT_META, f"{run_id}/{name}")
    )


def set_meta(state: TinkerState, key: str, owner: str | None, **values: Any) -> None:
    if state.durable.update(CHECKPOINT_META, key, **values) is None:
        state.durable.put(CHECKPOINT_META, key, values, owner=owner)


def replace_meta(
    state: TinkerState, key: str, owner: str | None, *, user_metadata: dict[str, Any] | None
) -> None:
    """What an overwritten checkpoint keeps of the old one's metadata: nothing but the new `user_metadata`."""
    state.durable.delete(CHECKPOINT_META, key)
    if user_metadata is not None:
        state.durable.put(CHECKPOINT_META, key, {"user_metadata": user_metadata}, owner=owner)


@authed.delete(_CHECKPOINT + "/publish", name="unpublish_checkpoint")
@authed.post(_CHECKPOINT + "/publish", name="publish_checkpoint")
def set_checkpoint_public(
    run_id: str, checkpoint_id: str, request: Request, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> None:
    """POST makes the checkpoint readable by every key: sampled, trained from, described and downloaded.
    DELETE makes it its owner's alone again."""
    name = _checkpoint_key(run_id, checkpoint_id, service, owner).split("/", 1)[1]
    service.access.set_public(run_id, name, request.method == "POST", owner)


@authed.put(_CHECKPOINT + "/ttl")
def set_checkpoint_ttl(
    run_id: str,
    checkpoint_id: str,
    body: bodies.CheckpointTtl,
    service: ServiceDep,
    owner: OwnerDep,
    state: StateDep,
) -> None:
    """Sets when the checkpoint expires (reported as `expires_at`): the service deletes it then, files and
    records, as `delete_checkpoint` does. `ttl_seconds` null: never."""
    name = _checkpoint_key(run_id, checkpoint_id, service, owner).split("/", 1)[1]
    ttl = body.ttl_seconds
    check_ttl(ttl)
    service.checkpoints.set_expiry(run_id, name, None if ttl is None else time.time() + ttl, owner)


@authed.get(_CHECKPOINT + "/archive")
def checkpoint_archive_url(
    run_id: str, checkpoint_id: str, request: Request, service: ServiceDep, owner: OwnerDep
) -> dict[str, Any]:
    """Where to download the checkpoint as a .tar.gz: the native archive route of this server (same API key).
    A published checkpoint of another key's too."""
    name = _readable_checkpoint(run_id, checkpoint_id, service, owner).name
    url = request.url_for("download_checkpoint", run_id=run_id, name=name)
    return {"url": str(url), "expires": iso_time(time.time() + ARCHIVE_URL_SECONDS)}


@authed.get(_CHECKPOINT + "/external_weights_urls")
def external_weights_urls(
    run_id: str, checkpoint_id: str, request: Request, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """One signed URL per file of an external-weights checkpoint, served by this server (no key needed)."""
    record = _readable_checkpoint(run_id, checkpoint_id, service, owner)
    name, root = record.name, Path(record.path)
    expires = int(time.time()) + ARCHIVE_URL_SECONDS
    urls = {}
    for file in sorted(f for f in root.rglob("*") if f.is_file()):
        relpath = file.relative_to(root).as_posix()
        token = _sign(state, run_id, name, relpath, expires)
        url = request.url_for("external_weights_file", run_id=run_id, name=name, relpath=relpath)
        urls[relpath] = f"{url}?expires={expires}&token={token}"
    return {"urls": urls, "expires": iso_time(expires)}


def _sign(state: TinkerState, run_id: str, name: str, relpath: str, expires: int) -> str:
    """An HMAC of what a download URL grants, with a secret kept in the database (URLs survive a restart)."""
    record = state.durable.get(SECRETS, "download-url")
    if record is None:
        state.durable.put(SECRETS, "download-url", {"key": secrets.token_hex(32)})
        record = state.durable.get(SECRETS, "download-url")
    assert record is not None
    message = f"{run_id}\n{name}\n{relpath}\n{expires}".encode()
    return hmac.new(bytes.fromhex(record.value["key"]), message, hashlib.sha256).hexdigest()


@public.get("/external_weights/{run_id}/{name}/{relpath:path}", name="external_weights_file")
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


@authed.post("/copy_weights")
def copy_weights(
    body: bodies.CopyWeights, request: Request, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """`copy_weights`: a checkpoint the caller may read (its own, or a published one), in a new run of the
    caller's that holds it and is never trained, in `destination_project_id` or in session `session_id`
    (its project). The kind is kept; the source's expiry is not (`ttl_seconds` sets the copy's). A resent
    request (the SDK's `X-Idempotency-Key`) gets the first copy."""
    if body.weights_access_token is not None:
        raise InvalidInputError(
            "weights_access_token",
            "access tokens are not served; the owner can publish the checkpoint instead",
        )
    if body.session_id is None and body.destination_project_id is None:
        raise InvalidInputError(
            "destination_project_id", "give a destination project, or session_id and model_seq_id"
        )
    if (body.session_id is None) != (body.model_seq_id is None):
        raise InvalidInputError("model_seq_id", "session_id and model_seq_id go together")
    if body.ttl_seconds is not None:
        check_ttl(body.ttl_seconds)
    run_id, name, _ = wire.parse_tinker_path(body.source_path)
    idempotency = request.headers.get("x-idempotency-key") or uuid.uuid4().hex
    key = service.access.key(owner, "copy_weights", idempotency)

    def copy() -> dict[str, Any]:
        new_run_id = None
        if body.session_id is not None and body.model_seq_id is not None:
            sessions.check_new_object(state, body.session_id, owner)
            new_run_id = wire.model_id(body.session_id, body.model_seq_id)
        try:
            copied = service.checkpoints.copy(run_id, name, owner, new_run_id=new_run_id)
        except ConflictError as exc:  # a 409 the SDK would retry for minutes: the id is taken for good
            raise InvalidInputError("model_seq_id", f"{exc}: the session already has that model") from None
        if body.destination_project_id is not None:
            state.durable.put(
                RUN_META, copied.run_id, {"project_id": body.destination_project_id}, owner=owner
            )
        source_meta = state.durable.get(CHECKPOINT_META, f"{run_id}/{name}")
        if source_meta is not None and source_meta.value.get("user_metadata") is not None:
            state.durable.put(
                CHECKPOINT_META,
                f"{copied.run_id}/{name}",
                {"user_metadata": source_meta.value["user_metadata"]},
                owner=owner,
            )
        if body.ttl_seconds is not None:
            service.checkpoints.set_expiry(copied.run_id, name, time.time() + body.ttl_seconds, owner)
        return {"tinker_path": f"tinker://{copied.run_id}/{wire.checkpoint_id(name)}"}

    return once(state, key, copy)


@authed.delete(_CHECKPOINT)
def delete_checkpoint(
    run_id: str, checkpoint_id: str, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> None:
    key = _checkpoint_key(run_id, checkpoint_id, service, owner)
    service.checkpoints.delete(run_id, key.split("/", 1)[1], owner)
    state.durable.delete(CHECKPOINT_META, key)
