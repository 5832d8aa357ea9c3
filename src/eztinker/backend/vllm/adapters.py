"""Sampler snapshots as vLLM adapters: the PEFT directory written, its vLLM name, and why vLLM cannot serve one."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from eztinker.backend.vllm.options import vllm_lora_rank

if TYPE_CHECKING:
    from eztinker.engine import Engine
    from eztinker.engine.checkpoint import CheckpointInfo


@dataclass
class _Adapter:
    name: str
    path: str
    problem: str | None  # why vLLM cannot serve it (None: it can)
    pins: int = 0  # requests using it now: never evicted while > 0

    @property
    def vllm_name(self) -> str:
        """The name vLLM knows it by (`model` of its requests)."""
        return safe_name(self.name)


_SAFE = re.compile(r"[A-Za-z0-9._-]{1,100}")


def safe_name(name: str) -> str:
    """`name` as a file and vLLM model name: itself if plain, else plain characters and a hash of it
    (Tinker's sampler ids hold colons, and any id could hold a slash)."""
    if _SAFE.fullmatch(name) and name not in (".", ".."):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)[:80]}-{digest}"


def adapter_problem(path: str | os.PathLike[str], max_lora_rank: int) -> str | None:
    """Why vLLM cannot serve the PEFT adapter at `path` (None: it can) — read from its adapter_config.json."""
    config_file = Path(path) / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"no readable adapter_config.json in {str(path)!r}: {exc}"
    rank = int(config.get("r") or 0)
    limit = vllm_lora_rank(max_lora_rank)
    if rank > limit or any(int(r) > limit for r in (config.get("rank_pattern") or {}).values()):
        return f"its rank {rank} is above the vLLM server's --max-lora-rank {limit}"
    if config.get("target_parameters"):
        return "it adapts fused expert weights (target_parameters), which vLLM's runtime LoRA loading does not take"
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    heads = [
        t for t in targets if t.rsplit(".", 1)[-1] in ("lm_head", "unembed_tokens", "embed_tokens", "wte")
    ]
    if heads:
        return (
            f"it adapts the embedding or output head ({', '.join(heads)}), which vLLM's LoRA does not serve"
        )
    if config.get("use_dora") or config.get("modules_to_save"):
        return "it uses DoRA or modules_to_save, which vLLM's LoRA does not serve"
    return None


def write_snapshot(
    engine: Engine, run_id: str, root: str | os.PathLike[str], sampler_id: str
) -> CheckpointInfo:
    """Write run `run_id`'s adapter as the PEFT directory `<root>/<sampler_id>` that vLLM hot-loads
    (`safe_name(sampler_id)`: an id with colons or slashes is made a plain file name).

    Call it in the run's op order with `Engine.save_sampler` (same weights); the directory is written
    atomically and never changes after, like the snapshot.
    """
    return engine.save_weights(run_id, Path(root) / safe_name(sampler_id), module_names="peft")
