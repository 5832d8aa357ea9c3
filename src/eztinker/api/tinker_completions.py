"""The Tinker SDK's session completion queue: one long-poll per sampling client instead of one per sample.

With `/client/config` `sample_use_retrieve_futures` (SDK 0.27+), a `SamplingClient` does not long-poll
`retrieve_future` for each of its samples. One background task per (sampling session, clone) long-polls
`/api/v1/retrieve_futures`, learns which of its requests finished or failed, and only then fetches each
payload with one `retrieve_future` (reference/tinker-wire-protocol.md §2.6). An RL loop with a thousand
samples in flight holds one open poll, not a thousand.

- **A queue per (caller, sampling session, clone).** `asample` tracks its request in the queue of its
  sampling session and clone (`seq_id // CLONE_STRIDE`: 0 for the original client, the `client_counter` of
  `join_sampling_session` for an unpickled copy). When the request's job ends, the queue gets an event
  `{"state": "finished" | "failed", "request_id"}` under the next cursor.
- **A finished event carries `response_payload_uncompressed_size`**, the byte length of the result's
  protobuf, as hosted Tinker sends it: the SDK reserves that much of its in-flight response budget
  (`inflight_response_bytes_semaphore_size`) before it fetches the payload. Left out where the result is
  not at hand (a request of an earlier process): the SDK then fetches without reserving.
- **Cursors** are integers that only grow, over the server's whole life: this process's start from its
  start time in milliseconds × 1000, above every cursor an earlier process gave out. A poll's `prev_cursor`
  acknowledges the events up to it (they are dropped); it gets every later event, at once if there is one,
  else when the next arrives, else `{"completions": []}` after the long-poll window (`timeout: 0` answers
  at once: the SDK's ack-only poll).
- **A request leaves the queue once its result is delivered**: by `retrieve_future` (the poller fetches
  each payload that way, and SDKs without the poller fetch only that way) or by the poll's
  `retrieved_request_ids` (of that poll's own queue), whichever comes first; by `cancel_future` (a
  cancelled request is never reported: nobody waits for it). A session that ended keeps its queues
  until they are empty: a copy of its client in another process may still poll them.
- **Durable.** Each tracked request is recorded (`PENDING`, one small write at `asample`; deleted, in
  batches, once it left), so after a restart a queue is seeded with its requests that were never delivered: those that
  were in flight, which the restart failed, are reported failed with that reason, and a client waiting on
  them hears of it instead of waiting forever.

Only the caller's own sampling sessions have queues (the routes check, in `tinker_sampling`); the queues
are keyed by the caller too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from eztinker.scheduler import Job
from eztinker.store.facade import FacadeState

CLONE_STRIDE = 1_000_000_000  # a sampling client's seq_ids start at clone × this (the SDK's rule)
PENDING = "sample_pending"  # FacadeState namespace: "<sampler>|<clone>|<request>" -> {}
# A client that never acknowledges loses its oldest events, rather than the server its memory.
MAX_EVENTS_PER_QUEUE = 100_000
DELETE_BATCH = 256  # records of requests that left, deleted together (see `Completions.leave`)

State = Literal["finished", "failed"]
QueueKey = tuple[str, ...]


@dataclass
class _Queue:
    """One (caller, sampling session, clone)'s requests: tracked, and ended but not yet acknowledged."""

    sampler_id: str
    clone: int
    owner: str | None
    tracked: set[str] = field(default_factory=set)  # request ids not yet delivered (also in `PENDING`)
    events: dict[str, tuple[int, State]] = field(
        default_factory=dict
    )  # request -> (cursor, state), by cursor
    changed: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)
    ended: bool = False  # its Tinker session finished: dropped once nothing is left in it

    def record_key(self, request_id: str) -> str:
        return f"{self.sampler_id}|{self.clone}|{request_id}"

    def wake(self) -> None:
        """Wake the polls waiting on this queue (each waits on the future it found; the next gets a new one)."""
        changed, self.changed = self.changed, concurrent.futures.Future()
        changed.set_result(None)


