"""The Tinker wire's sampling sessions: create or join one, sample from it, hear when samples end, cancel.

- `create_sampling_session` (a base model or a checkpoint) and `save_weights_for_sampler` (in `tinker`)
  make sampling sessions; `asample` samples from one (`sample` and `compute_logprobs`), behind a future.
- `join_sampling_session` (`/client/config` `sample_join_sampling_session`): an unpickled
  `SamplingClient` asks for its clone number, unique in the sampling session (the original is 0), instead
  of drawing a random one; its `seq_id`s start at that × 1e9. The count is durable, so a restart never
  hands out a number twice.
- `retrieve_futures` (`sample_use_retrieve_futures`): each sampling client's completion queue, one
  long-poll for all its samples (`tinker_completions`).
- `cancel_future` (`/client/dynamic_config` `sample_cancel_enabled`): the SDK cancels a sample whose
  future was abandoned (a timeout, a cancelled task); a queued one never starts, a running one stops
  decoding at its next token, and either fails as cancelled.

Every route reaches only the caller's own sampling sessions and requests: another key's is answered as
a missing one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from eztinker.api import tinker_bodies as bodies
from eztinker.api import tinker_sessions as sessions
from eztinker.api import tinker_wire as wire
from eztinker.api.deps import OwnerDep, ServiceDep, get_owner, while_connected
from eztinker.api.tinker_completions import CLONE_STRIDE, QueueKey
from eztinker.api.tinker_futures import (
    LONG_POLL_SECONDS,
    SAMPLERS,
    Answer,
    StateDep,
    TinkerState,
    find,
    once,
    submit,
)
from eztinker.engine.errors import InvalidInputError, NotFoundError
from eztinker.scheduler import Job
from eztinker.service import SampleSpec, Service
from eztinker.store.facade import FacadeRecord

authed = APIRouter(dependencies=[Depends(get_owner)])

_joining = threading.Lock()  # one clone number at a time


@dataclass(frozen=True)
class _SamplingSession:
    base_model: str
    sampler_id: str | None  # None: the bare base model (or, with `inflight_run`, that run's inflight target)
    model_path: str | None = None
    inflight_run: str | None = None


@authed.post("/create_sampling_session")
def create_sampling_session(
    body: bodies.CreateSamplingSession, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """A sampling session on a base model, or on a checkpoint (`model_path`, loaded as a snapshot)."""
    sampler_id = wire.sampling_session_id(body.session_id, body.sampling_session_seq_id)
    sessions.check_new_object(state, body.session_id, owner)
    if _record(state, service, sampler_id, owner) is None:
        if body.model_path:  # held: freed when the session ends, loaded again if named after that
            run_id, name, _ = wire.parse_tinker_path(body.model_path)
            _check_base_model(body.base_model, service.views.checkpoint_run(run_id, name, owner).base_model)
            base = service.sampling.from_checkpoint(run_id, name, sampler_id, owner, held=True)
            value = {"base_model": base, "model_path": body.model_path}
        else:
            value = {"base_model": body.base_model or service.sampling.default_base_model()}
        state.durable.put(SAMPLERS, sampler_id, value, owner=owner)
    return {"type": "create_sampling_session", "sampling_session_id": sampler_id}


def _check_base_model(given: str | None, checkpoint_base: str) -> None:
    """A checkpoint is sampled on the base model it was trained on: another `base_model` is refused, never
    ignored (the SDK takes the given name for its tokenizer without asking the server)."""
    if given is not None and given != checkpoint_base:
        raise InvalidInputError(
            "base_model",
            f"{given!r} is not the base model of the checkpoint, {checkpoint_base!r}; omit base_model, or pass that",
        )


def _sampling_session(
    state: TinkerState, service: Service, sampler_id: str, owner: str | None
) -> _SamplingSession:
    """Which weights `sampler_id` samples; a checkpoint's snapshot is loaded again after a restart."""
    record = _record(state, service, sampler_id, owner)
    live = service.sampling.sampler(sampler_id, owner)
    live_base = live.base_model if live is not None else None
    if record is None:
        if live_base is None:
            raise NotFoundError(f"no sampling session {sampler_id!r}")
        return _SamplingSession(live_base, sampler_id)
    value = record.value
    if value.get("inflight"):
        return _SamplingSession(value["base_model"], None, inflight_run=value["source_run"])
    if "source_run" not in value and "model_path" not in value:
        return _SamplingSession(value["base_model"], None)
    if live_base is None:
        if not value.get("model_path"):
            freed = service.sampling.freed_reason(sampler_id)
            why = f"were freed: {freed}" if freed else "the server lost when it restarted"
            raise NotFoundError(
                f"sampling session {sampler_id!r} held weights saved in memory, which {why}; save them again "
                "(save_weights_and_get_sampling_client)"
            )
        run_id, name, _ = wire.parse_tinker_path(value["model_path"])
        service.sampling.from_checkpoint(run_id, name, sampler_id, owner, held=True)
    return _SamplingSession(value["base_model"], sampler_id, value.get("model_path"))


@authed.get("/samplers/{sampler_id:path}")
def get_sampler(sampler_id: str, service: ServiceDep, owner: OwnerDep, state: StateDep) -> dict[str, Any]:
    session = _sampling_session(state, service, sampler_id, owner)
    return {"sampler_id": sampler_id, "base_model": session.base_model, "model_path": session.model_path}


