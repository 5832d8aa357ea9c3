"""The service: where the backend, the job queue and the durable store meet (see `core`).

Its parts, one responsibility each: `core` (runs, jobs, checkpoints, restore), `access` (keys and
ownership: the one check every facade uses), `limits` (what one request and one key may ask, and the
one token estimate), `views` (listings, queue, metrics, health), `sampling` (the one way to sample, and sampler
snapshots), `results` (each op's typed result).
"""

from eztinker.service.access import Access
from eztinker.service.core import Service
from eztinker.service.errors import AuthenticationError, InvalidTokenError, QuotaExceededError, RunLostError
from eztinker.service.sampling import ModelTarget, SampleSpec, Sampling
from eztinker.service.views import JobView

__all__ = [
    "Access",
    "AuthenticationError",
    "InvalidTokenError",
    "JobView",
    "ModelTarget",
    "QuotaExceededError",
    "RunLostError",
    "SampleSpec",
    "Sampling",
    "Service",
]