class Completions:
    """Every sampling session's completion queue (see the module docstring). Thread-safe.

    `outcome(request_id)` says how a request of an earlier process ended ("finished", "failed", or None
    while it is still running in this one: its job is then returned by `live(request_id)`).
    """

    def __init__(
        self,
        durable: FacadeState,
        outcome: Callable[[str], State | None],
        live: Callable[[str], Job | None],
        size: Callable[[str], int | None] = lambda _: None,
    ) -> None:
        self._durable, self._outcome, self._live, self._size = durable, outcome, live, size
        self._lock = threading.Lock()
        self._queues: dict[QueueKey, _Queue] = {}
        self._where: dict[str, QueueKey] = {}  # tracked request -> its queue
        self._gone: list[str] = []  # records of requests that left, not deleted yet
        self._cursor = int(time.time() * 1000) * 1000

    # --- tracking -------------------------------------------------------------------------------------

    def track(
        self, key: QueueKey, sampler_id: str, clone: int, owner: str | None, request_id: str, job: Job | None
    ) -> None:
        """Put request `request_id` in its queue; its event comes when `job` ends (at once without a job:
        the request was refused before it became one)."""
        queue = self._queue(key, sampler_id, clone, owner)  # (seeded first: a new cursor follows the old)
        if job is None:
            with self._lock:
                self._add_event(queue, request_id, "failed")
            return
        with self._lock:
            queue.tracked.add(request_id)
            self._where[request_id] = key
        self._durable.put(PENDING, queue.record_key(request_id), {}, owner=owner)
        job.future.add_done_callback(lambda done: self._ended(key, request_id, done.result()))

    def _ended(self, key: QueueKey, request_id: str, job: Job | None) -> None:
        with self._lock:
            queue = self._queues.get(key)
            if queue is not None and request_id in queue.tracked:  # not cancelled or dropped meanwhile
                ok = job is not None and job.status == "completed"
                self._add_event(queue, request_id, "finished" if ok else "failed")

    def _add_event(self, queue: _Queue, request_id: str, state: State) -> None:
        """(Lock held.)"""
        self._cursor += 1
        queue.events[request_id] = (self._cursor, state)
        while len(queue.events) > MAX_EVENTS_PER_QUEUE:
            del queue.events[next(iter(queue.events))]
        queue.wake()

    def _queue(self, key: QueueKey, sampler_id: str, clone: int, owner: str | None) -> _Queue:
        """The queue `key`; made on first use and seeded with the requests an earlier process left in it.
        Blocking (the first use reads the store)."""
        with self._lock:
            queue = self._queues.get(key)
        if queue is not None:
            return queue
        fresh = _Queue(sampler_id, clone, owner)
        left = [
            r.key.rsplit("|", 1)[1]
            for r in self._durable.records(PENDING, owner=owner, prefix=fresh.record_key(""))
        ]
        outcomes = {request_id: self._outcome(request_id) for request_id in left}
        with self._lock:
            if key in self._queues:  # made meanwhile by another request
                return self._queues[key]
            self._queues[key] = fresh
            for request_id, state in outcomes.items():
                fresh.tracked.add(request_id)
                self._where[request_id] = key
                if state is not None:
                    self._add_event(fresh, request_id, state)
        for request_id in [r for r, state in outcomes.items() if state is None]:
            job = self._live(request_id)
            if job is None:  # neither ended nor running: reported failed, never left waiting
                self._ended(key, request_id, None)
            else:
                job.future.add_done_callback(lambda done, r=request_id: self._ended(key, r, done.result()))
        return fresh

    # --- polling --------------------------------------------------------------------------------------

    async def poll(
        self,
        key: QueueKey,
        sampler_id: str,
        clone: int,
        owner: str | None,
        *,
        prev_cursor: int,
        wait_seconds: float,
        retrieved: Iterable[str] = (),
        hung_up: Callable[[Awaitable[Any]], Awaitable[Any]] | None = None,
    ) -> dict[str, Any]:
        """The queue's events after `prev_cursor` (which acknowledges the ones before), waiting up to
        `wait_seconds` for one if there is none; `retrieved` leave the queue. `hung_up(waiting)` awaits
        `waiting` unless the client leaves first (then the poll answers nobody, at once)."""
        queue, changed, empty = await asyncio.to_thread(
            self._acknowledge, key, sampler_id, clone, owner, prev_cursor, list(retrieved)
        )
        if empty and wait_seconds > 0:
            waiting = asyncio.wait([asyncio.wrap_future(changed)], timeout=wait_seconds)
            if hung_up is not None:
                await hung_up(waiting)
            else:
                await waiting
        with self._lock:
            events = list(queue.events.items())
        completions = await asyncio.to_thread(self._completions, events)
        cursor = max((c for _, (c, _) in events), default=prev_cursor)
        return {"completions": completions, "cursor": cursor}

    def _completions(self, events: list[tuple[str, tuple[int, State]]]) -> list[dict[str, Any]]:
        """The wire form of `events`, each finished one with its payload's size where known. Blocking (a
        size is the length of the encoded result)."""
        completions: list[dict[str, Any]] = []
        for request_id, (_, state) in events:
            completion: dict[str, Any] = {"state": state, "request_id": request_id}
            size = self._size(request_id) if state == "finished" else None
            if size is not None:
                completion["response_payload_uncompressed_size"] = size
            completions.append(completion)
        return completions

    def _acknowledge(
        self,
        key: QueueKey,
        sampler_id: str,
        clone: int,
        owner: str | None,
        prev_cursor: int,
        retrieved: list[str],
    ) -> tuple[_Queue, concurrent.futures.Future[None], bool]:
        """A poll's acknowledgements: events up to `prev_cursor` dropped, `retrieved` requests gone. Returns
        the queue, the future its next event sets, and whether it has no events now. Blocking."""
        queue = self._queue(key, sampler_id, clone, owner)
        if self.leave(retrieved, of=key):
            self.flush()
        with self._lock:
            for request_id in [r for r, (cursor, _) in queue.events.items() if cursor <= prev_cursor]:
                del queue.events[request_id]
            if queue.ended and not queue.tracked and not queue.events:  # its session ended: all delivered
                self._queues.pop(key, None)
            return queue, queue.changed, not queue.events

    # --- leaving --------------------------------------------------------------------------------------

    def leave(self, request_ids: list[str], *, of: QueueKey | None = None) -> bool:
        """These requests leave their queues, and then the store: their results reached their client, or
        they were cancelled (never reported then). Never blocks: their records are deleted by `flush`,
        `DELETE_BATCH` at a time, and this says when a batch is due. One left behind by a crash is reported
        once more after the restart, to a client that no longer waits on it (the SDK keeps such a
        completion by its id, and nothing asks for it). With `of`, only requests of that queue leave (a
        poll acknowledges its own queue's requests, whatever ids it names)."""
        with self._lock:
            for request_id in request_ids:
                key = self._where.get(request_id)
                queue = self._queues.get(key) if key is not None else None
                if queue is None or request_id not in queue.tracked or (of is not None and key != of):
                    continue
                del self._where[request_id]
                queue.tracked.discard(request_id)
                queue.events.pop(request_id, None)
                self._gone.append(queue.record_key(request_id))
            return len(self._gone) >= DELETE_BATCH

    def flush(self) -> None:
        """Delete the records of every request that left (when `leave` says a batch is due, and at
        shutdown). Blocking."""
        with self._lock:
            gone, self._gone = self._gone, []
        self._durable.delete_many(PENDING, gone)

    def end_session(self, session_id: str, *, expired: bool) -> list[str]:
        """A Tinker session ended; returns its sampling sessions' requests still running.

        Its queues stay until what they hold is delivered, then go: an unpickled copy of its client in
        another process may still be waiting on them (and if the session expired, the caller cancels
        what still runs, which is then reported failed to whoever polls). An expired session's records
        go now: nobody is expected back for them after a restart."""
        prefix = f"{session_id}:sample:"
        running = []
        with self._lock:
            for key in [k for k, q in self._queues.items() if q.sampler_id.startswith(prefix)]:
                queue = self._queues[key]
                running += [r for r in queue.tracked if r not in queue.events]
                queue.ended = True
                if not queue.tracked and not queue.events:
                    del self._queues[key]
        if expired:
            self._durable.delete_many(PENDING, prefix=prefix)
        return running
