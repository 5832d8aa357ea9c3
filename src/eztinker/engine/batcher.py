"""Continuous batching: one running batch per base model that requests join and leave at every step.

`ContinuousBatcher.add` queues requests (checked at once; rows made as in `sampler`); each `step()`:
0. ends the waiting rows of requests that were cancelled (`SampleRequest.cancelled`) without a prefill
   (a running row's cancellation is seen with its next token);
1. admits waiting rows while the KV budget allows (`SamplerLimits`, sized for the worst case: every row
   running to its `max_tokens`), with one prefill forward over their prompts — the `n` samples of a
   request, and requests repeating a prompt on one adapter, share one prefill row, whose cache is
   copied to each of them;
2. merges the new rows' KV cache into the running one (the shorter left-padded along the sequence, the
   attention mask with it, then concatenated on the batch dimension);
3. chooses every row's next token, records it (stop ids and strings, logprobs, `on_token` callbacks);
4. drops finished rows (and the leading cache columns no remaining row attends to), completes requests
   whose rows are all done, and runs one decode forward for the rest.

Rows of any adapters decode together (the base model's routing sends each row to its own adapter). Each
row draws its uniforms from its own generator, a block of `_UNIFORM_BLOCK` whenever its own token count
reaches a multiple of the block, so a seeded request samples exactly the tokens it would alone, whenever
it joined and whatever it decoded with. Positions are explicit per row, so left padding changes nothing.

`step()` must be called by one thread at a time (the scheduler's worker); `add` from any thread.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from eztinker.engine import caches, sampler
from eztinker.engine.errors import ComputeError, EngineError
from eztinker.engine.model import BaseModel
from eztinker.engine.sampler import (
    _UNIFORM_BLOCK,
    SampleRequest,
    SamplerLimits,
    _attended_columns,
    _Batch,
    _choose_tokens,
    _collect,
    _decode_step,
    _device_tensor,
    _kv_bytes_per_token,
    _kv_cache_bytes,
    _make_rows,
    _prefill,
    _record,
    _Row,
    _temperature,
    _to_host,
    _token_logprobs,
    _top_logprobs_device,
    _top_pairs,
)
from eztinker.engine.types import SampleResult

Outcome = list[SampleResult] | Exception
DoneCallback = Callable[[Outcome], None]


@dataclass
class _Ticket:
    """One `add` call: its rows, how many are unfinished, and whom to tell when all are done."""

    num_requests: int
    rows: list[_Row]
    on_done: DoneCallback
    submitted: float = field(default_factory=time.perf_counter)
    pending: int = 0
    first_token: bool = False


class ContinuousBatcher:
    """The sampling engine of one base model (see the module docstring)."""

    def __init__(
        self,
        base: BaseModel,
        limits: SamplerLimits | None = None,
        *,
        on_first_token: Callable[[float], None] | None = None,
        on_tokens: Callable[[int], None] | None = None,
    ) -> None:
        self.base = base
        self.limits = limits or SamplerLimits()
        self.on_first_token, self.on_tokens = on_first_token, on_tokens
        self._waiting: collections.deque[_Row] = collections.deque()
        self._tickets: dict[int, _Ticket] = {}  # id(row) -> its ticket
        self._lock = threading.Lock()  # guards `_waiting` (add runs on any thread)
        self._batch: _Batch | None = None
        self._logits_BV: torch.Tensor | None = None  # next-token logits of the running rows
        self._admitting: list[_Row] = []
        self._kv_tokens = _kv_cache_bytes(base, self.limits) // _kv_bytes_per_token(base)
        self._state_tokens = sampler._state_tokens_per_row(base)  # linear-attention states, per row

    # --- submitting ----------------------------------------------------------------------------------

    def add(self, requests: Sequence[SampleRequest], on_done: DoneCallback) -> None:
        """Queue `requests`; `on_done` gets their results (request order) or the exception that failed them.

        Bad input raises here, before anything is queued. `on_done` runs on the stepping thread.
        """
        with self.base.lock:  # adapters checked under the lock that guards them
            rows = _make_rows(self.base, requests)
        if not rows:
            on_done([])
            return
        ticket = _Ticket(len(requests), rows, on_done, pending=len(rows))
        with self._lock:
            for row in rows:
                self._tickets[id(row)] = ticket
            self._waiting.extend(rows)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting) or self._batch is not None

    @property
    def waiting_rows(self) -> int:
        return len(self._waiting)

    @property
    def running_rows(self) -> int:
        return 0 if self._batch is None else len(self._batch.rows)

    def abort(self, error: Exception) -> None:
        """Fail every queued and running request with `error` (e.g. at shutdown)."""
        with self._lock:
            rows = list(self._waiting)
            self._waiting.clear()
        if self._batch is not None:
            rows += self._batch.rows
        self._batch, self._logits_BV = None, None
        self._fail(rows, error)

    # --- one step --------------------------------------------------------------------------------------

    def step(self) -> None:
        """Admit what fits, choose one token for every running row, then one decode forward."""
        if not self.has_work:
            return
        try:
            with self.base.lock, torch.inference_mode():
                self._step()
        except Exception as exc:  # one bad step fails the requests in it, never the stepping thread
            rows = self._batch.rows if self._batch is not None else []
            rows = rows + [r for r in self._admitting if all(r is not x for x in rows)]
            self._batch, self._logits_BV = None, None
            if isinstance(exc, torch.OutOfMemoryError):
                exc = ComputeError(f"out of memory while sampling {len(rows)} rows; try fewer or shorter")
            elif not isinstance(exc, EngineError):
                exc = ComputeError(f"sampling failed: {type(exc).__name__}: {exc}")
            self._fail(rows, exc)

    def _step(self) -> None:
        self._drop_cancelled()
        self._admitting = admitted = self._admit()  # neither waiting nor running until merged
        if admitted:
            batch, logits_BV = self._prefill_shared(admitted)
            if self._batch is None or self._logits_BV is None:
                self._batch, self._logits_BV = batch, logits_BV
            else:
                _merge(self._batch, batch)
                self._logits_BV = _group_by_adapter(self._batch, torch.cat([self._logits_BV, logits_BV]))
        batch, logits_BV = self._batch, self._logits_BV
        if batch is None or logits_BV is None:
            return
        rows = batch.rows
        for row in rows:  # each row's own stream: a fresh block whenever its token count reaches one
            if len(row.tokens) % _UNIFORM_BLOCK == 0:
                row.uniforms = (
                    1.0 - torch.rand(_UNIFORM_BLOCK, generator=row.generator, dtype=torch.float64)
                ).tolist()
        u = [r.uniforms[len(r.tokens) % _UNIFORM_BLOCK] for r in rows]
        tokens_B = _choose_tokens(logits_BV, batch, _device_tensor(u, torch.float64, logits_BV.device))
        logprobs_B = _token_logprobs(logits_BV, tokens_B)
        k = max(r.topk for r in rows)
        top = _top_logprobs_device(logits_BV, k) if k else ()
        # The step's one read back to the host: tokens, their log-probabilities and any top-k, together.
        tokens, logprobs, *top_host = _to_host(tokens_B, logprobs_B, *top)
        topk = _top_pairs(top_host[0], top_host[1], len(rows)) if top_host else None
        self._first_tokens(rows)
        done = _record(self.base, rows, [int(t) for t in tokens], logprobs, topk)
        if self.on_tokens is not None:
            self.on_tokens(len(rows))
        finished = [r for r, d in zip(rows, done, strict=True) if d]
        if finished:
            keep = [b for b, d in enumerate(done) if not d]
            if keep:
                keep_B = _device_tensor(keep, torch.long, self.base.device)
                batch.keep(keep_B, [rows[b] for b in keep])
                tokens_B = tokens_B[keep_B]
                if _mergeable(batch.cache):
                    _trim(batch)
            else:
                self._batch = self._logits_BV = None
            self._complete(finished)
        if self._batch is not None:
            self._logits_BV = _decode_step(self.base, self._batch, tokens_B)

    # --- admission and prefill -------------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        """Waiting rows whose request was cancelled end now, with no tokens: they are never prefilled."""
        with self._lock:
            if not any(r.cancelled is not None for r in self._waiting):
                return
            dropped = [r for r in self._waiting if r.cancelled is not None and r.cancelled()]
            if not dropped:
                return
            gone = {id(r) for r in dropped}
            self._waiting = collections.deque(r for r in self._waiting if id(r) not in gone)
        for row in dropped:
            row.stop_reason = "length"
        self._complete(dropped)

    def _admit(self) -> list[_Row]:
        """Waiting rows, in order, while the running batch plus them fits the limits (at least one row
        when nothing runs, so a request bigger than the budget still runs, alone)."""
        running = self._batch.rows if self._batch is not None else []
        if self._batch is not None and not _mergeable(self._batch.cache):
            return []
        limits = self.limits
        longest = max((len(r.prompt) + r.max_new for r in running), default=0)
        admitted: list[_Row] = []
        longest_prompt, wants_prompt = 0, False
        with self._lock:
            while self._waiting:
                row = self._waiting[0]
                n = len(running) + len(admitted) + 1
                total = max(longest, len(row.prompt) + row.max_new)
                prompt = max(longest_prompt, len(row.prompt))
                wants = wants_prompt or row.prompt_request is not None
                fits = (
                    n <= limits.max_rows
                    and n * (total + self._state_tokens) <= self._kv_tokens
                    and (len(admitted) + 1) * prompt <= limits.prefill_tokens
                    and (
                        not wants
                        or (len(admitted) + 1) * prompt * self.base.vocab_size <= limits.logits_elements
                    )
                )
                if not fits and (running or admitted):
                    break
                admitted.append(self._waiting.popleft())
                longest, longest_prompt, wants_prompt = total, prompt, wants
        return admitted

    def _prefill_shared(self, rows: list[_Row]) -> tuple[_Batch, torch.Tensor]:
        """One prefill per distinct (adapter, prompt) among `rows`, its cache copied to every row using it.

        The samples of a request share their prompt's prefill, and so do separate requests repeating a
        prompt on one adapter (RL groups sent one request per sample). A row carrying its request's
        prompt extras is the one that prefills (its logits at every prompt position are kept).
        """
        reps: dict[object, int] = {}  # (adapter, prompt) -> index in `firsts`
        firsts: list[_Row] = []
        index: list[int] = []
        for row in rows:
            key: object = (row.adapter, tuple(row.prompt), row.images)
            if key in reps and row.prompt_request is not None:
                if firsts[reps[key]].prompt_request is None:
                    firsts[reps[key]] = row  # it prefills for the group, extras included
                else:
                    key = id(row)  # another request's extras on the same prompt: a prefill of its own
            if key not in reps:
                reps[key] = len(firsts)
                firsts.append(row)
            index.append(reps[key])
        batch, logits_RV = _prefill(self.base, firsts)
        if len(firsts) == len(rows):
            return batch, logits_RV
        device = self.base.device
        index_B = _device_tensor(index, torch.long, device)
        caches.select_rows(batch.cache, index_B)
        batch.rows = rows
        batch.attention_mask = batch.attention_mask[index_B]
        batch.next_position = batch.next_position[index_B]
        batch.temperature = _device_tensor([_temperature(r.params) for r in rows], torch.float32, device)
        batch.top_k = _device_tensor([r.params.top_k for r in rows], torch.long, device)
        batch.top_p = _device_tensor([float(r.params.top_p) for r in rows], torch.float32, device)
        return batch, logits_RV[index_B]

    # --- finishing --------------------------------------------------------------------------------------

    def _first_tokens(self, rows: list[_Row]) -> None:
        for row in rows:
            if not row.tokens:
                ticket = self._tickets[id(row)]
                if not ticket.first_token:
                    ticket.first_token = True
                    if self.on_first_token is not None:
                        self.on_first_token(time.perf_counter() - ticket.submitted)

    def _complete(self, rows: list[_Row]) -> None:
        for row in rows:
            ticket = self._tickets.pop(id(row))
            ticket.pending -= 1
            if ticket.pending == 0:
                error = next((r.error for r in ticket.rows if r.error is not None), None)
                ticket.on_done(error if error is not None else _collect(ticket.num_requests, ticket.rows))

    def _fail(self, rows: list[_Row], error: Exception) -> None:
        failed: dict[int, _Ticket] = {}
        for row in rows:
            ticket = self._tickets.pop(id(row), None)
            if ticket is not None:
                failed[id(ticket)] = ticket
        for ticket in failed.values():  # a ticket's other rows (queued or running) go with it
            gone = {id(r) for r in ticket.rows}
            for row in ticket.rows:
                self._tickets.pop(id(row), None)
            with self._lock:
                self._waiting = collections.deque(r for r in self._waiting if id(r) not in gone)
            if self._batch is not None:
                keep = [b for b, r in enumerate(self._batch.rows) if id(r) not in gone]
                if not keep:
                    self._batch = self._logits_BV = None
                elif len(keep) < len(self._batch.rows):
                    keep_B = _device_tensor(keep, torch.long, self.base.device)
                    self._batch.keep(keep_B, [self._batch.rows[b] for b in keep])
                    assert self._logits_BV is not None
                    self._logits_BV = self._logits_BV[keep_B]
            ticket.on_done(error)


def run_to_completion(
    base: BaseModel, requests: Sequence[SampleRequest], limits: SamplerLimits | None = None
) -> list[SampleResult]:
    """Sample `requests` on a batcher of their own, stepped here until done (what `sample_batch` does)."""
    batcher = ContinuousBatcher(base, limits)
    outcome: list[Outcome] = []
    with base.lock:  # no training step changes an adapter half-way through these generations
        batcher.add(requests, outcome.append)
        while batcher.has_work:
            batcher.step()
    (result,) = outcome
    if isinstance(result, Exception):
        raise result
    return result


# --- cache surgery ---------------------------------------------------------------------------------------


def _mergeable(cache: DynamicCache) -> bool:
    """Whether new rows can join a batch with this cache (attention, sliding-window and linear-attention
    layers: `eztinker.engine.caches`); other caches run one admission at a time."""
    return caches.mergeable(cache)


def _merge(into: _Batch, new: _Batch) -> None:
    """Append `new`'s rows to `into`: caches and masks left-padded to one length, concatenated on rows."""
    L = max(into.attention_mask.shape[1], new.attention_mask.shape[1])
    caches.merge_rows(into.cache, new.cache, L)
    into.attention_mask = torch.cat(
        [_left_pad(into.attention_mask, L, 1), _left_pad(new.attention_mask, L, 1)]
    )
    into.rows = into.rows + new.rows
    for name in ("next_position", "temperature", "top_k", "top_p"):
        setattr(into, name, torch.cat([getattr(into, name), getattr(new, name)]))


