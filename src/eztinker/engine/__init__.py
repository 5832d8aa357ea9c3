"""The EZTinker engine: LoRA training and sampling on shared, frozen base models, in-process.

It takes typed inputs (`Datum`, `AdamParams` / `DimuonParams`, `SamplingParams`) and returns typed
outputs; it knows nothing about HTTP, JSON, request ids or queues — the server's facades translate to
and from these types, and its scheduler decides when each op runs. It imports without FastAPI or httpx.

```python
from eztinker.engine import AdamParams, Datum, Engine

engine = Engine()
run = engine.create_run("Qwen/Qwen2-0.5B-Instruct", {"r": 8})
engine.forward_backward(run.run_id, [Datum.from_labels(token_ids)])
engine.optim_step(run.run_id, AdamParams(learning_rate=1e-4))
```
"""

from eztinker.engine import types
from eztinker.engine.engine import Engine, EngineConfig, RunInfo, SamplerInfo, TrainOp
from eztinker.engine.errors import (
    ComputeError,
    ConflictError,
    EngineError,
    InvalidInputError,
    NonFiniteError,
    NotFoundError,
    UnknownLossError,
)
from eztinker.engine.losses import get_loss_function, list_losses, register_loss_function
from eztinker.engine.types import *  # noqa: F403 (the typed inputs and outputs: `types.__all__`)

__all__ = [
    "ComputeError",
    "ConflictError",
    "Engine",
    "EngineConfig",
    "EngineError",
    "InvalidInputError",
    "NonFiniteError",
    "NotFoundError",
    "RunInfo",
    "SamplerInfo",
    "TrainOp",
    "UnknownLossError",
    "get_loss_function",
    "list_losses",
    "register_loss_function",
]
__all__ += types.__all__