@authed.post("/asample")
def asample(body: bodies.ASample, service: ServiceDep, owner: OwnerDep, state: StateDep) -> dict[str, Any]:
    """`sample` and `compute_logprobs`: a future with one sequence id per sample; a protobuf result."""
    sampler_id, num_samples, seq_id = body.sampling_session_id, body.num_samples, body.seq_id
    service.limits.check_num_samples(num_samples, "num_samples")  # before an id is made per sample
    key = service.access.key(owner, "sample", sampler_id, str(seq_id))

    def make() -> Job:
        session = _sampling_session(state, service, sampler_id, owner)
        request, echo = wire.sample_request(body.wire())
        if session.inflight_run is not None:  # the run's inflight target as of now
            target = service.sampling.inflight_target(session.inflight_run, owner)
        elif session.sampler_id is None:
            target = service.sampling.target(owner, base_model=session.base_model)
        else:
            target = service.sampling.target(owner, sampler_id=session.sampler_id)
        spec = SampleSpec(target, [request], echo=echo, cancellable=True, n_field="num_samples")
        return service.sampling.sample(spec, owner)

    def submitted() -> Answer:
        ids = [f"{sampler_id}:{seq_id}:{i}" for i in range(num_samples)]
        answer = submit(state, owner, make, sample_sequence_ids=ids)
        future = state.futures.get(answer["request_id"])
        clone = seq_id // CLONE_STRIDE
        job = future.job if future is not None else None
        # A refused request is reported only in a queue of the caller's own sampling session: a bogus
        # sampling session id makes no queue that nothing could ever poll.
        if job is not None or _is_sampling_session(state, service, sampler_id, owner):
            key = _queue_key(state, owner, sampler_id, clone)
            state.completions.track(key, sampler_id, clone, owner, answer["request_id"], job)
        return answer

    return once(state, key, submitted)


@authed.post("/join_sampling_session")
def join_sampling_session(
    body: bodies.JoinSamplingSession, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """The next clone number of the caller's sampling session (1, 2, ...: the original client is 0)."""
    sampler_id = body.sampling_session_id
    _require_sampling_session(state, service, sampler_id, owner)
    with _joining:
        record = state.durable.get(SAMPLERS, sampler_id)
        if record is None:  # a live snapshot with no record (a native save): counted from now on
            state.durable.put(SAMPLERS, sampler_id, {"clients": 0}, owner=owner)
            record = state.durable.get(SAMPLERS, sampler_id)
            assert record is not None
        counter = int(record.value.get("clients", 0)) + 1
        state.durable.update(SAMPLERS, sampler_id, clients=counter)
    return {"type": "join_sampling_session", "client_counter": counter}


@authed.post("/retrieve_futures")
async def retrieve_futures(
    body: bodies.RetrieveFutures, request: Request, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """The sampling client's requests that ended since `prev_cursor`, long-polled (`tinker_completions`)."""
    target = body.target
    sampler_id, clone = target.sampling_session_id, target.cloned_sampler_id
    await run_in_threadpool(_require_sampling_session, state, service, sampler_id, owner)
    wait = LONG_POLL_SECONDS if body.timeout is None else min(body.timeout, LONG_POLL_SECONDS)
    return await state.completions.poll(
        _queue_key(state, owner, sampler_id, clone),
        sampler_id,
        clone,
        owner,
        prev_cursor=body.prev_cursor,
        wait_seconds=wait,
        retrieved=body.retrieved_request_ids,
        hung_up=lambda waiting: while_connected(request, waiting),
    )


@authed.post("/cancel_future")
def cancel_future(
    body: bodies.CancelFuture, service: ServiceDep, owner: OwnerDep, state: StateDep
) -> dict[str, Any]:
    """Cancel the caller's sample `request_id`: it fails as cancelled and is never reported as ended (its
    client has abandoned it). A finished one stays as it was. Only samples can be cancelled."""
    future = find(state, body.request_id, owner)
    if future is None:
        raise NotFoundError(f"unknown request {body.request_id!r}")
    job = future.job if isinstance(future.job, Job) else None
    op = job.op if job is not None else (future.record.op if future.record is not None else "sample")
    if op != "sample":
        raise InvalidInputError("request_id", f"only sampling requests can be cancelled; this one is {op!r}")
    cancelled = job is not None and service.sampling.cancel(job.job_id)
    if state.completions.leave([body.request_id]):
        state.completions.flush()
    return {"type": "cancel_future", "cancelled": cancelled}


def _require_sampling_session(
    state: TinkerState, service: Service, sampler_id: str, owner: str | None
) -> None:
    """The caller's sampling session `sampler_id` exists (recorded, or a live snapshot of the caller's)."""
    if (
        _record(state, service, sampler_id, owner) is None
        and service.sampling.sampler(sampler_id, owner) is None
    ):
        raise NotFoundError(f"no sampling session {sampler_id!r}")


def _record(state: TinkerState, service: Service, sampler_id: str, owner: str | None) -> FacadeRecord | None:
    """Sampling session `sampler_id`'s record, if it has one; another key's is answered as missing."""
    record = state.durable.get(SAMPLERS, sampler_id)
    if record is not None:
        service.access.require(record.owner, owner, f"no sampling session {sampler_id!r}")
    return record


def _is_sampling_session(state: TinkerState, service: Service, sampler_id: str, owner: str | None) -> bool:
    try:
        _require_sampling_session(state, service, sampler_id, owner)
    except NotFoundError:
        return False
    return True


def _queue_key(state: TinkerState, owner: str | None, sampler_id: str, clone: int) -> QueueKey:
    return state.service.access.key(owner, "completions", sampler_id, str(clone))