def _group_by_adapter(batch: _Batch, logits_BV: torch.Tensor) -> torch.Tensor:
    """Reorder rows so each adapter's rows are contiguous: one routing segment per adapter, not per row."""
    first_seen: dict[str | None, int] = {}
    for b, row in enumerate(batch.rows):
        first_seen.setdefault(row.adapter, b)
    order = sorted(range(len(batch.rows)), key=lambda b: (first_seen[batch.rows[b].adapter], b))
    if order == list(range(len(order))):
        return logits_BV
    order_B = _device_tensor(order, torch.long, logits_BV.device)
    batch.keep(order_B, [batch.rows[b] for b in order])
    return logits_BV[order_B]


def _left_pad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _trim(batch: _Batch) -> None:
    """Drop leading cache columns that no remaining row attends to (left by rows that finished).

    How many columns each row attends to is known on the host (`sampler._attended_columns`), so this
    reads nothing back from the device. Called between a step's tokens and its decode forward."""
    start = batch.attention_mask.shape[1] - max(_attended_columns(r, pending=0) for r in batch.rows)
    if start <= 0:
        return
    caches.drop_leading_columns(batch.cache, start)
    batch.attention_mask = batch.attention_mask[:, start:]


__all__ = ["ContinuousBatcher", "run_to_completion", "sampler"]


