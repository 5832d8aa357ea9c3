"""Scale-out: model workers as Ray actors (`ModelWorker`), routed to by the API server (`WorkerPool`).

`eztinker server --workers ray` uses them; the embedded default never imports Ray.
"""

from eztinker.distributed.pool import WorkerLostError, WorkerPool
from eztinker.distributed.worker import ModelWorker, WorkerStatus

__all__ = ["ModelWorker", "WorkerLostError", "WorkerPool", "WorkerStatus"]
