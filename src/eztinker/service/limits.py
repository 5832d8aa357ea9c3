"""The server's limits on one request and on one API key, and the one token estimate of an op.

Every limit is checked before anything is queued, and a request over one is refused naming the field
(`InvalidInputError`, 422) or the quota (`QuotaExceededError` / `QueueFullError`, 429). `tokens` is an
op's work in tokens: the unit of the scheduler's fair share, pass budgets and start estimates.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from eztinker.engine import Datum
from eztinker.engine.errors import InvalidInputError
from eztinker.engine.sampler import SampleRequest
from eztinker.scheduler import QueueFullError
from eztinker.service.errors import QuotaExceededError
from eztinker.settings import Settings


def train_tokens(data: Sequence[Datum]) -> int:
    return sum(len(d.tokens) for d in data)


def sample_tokens(requests: Sequence[SampleRequest], text_prompt: str | None = None) -> int:
    """The prompt and every sample's max tokens; a text prompt not tokenized yet counts its characters."""
    prompts = sum(len(r.prompt) for r in requests) + len(text_prompt or "")
    return prompts + sum(r.num_samples * (r.params.max_tokens or 0) for r in requests)


class Limits:
    """`Settings`' limits, and the jobs each API key has in flight (only counted with keys on)."""

    def __init__(self, settings: Settings, *, per_key: bool) -> None:
        self.settings = settings
        self.per_key = per_key
        self._lock = threading.Lock()
        self._jobs: dict[str | None, int] = {}  # owner -> queued or running jobs

    def check_data(self, data: Sequence[Datum]) -> None:
        """A forward/forward_backward's data: each sequence, and the op's total tokens."""
        most = self.settings.max_sequence_tokens
        for i, datum in enumerate(data):
            if len(datum.tokens) > most:
                raise InvalidInputError(
                    f"data[{i}].tokens",
                    f"has {len(datum.tokens)} tokens; a sequence may have at most {most} on this server",
                )
        tokens = train_tokens(data)
        if tokens > self.settings.max_tokens_per_op:
            raise InvalidInputError(
                "data",
                f"has {tokens} tokens; one op takes at most {self.settings.max_tokens_per_op} (split it)",
            )

    def check_num_samples(self, num_samples: int, field: str = "n") -> None:
        """At most `max_samples` samples per request: a facade checks this first, before it makes anything
        per sample (an id, a choice)."""
        if num_samples > self.settings.max_samples:
            raise InvalidInputError(
                field,
                f"asks for {num_samples} samples; one request may ask for at most "
                f"{self.settings.max_samples} on this server",
            )

    def check_sampling(
        self, requests: Sequence[SampleRequest], *, n_field: str = "n", prompt_field: str = "prompt"
    ) -> None:
        """`max_samples` per request, and `max_sequence_tokens` for a prompt plus its max tokens."""
        for request in requests:
            self.check_num_samples(request.num_samples, n_field)
            length = len(request.prompt) + (request.params.max_tokens or 0)
            if length > self.settings.max_sequence_tokens:
                raise InvalidInputError(
                    prompt_field,
                    f"the prompt ({len(request.prompt)} tokens) plus max tokens ({request.params.max_tokens}) "
                    f"make {length}; a sequence may have at most {self.settings.max_sequence_tokens} on "
                    "this server",
                )

    def check_runs(self, live: int) -> None:
        """A key that holds `live` runs may create another?"""
        if self.per_key and live >= self.settings.max_runs_per_key:
            raise QuotaExceededError(
                f"this API key already has {live} live runs (the limit is {self.settings.max_runs_per_key}); "
                "delete runs you no longer train"
            )

    def admit_job(self, owner: str | None) -> bool:
        """Count a new job of `owner`'s, or refuse it; True if counted (then call `job_left`)."""
        if not self.per_key:
            return False
        with self._lock:
            in_flight = self._jobs.get(owner, 0)
            if in_flight >= self.settings.max_jobs_per_key:
                raise QueueFullError(
                    f"this API key has {in_flight} jobs queued or running (the limit is "
                    f"{self.settings.max_jobs_per_key}); wait for some to finish",
                    retry_after=1.0,
                )
            self._jobs[owner] = in_flight + 1
        return True

    def job_left(self, owner: str | None) -> None:
        with self._lock:
            left = self._jobs.get(owner, 1) - 1
            if left > 0:
                self._jobs[owner] = left
            else:
                self._jobs.pop(owner, None)
