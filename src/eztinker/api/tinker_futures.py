"""The Tinker facade's futures: request ids, `seq_id` ordering, idempotent resends, and wire answers.

- **Futures are jobs.** A request id is its job's id (or, for an op held for ordering or refused before
  it ran, an id of its own mapped to the job), so an answer is derived from the job's op and typed result
  alone (`answer`): after a restart the store still has every finished job, and a request that was in
  flight is reported failed with the reason — never a 410 "promise lost".
- **Refused requests are futures too.** A request the service refuses (`EngineError`) becomes a future
  that is settled at once with the error and its category, as the SDK expects (`submit`, `refuse`).
- **A model's training ops run in `seq_id` order**, not arrival order (`ordered`): the SDK sends the
  chunks of one `forward_backward` concurrently with the first one last. An op that arrives early is
  held (its POST answered at once) until the gap fills, for at most `SEQ_GAP_WAIT_SECONDS`.
- **Resends are idempotent** (`once`): a resent request (same model and `seq_id`; same session and
  `model_seq_id` for `create_model`; same sampler and `seq_id` for `asample`) gets the first one's
  answer, also when the two arrive together.

Everything is keyed by the caller's owner id (`Access.key`): another key's request never takes a place
in a sequence, nor hits a cached answer, nor retrieves a future.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import Depends, Request

from eztinker.api import tinker_wire as wire
from eztinker.api.errors import failure
from eztinker.api.tinker_completions import Completions
from eztinker.engine.errors import EngineError, NotFoundError
from eztinker.scheduler import Job
from eztinker.service import JobView, Service
from eztinker.service import results as r
from eztinker.store.facade import FacadeState

LONG_POLL_SECONDS = 25.0  # how long a poll waits for an answer: under the SDK's 45 s read timeout
MAX_FUTURES = 100_000  # request ids remembered in memory (oldest forgotten first; jobs stay in the store)
MAX_ENCODED_KEPT = 1024  # finished samples' protobuf answers kept between their size and their fetch
SEQ_GAP_WAIT_SECONDS = 2.0  # how long an op that arrived early waits for the ops before it

# FacadeState namespaces
SESSIONS, SAMPLERS, CHECKPOINT_META, FUTURES, SECRETS = "session", "sampler", "ckpt_meta", "future", "secret"
RUN_META = "run_meta"  # a training run's `user_metadata`

Answer = dict[str, Any]


@dataclass
class WireFuture:
    """A request id's answer: its job (once submitted), or the error that refused it before it ran.

    `owner` is the key that sent the request: only it can retrieve the answer (`retrieve_future`).
    """

    owner: str | None
    job: Job | None = None
    record: JobView | None = None  # a job finished before this process started (read from the store)
    error: tuple[str, str] | None = None  # (message, category)
    submitted: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)

    def settle(self, job: Job | None = None, error: tuple[str, str] | None = None) -> None:
        self.job, self.error = job, error
        self.submitted.set_result(None)


@dataclass
class _Sequencer:
    """One model's training ops, submitted in `seq_id` order; early ones wait in `held`."""

    next_seq: int | None = None  # None: not known yet (the first op seen sets it)
    held: dict[int, tuple[WireFuture, str, Callable[[], Job]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one submission at a time
    timer: threading.Timer | None = None


@dataclass
class TinkerState:
    """What this facade remembers in memory (the durable part is in `durable`)."""

    service: Service
    durable: FacadeState
    lock: threading.Lock = field(default_factory=threading.Lock)
    futures: OrderedDict[str, WireFuture] = field(default_factory=OrderedDict)
    answers: OrderedDict[tuple[str, ...], Answer] = field(default_factory=OrderedDict)  # resends
    making: dict[tuple[str, ...], threading.Lock] = field(default_factory=dict)  # answers being made
    sequencers: dict[tuple[str, ...], _Sequencer] = field(default_factory=dict)  # by (owner, model)
    heartbeats: dict[str, float] = field(default_factory=dict)  # active session -> its last heartbeat
    clock: Callable[[], float] = time.time  # of heartbeats and session expiry (a test moves it)
    sessions_checked_at: float = 0.0  # when idle sessions were last looked for (`tinker_sessions`)
    completions: Completions = field(init=False)  # each sampling client's completion queue
    # Finished samples' protobuf answers, encoded to tell `retrieve_futures` their size and taken by the
    # `retrieve_future` that fetches them: each result is encoded once, not once per poll and again to send.
    encoded: OrderedDict[str, bytes] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.completions = Completions(
            self.durable, self._outcome, self.service.scheduler.get, self._payload_size
        )

    def _payload_size(self, request_id: str) -> int | None:
        """The byte length of finished sample `request_id`'s protobuf result, if its job is at hand."""
        with self.lock:
            kept = self.encoded.get(request_id)
        if kept is not None:
            return len(kept)
        job = self.service.scheduler.get(request_id)
        if job is None or job.status != "completed" or job.result is None:
            return None
        try:
            encoded = answer(job.op, job.run_id, job.result, protobuf=True)
        except EngineError:  # retrieve_future reports it as the request's failure
            return None
        if not isinstance(encoded, bytes):
            return None
        with self.lock:
            self.encoded[request_id] = encoded
            while len(self.encoded) > MAX_ENCODED_KEPT:  # a sample never fetched: encoded again if it is
                self.encoded.popitem(last=False)
        return len(encoded)

    def take_encoded(self, request_id: str) -> bytes | None:
        """The protobuf answer `_payload_size` encoded for `request_id`, handed over once (None if none)."""
        with self.lock:
            return self.encoded.pop(request_id, None)

    def _outcome(self, request_id: str) -> Literal["finished", "failed"] | None:
        """How sample `request_id` (its job's id) ended; None while it runs in this process."""
        job = self.service.scheduler.get(request_id)
        if job is not None:
            return None if not job.done else "finished" if job.status == "completed" else "failed"
        record = self.service.store.get_job(request_id)
        return "finished" if record is not None and record.status == "completed" else "failed"

    def add(self, future: WireFuture, request_id: str) -> str:
        with self.lock:
            self.futures[request_id] = future
            while len(self.futures) > MAX_FUTURES:
                self.futures.popitem(last=False)
        return request_id


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


def close(app_state: Any) -> None:
    """At shutdown (after the service stopped): write what the facade keeps for later."""
    state: TinkerState | None = getattr(app_state, "tinker", None)
    if state is not None:
        state.completions.flush()


def _new_id() -> str:
    return f"req-{uuid.uuid4().hex}"


# --- submitting ----------------------------------------------------------------------------------------


def submit(state: TinkerState, owner: str | None, make: Callable[[], Job], **extra: Any) -> Answer:
    """Submit an op now; a request the service refuses becomes a failed future, as the SDK expects."""
    future = WireFuture(owner)
    try:
        job = make()
    except EngineError as exc:
        future.settle(error=failure(exc))
        return {"request_id": state.add(future, _new_id()), **extra}
    future.settle(job)
    return {"request_id": state.add(future, job.job_id), **extra}


def refuse(state: TinkerState, owner: str | None, message: str, **extra: Any) -> Answer:
    """A request refused before it became an op: a future that settles at once with a user error."""
    future = WireFuture(owner)
    future.settle(error=(message, "user"))
    return {"request_id": state.add(future, _new_id()), **extra}


def once(state: TinkerState, key: tuple[str, ...], make: Callable[[], Answer]) -> Answer:
    """The answer for `key`: made by the first request, returned to every resend (one that arrives
    while the first is being made waits for it). A request whose `make` raises leaves no answer."""
    with state.lock:
        if key in state.answers:
            return state.answers[key]
        gate = state.making.setdefault(key, threading.Lock())
    with gate:
        with state.lock:
            if key in state.answers:
                return state.answers[key]
        try:
            answer = make()
            with state.lock:
                state.answers[key] = answer
                while len(state.answers) > MAX_FUTURES:
                    state.answers.popitem(last=False)
            return answer
        finally:
            with state.lock:
                state.making.pop(key, None)


def ordered(
    state: TinkerState, owner: str | None, model_id: str, seq_id: int | None, make: Callable[[], Job]
) -> Answer:
    """Submit a training op of `model_id` in `seq_id` order (see the module docstring); idempotent."""
    if not seq_id:
        return submit(state, owner, make, model_id=model_id)
    access = state.service.access
    with state.lock:
        seq = state.sequencers.setdefault(access.key(owner, model_id), _Sequencer())

    def sequenced() -> Answer:
        with seq.lock:
            if seq.next_seq is None:
                seq.next_seq = seq_id
            if seq_id > seq.next_seq:  # early: held until the ops before it are in
                future = WireFuture(owner)
                request_id = state.add(future, _new_id())
                seq.held[seq_id] = (future, request_id, make)
                if seq.timer is None:
                    _arm(state, seq)
                return {"request_id": request_id, "model_id": model_id}
            answer = submit(state, owner, make, model_id=model_id)
            seq.next_seq = max(seq.next_seq, seq_id + 1)
            _flush(state, seq)
            return answer

    return once(state, access.key(owner, "op", model_id, str(seq_id)), sequenced)


def expect(state: TinkerState, owner: str | None, model_id: str, next_seq: int) -> None:
    """A new model's first op will carry `next_seq`."""
    with state.lock:
        state.sequencers[state.service.access.key(owner, model_id)] = _Sequencer(next_seq=next_seq)


def _flush(state: TinkerState, seq: _Sequencer) -> None:
    """Submit the held ops that are now next in order (caller holds `seq.lock`)."""
    assert seq.next_seq is not None
    while seq.next_seq in seq.held:
        future, request_id, make = seq.held.pop(seq.next_seq)
        _submit_held(state, future, request_id, make)
        seq.next_seq += 1
    if not seq.held and seq.timer is not None:
        seq.timer.cancel()
        seq.timer = None


def _submit_held(state: TinkerState, future: WireFuture, request_id: str, make: Callable[[], Job]) -> None:
    try:
        job = make()
    except Exception as exc:  # e.g. a full queue: the op's POST was answered long ago, so fail its future
        future.settle(error=failure(exc))
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


# --- retrieving -------------------------------------------------------------------------------------------


def find(state: TinkerState, request_id: str, owner: str | None) -> WireFuture | None:
    """The caller's future `request_id`: remembered, or recovered from its job (live, or from the store
    after a restart). Another key's request is answered exactly like an unknown one. Blocking."""
    with state.lock:
        future = state.futures.get(request_id)
    service = state.service
    if future is not None:
        return future if service.access.allows(future.owner, owner) else None
    mapped = state.durable.get(FUTURES, request_id)
    job_id = mapped.value["job_id"] if mapped is not None else request_id
    job = service.scheduler.get(job_id)
    if job is not None:
        if not service.access.allows(job.owner, owner):
            return None
        future = WireFuture(job.owner)
        future.settle(job)
        return future
    try:
        record = service.views.get_job(job_id, owner)
    except NotFoundError:
        return None
    future = WireFuture(owner, record=record)
    future.submitted.set_result(None)
    return future


def answer(op: str, run_id: str | None, result: Any, protobuf: bool) -> dict[str, Any] | bytes:
    """The wire answer of a finished job, from its op and typed result alone (so it survives a restart).

    `protobuf`: the caller accepts protobuf (SDK 0.25+); older SDKs get the JSON forms.
    """
    if isinstance(result, r.ForwardBackwardOutput):
        if protobuf:
            return wire.encode_forward_backward_output(result.logprobs, result.metrics)
        return wire.forward_backward_output_json(result.logprobs, result.metrics)
    if isinstance(result, r.SampleOutput):
        (sampled,) = result.results
        if protobuf:
            return wire.encode_sample_response(sampled, result.echo)
        return wire.sample_response_json(sampled)
    if isinstance(result, r.OptimStepOutput):
        metrics = {
            "grad_norm:mean": result.grad_norm,
            "learning_rate:mean": result.learning_rate,
            "step:max": float(result.step),
        }
        return {"metrics": metrics}
    if isinstance(result, r.SaveOutput) and run_id is not None:
        saved: dict[str, Any] = {"path": wire.tinker_path_of(run_id, result.name)}
        if result.name.startswith("external_weights."):
            saved["size_bytes"] = result.size_bytes
        return saved
    if isinstance(result, r.SamplerOutput):
        return {"type": "save_weights_for_sampler", "sampling_session_id": result.sampler_id}
    if isinstance(result, r.RunOutput):
        if op == "load" or result.from_checkpoint:  # load_state*, or create-via-load
            return {"type": "load_weights", "model_id": result.run.run_id}
        return {"model_id": result.run.run_id, "type": "create_model"}
    return r.to_json(result) or {}
