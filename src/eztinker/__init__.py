"""EZTinker: a self-hosted Tinker.

Write the training loop in plain Python; the EZTinker server runs `forward_backward`, `optim_step`,
`sample` and `save/load_checkpoint` on its GPUs, for many LoRA runs on one frozen base model.

```python
from eztinker import EZTinkerClient, LossFunctionConfig

with EZTinkerClient(base_url="http://localhost:8000") as client:
    run_id = client.create_run(base_model="Qwen/Qwen2-0.5B-Instruct", lora_config={"r": 8})
    client.forward_backward(run_id, input_ids=ids, target_ids=ids)
    client.optim_step(run_id, learning_rate=2e-4).result()
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from eztinker.client import AsyncEZTinkerClient, EZTinkerClient  # httpx + pydantic only: no torch
from eztinker.models import LoRAConfig, LossFunctionConfig

if TYPE_CHECKING:
    from eztinker.server import serve as serve  # for type checkers; resolved lazily below

__all__ = ["AsyncEZTinkerClient", "EZTinkerClient", "LoRAConfig", "LossFunctionConfig", "__version__"]


def __getattr__(name: str) -> Any:
    # `eztinker.serve` (see `eztinker.server.serve`) loads the whole server, torch included: only on use.
    if name == "serve":
        from eztinker.server import serve as serve  # for type checkers; resolved lazily below

        return serve
    raise AttributeError(f"module 'eztinker' has no attribute {name!r}")
