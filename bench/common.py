"""Helpers shared by the benchmark scripts: model resolution, statistics, machine facts, JSON results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model(name: str, workdir: Path) -> tuple[Path, str]:
    """(model directory, short tag) for `smollm2`, `tiny` (a random qwen2, H=256, L=4) or a local path."""
    from eztinker.testing import make_tiny_model, smollm2_dir

    if name == "smollm2":
        return smollm2_dir(), "smollm2-135m"
    if name == "tiny":
        return make_tiny_model(workdir / "tiny-qwen2", "qwen2", hidden_size=256, num_layers=4), "tiny-qwen2"
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise SystemExit(
            f"--model {name!r}: expected 'smollm2', 'tiny' or a model directory with config.json"
        )
    return path, path.name


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, IQR, min and max (quartiles by the 'inclusive' method)."""
    vals = sorted(values)
    if len(vals) >= 2:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = vals[0]
    return {
        "median": statistics.median(vals),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": vals[0],
        "max": vals[-1],
        "n": len(vals),
    }


def machine_info(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import peft
        import transformers

        info["transformers"] = transformers.__version__
        info["peft"] = peft.__version__
    except ImportError:  # pragma: no cover - both are engine dependencies
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_results(name: str, payload: dict) -> Path:
    """Write `payload` to bench/results/<name>.json (atomically) and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".tmp", dir=RESULTS_DIR)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path