class SamplingEngines:
    """One continuous batcher per base model; a scheduler steps them between passes (its background)."""

    def __init__(
        self,
        load: Callable[[str], BaseModel],
        *,
        on_first_token: Callable[[float], None] | None = None,
        on_tokens: Callable[[int], None] | None = None,
    ) -> None:
        self._load = load  # base model name -> the loaded model (e.g. `Engine.base_model`)
        self._on_first_token, self._on_tokens = on_first_token, on_tokens
        self._batchers: dict[str, ContinuousBatcher] = {}
        self._lock = threading.Lock()

    def batcher(self, base_model: str) -> ContinuousBatcher:
        with self._lock:
            if base_model not in self._batchers:
                self._batchers[base_model] = ContinuousBatcher(
                    self._load(base_model), on_first_token=self._on_first_token, on_tokens=self._on_tokens
                )
            return self._batchers[base_model]

    @property
    def has_work(self) -> bool:
        return any(b.has_work for b in list(self._batchers.values()))

    def step(self) -> None:
        for batcher in list(self._batchers.values()):
            if batcher.has_work:
                batcher.step()

    @property
    def waiting_rows(self) -> int:
        return sum(b.waiting_rows for b in list(self._batchers.values()))

    @property
    def running_rows(self) -> int:
        return sum(b.running_rows for b in list(self._batchers.values()))

    def abort(self, error: Exception) -> None:
        for batcher in list(self._batchers.values()):
            batcher.abort(error)
