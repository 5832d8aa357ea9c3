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

The clients (httpx) and `serve` (the whole server) load on first use, so that importing a part of the
package — the engine on a worker, say — imports no web stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from eztinker.models import LoRAConfig, LossFunctionConfig

if TYPE_CHECKING:  # for type checkers and documentation; resolved lazily below
    from eztinker.client import AsyncEZTinkerClient as AsyncEZTinkerClient
    from eztinker.client import EZTinkerClient as EZTinkerClient
    from eztinker.server import serve as serve

__all__ = ["AsyncEZTinkerClient", "EZTinkerClient", "LoRAConfig", "LossFunctionConfig", "__version__"]

_LAZY = {
    "AsyncEZTinkerClient": "eztinker.client",
    "EZTinkerClient": "eztinker.client",
    "serve": "eztinker.server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'eztinker' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
