"""`Sampling`: the one way every facade samples, and the sampler snapshots it samples from.

A sampling job names its target (`ModelTarget`: a base model, a run's live adapter, or a snapshot) and
engine requests (`SampleSpec`); it is checked against the server's limits when submitted, and its
requests join the base model's continuous batch when it starts.

Snapshots a facade takes for a session, not under a name (`save_sampler(..., ephemeral=True)`: Tinker's
`save_weights_and_get_sampling_client`; `save_inflight`; `from_checkpoint(..., held=True)`) are *held*:
freed (`Backend.delete_sampler`) once no sampling job uses them and

- a later ephemeral save of the same run replaced them and they went unused for `superseded_grace`
  seconds (an RL loop's older sampling clients may still finish their rollouts meanwhile);
- a later inflight save moved the run's inflight target on (nothing names an old target any more);
- or the caller released them (`release`: the Tinker session ended) or their run was deleted.

A snapshot saved under a name (a checkpoint) is never freed here; one loaded from a checkpoint is loaded
again when next named.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from eztinker.backend import RunSpec
from eztinker.engine import SampleResult, SamplerInfo
from eztinker.engine.errors import CancelledRequestError, InvalidInputError, NotFoundError
from eztinker.engine.sampler import SampleRequest
from eztinker.engine.types import ImageChunk
from eztinker.scheduler import Batchable, Completion, Deferred, Job, complete_when_done, when_done
from eztinker.service.limits import sample_tokens
from eztinker.service.results import SampleOutput, SamplerOutput

if TYPE_CHECKING:
    from eztinker.service.core import Service

log = logging.getLogger(__name__)

CANCELLED = "the sample was cancelled by its client (cancel_future) before it finished"
SUPERSEDED_GRACE_SECONDS = 120.0  # a replaced ephemeral snapshot unused this long is freed
_FREED_KEPT = 10_000  # why a freed snapshot is gone, for this many, to answer a late request with


@dataclass(frozen=True)
class ModelTarget:
    """What a sampling job runs on: a base model, and the adapter (run or snapshot) on it, if any."""

    base_model: str
    adapter: str | None
    run_id: str | None  # set when the adapter is a live run: the job is then ordered with the run's ops


@dataclass(frozen=True)
class SampleSpec:
    """One sampling job: engine requests on one target, and what the caller wants back.

    `text_prompt`: the single request's prompt as text, tokenized when the job starts (its model may
    not be loaded yet). `cancellable`: the job may be cancelled by id (`Sampling.cancel`). `decode`: the result also holds each sample's text. `echo`: request details the
    caller's encoding of the result needs later, kept with it. `check_now`: also refuse a bad request
    (token ids, top-k, prompt shapes) before it is queued. `n_field` / `prompt_field` name the caller's
    fields in errors.
    """

    target: ModelTarget
    requests: list[SampleRequest]
    text_prompt: str | None = None
    decode: bool = False
    echo: dict[str, Any] = field(default_factory=dict)
    check_now: bool = False
    cancellable: bool = False
    n_field: str = "n"
    prompt_field: str = "prompt"


@dataclass
class _Held:
    """A held snapshot (see the module docstring) and what decides when it is freed."""

    kind: Literal["snapshot", "inflight", "loaded"]
    run_id: str | None  # the run it was taken from (None: loaded from a checkpoint)
    last_used: float = field(default_factory=time.monotonic)
    in_use: int = 0  # sampling jobs submitted on it and not finished
    superseded: bool = False
    released: bool = False


class Sampling:
    """Sampling jobs and sampler snapshots of one service."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.superseded_grace = SUPERSEDED_GRACE_SECONDS
        self._held: dict[str, _Held] = {}
        self._latest: dict[str, str] = {}  # run -> its latest ephemeral snapshot
        self._inflight: dict[str, str] = {}  # run -> the snapshot its inflight sampling clients sample
        self._freed: collections.OrderedDict[str, str] = collections.OrderedDict()  # id -> why
        self._held_lock = threading.Lock()
        self._wake = threading.Event()
        self._reaper: threading.Thread | None = None
        # (owner, run, checkpoint) -> the snapshot `checkpoint_target` loaded from it (forgotten when the
        # checkpoint is deleted: a new checkpoint of that name is loaded afresh)
        self._checkpoint_samplers: dict[tuple[str, ...], str] = {}
        self._loading = threading.Lock()
        self._cancels: dict[str, threading.Event] = {}  # cancellable job -> set once it is cancelled
        service.checkpoints.on_deleted.append(self._checkpoint_deleted)
        service.checkpoints.on_replaced.append(self._checkpoint_deleted)  # new weights: loaded afresh

    def checkpoint_target(self, run_id: str, name: str, owner: str | None) -> ModelTarget:
        """Checkpoint `name` of the caller's run as a sampler snapshot of the caller's: loaded on first use
        (`from_checkpoint`), the same snapshot afterwards. Another key's private checkpoint is missing; a
        published one is loaded as a snapshot of the caller's. Blocking."""
        self.service.access.readable_checkpoint(run_id, name, owner)
        key = self.service.access.key(owner, run_id, name)
        with self._loading:  # one load per checkpoint, also when requests for it arrive together
            sampler_id = self._checkpoint_samplers.get(key)
            if sampler_id is None or self.sampler(sampler_id, owner) is None:
                sampler_id = f"ckpt-{uuid.uuid4().hex[:16]}"
                self.from_checkpoint(run_id, name, sampler_id, owner)
                self._checkpoint_samplers[key] = sampler_id
        return self.target(owner, sampler_id=sampler_id)

    def _checkpoint_deleted(self, run_id: str, name: str) -> None:
        with self._loading:
            for key in [k for k in self._checkpoint_samplers if k[1:] == (run_id, name)]:
                del self._checkpoint_samplers[key]

    def target(
        self,
        owner: str | None,
        *,
        run_id: str | None = None,
        sampler_id: str | None = None,
        base_model: str | None = None,
    ) -> ModelTarget:
        """A run's live adapter, the caller's sampler snapshot, or a base model (default: the server's)."""
        if run_id is not None:
            return ModelTarget(self.service.live_run(run_id, owner).base_model, run_id, run_id)
        if sampler_id is not None:
            info = self.sampler(sampler_id, owner)
            if info is None:
                why = self.freed_reason(sampler_id) or (
                    "snapshots live in the server's memory, so a restart frees them; take one again from the "
                    "run (save_sampler), or sample a saved checkpoint"
                )
                raise NotFoundError(f"no sampler {sampler_id!r}: {why}")
            return ModelTarget(info.base_model, sampler_id, None)
        return ModelTarget(base_model or self.default_base_model(), None, None)

    def resolve_model(self, name: str, owner: str | None) -> ModelTarget:
        """What an OpenAI `model` names: a loaded or configured base model, a live run, or a snapshot."""
        if name in self.service.backend.loaded_models or name in self.service.settings.models:
            return ModelTarget(base_model=name, adapter=None, run_id=None)
        record = self.service.active.get(name) or self.service.store.get_run(name)
        if record is not None and self.service.access.allows(record.owner, owner):
            return self.target(owner, run_id=name)  # a lost run is refused with the way to resume it
        if self.sampler(name, owner) is not None:
            return self.target(owner, sampler_id=name)
        raise NotFoundError(
            f"the model {name!r} does not exist: name a base model, a run id or a sampler id (GET /v1/models)"
        )

    def sampler(self, sampler_id: str, owner: str | None) -> SamplerInfo | None:
        """The caller's sampler snapshot `sampler_id`, if it has one."""
        for info in self.service.backend.list_samplers():
            if info.sampler_id == sampler_id and self.service.access.allows_sampler(info, owner):
                return info
        return None

    def sample(self, spec: SampleSpec, owner: str | None) -> Job:
        """The one way every facade samples: a job whose requests join its base model's sampling engine.

        Checked now against the server's limits. The requests start when the job does (a snapshot saved
        by an earlier job of the run exists by then); jobs of many callers start in one pass, so they
        share one prefill. A job on a live run is ordered with the run's training ops. The result is a
        `SampleOutput`.
        """
        target = spec.target
        requests = [replace(r, adapter=target.adapter) for r in spec.requests]
        cancelled = threading.Event()
        if spec.cancellable:
            requests = [replace(r, cancelled=_either(cancelled.is_set, r.cancelled)) for r in requests]
        chunks = spec.echo.get("prompt_chunks")
        if chunks is not None:  # a prompt with images (Tinker's ModelInput chunks), on the target's model
            prompt, images = self.expand_chunks(target.base_model, chunks, f"{spec.prompt_field}.chunks")
            requests = [replace(r, prompt=prompt, images=images) for r in requests]
            spec = replace(spec, echo={k: v for k, v in spec.echo.items() if k != "prompt_chunks"})
        self.service.limits.check_sampling(requests, n_field=spec.n_field, prompt_field=spec.prompt_field)
        if spec.check_now:
            self.service.backend.check_requests(target.base_model, requests)

        def start(complete: Completion) -> None:
            tokenizer: Any = (
                self.service.backend.tokenizer(target.base_model) if spec.text_prompt or spec.decode else None
            )
            ready = requests
            if spec.text_prompt is not None:
                prompt = tokenizer(spec.text_prompt, add_special_tokens=False)["input_ids"]
                ready = [replace(requests[0], prompt=list(prompt))]
                self.service.limits.check_sampling(
                    ready, n_field=spec.n_field, prompt_field=spec.prompt_field
                )

            def sampled(results: list[SampleResult]) -> SampleOutput:
                if cancelled.is_set():  # its rows stopped early: not a result
                    raise CancelledRequestError(CANCELLED)
                texts = None
                if spec.decode:
                    texts = [[decode(tokenizer, s.tokens) for s in r.sequences] for r in results]
                return SampleOutput(results, [list(r.prompt) for r in ready], texts, dict(spec.echo))

            complete_when_done(self.service.backend.sample(target.base_model, ready), sampled, complete)

        deferred = Deferred(start)
        batch = Batchable(kind="sample", group="sample", request=None, finish=lambda _: deferred)
        tokens = sample_tokens(requests, spec.text_prompt)
        adapter = target.adapter
        self._use(adapter)  # a held snapshot stays until this job is over
        try:
            # Shared: a run's samples generate together; its training ops wait for them, and they for those.
            job = self.service.submit(
                "sample", target.run_id, lambda: deferred, owner, tokens=tokens, batch=batch, shared=True
            )
        except BaseException:
            self._done_using(adapter)
            raise
        job.future.add_done_callback(lambda _: self._done_using(adapter))
        if spec.cancellable:
            with self._held_lock:
                self._cancels[job.job_id] = cancelled
            job.future.add_done_callback(lambda _: self._forget_cancel(job.job_id))
        return job

    def cancel(self, job_id: str) -> bool:
        """Cancel cancellable sampling job `job_id` (the caller checked it is theirs): a queued job fails at
        once; a running one stops decoding at its next token and fails. False if it is not cancellable or
        already finished. Either way it fails with `CancelledRequestError`, never with partial samples."""
        with self._held_lock:
            flag = self._cancels.get(job_id)
        if flag is None:
            return False
        flag.set()
        self.service.scheduler.cancel(job_id, CANCELLED)  # if still queued; else its rows stop
        return True

    def _forget_cancel(self, job_id: str) -> None:
        with self._held_lock:
            self._cancels.pop(job_id, None)

    def save_sampler(
        self, run_id: str, sampler_id: str, owner: str | None, *, ephemeral: bool = False
    ) -> Job:
        """Snapshot the run's adapter (in order with its other ops) as sampler `sampler_id`.

        `ephemeral`: a snapshot taken for a session, not under a name: held (see the module docstring), and
        it replaces the run's previous ephemeral snapshot."""
        self.service.live_run(run_id, owner)
        self.service.access.claim_sampler(sampler_id, owner)

        def taken(info: SamplerInfo) -> SamplerOutput:
            if ephemeral:
                self._hold(info.sampler_id, _Held("snapshot", run_id), latest=self._latest)
            return SamplerOutput(info.sampler_id, info.base_model, info.step)

        return self.service.submit(
            "save_sampler",
            run_id,
            lambda: when_done(self.service.backend.save_sampler(run_id, sampler_id), taken),
            owner,
        )

    def save_inflight(self, run_id: str, session_id: str, owner: str | None) -> Job:
        """Publish the run's current weights as its *inflight* target (Tinker's `kind="inflight"`), in order
        with its other ops; the result names `session_id`, the caller's new sampling session on it.

        Every inflight session of a run samples the run's one target (`inflight_target`), and a later inflight
        save moves it on for all of them: a snapshot of the newer weights takes its place, and the old one is
        freed once the jobs sampling it are over (a job samples the target of when it was submitted: weights
        saved when its session was created, or newer)."""
        self.service.live_run(run_id, owner)
        self.service.access.claim_sampler(session_id, owner)
        snapshot = f"{run_id}:inflight:{uuid.uuid4().hex[:12]}"
        self.service.access.claim_sampler(snapshot, owner)

        def taken(info: SamplerInfo) -> SamplerOutput:
            self._hold(info.sampler_id, _Held("inflight", run_id), latest=self._inflight)
            return SamplerOutput(session_id, info.base_model, info.step)

        return self.service.submit(
            "save_sampler",
            run_id,
            lambda: when_done(self.service.backend.save_sampler(run_id, snapshot), taken),
            owner,
        )

    def inflight_target(self, run_id: str, owner: str | None) -> ModelTarget:
        """The snapshot run `run_id`'s inflight sampling sessions sample now."""
        with self._held_lock:
            sampler_id = self._inflight.get(run_id)
        if sampler_id is None:
            raise NotFoundError(
                f"run {run_id!r} has no inflight weights (its run was deleted, its session ended, or the server "
                "restarted since they were saved); save them again (save_weights_and_get_sampling_client)"
            )
        return self.target(owner, sampler_id=sampler_id)

    def from_checkpoint(
        self, run_id: str, name: str, sampler_id: str, owner: str | None, *, held: bool = False
    ) -> str:
        """Load a checkpoint's adapter as sampler snapshot `sampler_id`; returns its base model. Blocking.

        `held`: freed when released (the caller loads it again from the checkpoint when next named)."""
        record, checkpoint = self.service.access.readable_checkpoint(run_id, name, owner)
        self.service.access.claim_sampler(sampler_id, owner)
        scratch = f"{sampler_id}.loading"
        self.service.backend.create_run(
            RunSpec(record.base_model, adapter_path=checkpoint.path, run_id=scratch)
        )
        try:
            base_model = self.service.backend.save_sampler(scratch, sampler_id).result().base_model
        finally:
            self.service.backend.delete_run(scratch)
        if held:
            self._hold(sampler_id, _Held("loaded", None))
        return base_model

    # --- held snapshots: freed when nothing uses them (see the module docstring) ------------------------

    def release(self, sampler_ids: Iterable[str] = (), run_ids: Iterable[str] = ()) -> None:
        """Free these held snapshots, and the held snapshots of these runs, once no job uses them (a session
        ended, a run was deleted). Snapshots not held are left alone."""
        samplers, runs = set(sampler_ids), set(run_ids)
        with self._held_lock:
            for sampler_id, held in self._held.items():
                if sampler_id in samplers or held.run_id in runs:
                    held.released = True
            for run_id in runs:
                self._latest.pop(run_id, None)
                self._inflight.pop(run_id, None)
        self.reap()

    def freed_reason(self, sampler_id: str) -> str | None:
        """Why held snapshot `sampler_id` was freed, if it was (and is recent enough to remember)."""
        with self._held_lock:
            return self._freed.get(sampler_id)

    def held_samplers(self) -> list[str]:
        """The held snapshots not freed yet."""
        with self._held_lock:
            return list(self._held)

    def reap(self) -> list[str]:
        """Free the held snapshots due now; returns their ids."""
        now, due = time.monotonic(), []
        with self._held_lock:
            for sampler_id, held in list(self._held.items()):
                reason = self._due(held, now)
                if reason is not None:
                    del self._held[sampler_id]
                    self._freed[sampler_id] = reason
                    due.append(sampler_id)
            while len(self._freed) > _FREED_KEPT:
                self._freed.popitem(last=False)
        for sampler_id in due:
            try:
                self.service.backend.delete_sampler(sampler_id)
            except NotFoundError:  # gone already (its worker died)
                pass
            except Exception:
                log.exception("could not free sampler snapshot %s", sampler_id)
        return due

    def _due(self, held: _Held, now: float) -> str | None:
        """Why `held` is to be freed now, or None."""
        if held.in_use:
            return None
        if held.released:
            return "its session ended or its run was deleted"
        if held.superseded and held.kind == "inflight":
            return "a later inflight save replaced it"
        if held.superseded and held.kind == "snapshot" and now - held.last_used >= self.superseded_grace:
            return (
                f"a later save_weights_and_get_sampling_client of its run replaced it and it went unused for "
                f"{self.superseded_grace:g} s; save weights under a name (save_weights_for_sampler) to keep them"
            )
        return None

    def _hold(self, sampler_id: str, held: _Held, latest: dict[str, str] | None = None) -> None:
        """Hold snapshot `sampler_id`; with `latest`, it replaces its run's entry there."""
        with self._held_lock:
            self._held[sampler_id] = held
            if latest is not None and held.run_id is not None:
                previous = latest.get(held.run_id)
                latest[held.run_id] = sampler_id
                if previous is not None and previous in self._held:
                    self._held[previous].superseded = True
        self._start_reaper()
        # Off this thread (the save's: a scheduler worker, or a Ray reply's callback): the reaper frees.
        self._wake.set()

    def _use(self, adapter: str | None) -> None:
        """A job is about to sample `adapter`: a held snapshot stays until `_done_using`."""
        if adapter is None:
            return
        with self._held_lock:
            held = self._held.get(adapter)
            if held is not None:
                held.in_use += 1
                held.last_used = time.monotonic()
                return
            reason = self._freed.get(adapter)
        if reason is not None:
            raise NotFoundError(f"sampler {adapter!r} was freed: {reason}")

    def _done_using(self, adapter: str | None) -> None:
        with self._held_lock:
            held = self._held.get(adapter) if adapter is not None else None
            if held is None:
                return
            held.in_use -= 1
            held.last_used = time.monotonic()
            if held.in_use or not (held.superseded or held.released):
                return
        self._wake.set()  # off this thread (a scheduler worker's): the reaper frees it

    def _start_reaper(self) -> None:
        with self._held_lock:
            if self._reaper is not None and self._reaper.is_alive():
                return
            self._reaper = threading.Thread(target=self._reap_loop, name="sampler-reaper", daemon=True)
            self._reaper.start()

    def _reap_loop(self) -> None:
        """Free held snapshots as they fall due; ends when none is held (`_hold` starts it again)."""
        while True:
            self._wake.wait(timeout=max(0.05, min(self.superseded_grace / 4, 5.0)))
            self._wake.clear()
            try:
                self.reap()
            except Exception:
                log.exception("freeing sampler snapshots failed")
            with self._held_lock:
                if not self._held:
                    self._reaper = None
                    return

    def expand_chunks(
        self,
        base_model: str,
        chunks: Sequence[Sequence[int] | ImageChunk],
        where: str,
        *,
        frame: bool = False,
    ) -> tuple[list[int], tuple[ImageChunk, ...]]:
        """(tokens, images) of a model input given as text and image chunks, for `base_model`: each image
        a run of the model's placeholder token as long as its token count (`eztinker.engine.vision`;
        `frame`: with the model's vision start / end tokens around it). Text-only chunks need no model.
        A bad image, or an image for a model without a vision tower, is refused naming `where[i]`.
        Blocking (the model's image processor runs, and the model loads if it has not)."""
        if not any(isinstance(chunk, ImageChunk) for chunk in chunks):
            return [int(t) for chunk in chunks if not isinstance(chunk, ImageChunk) for t in chunk], ()
        return self.service.backend.expand_chunks(base_model, list(chunks), where, frame=frame)

    def default_base_model(self) -> str:
        if self.service.settings.models:
            return self.service.settings.models[0]
        if self.service.backend.loaded_models:
            return self.service.backend.loaded_models[0]
        raise InvalidInputError(
            "base_model", "no base model is loaded: pass base_model, or start the server with --model NAME"
        )


def _either(first: Callable[[], bool], second: Callable[[], bool] | None) -> Callable[[], bool]:
    """A request's `cancelled` poll: true once either says so."""
    return first if second is None else lambda: first() or second()


def decode(tokenizer: Any, tokens: list[int]) -> str:
    """The text of `tokens`, special tokens left out."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return text if isinstance(text, str) else "".join(text)
