"""GPU check: one command that measures what EZTinker promises on one CUDA device, into one JSON file.

    python bench/gpu_check.py --out result.json          # on an H100/H200: about 2-5 minutes, at most 8
    python bench/gpu_check.py --dry-run --out r.json     # the same code on a CPU, tiny models (~1 minute)

Needs only torch, transformers, peft, safetensors, numpy (and pydantic, which the engine itself imports):
no web stack, no hub, no downloads. The repository need not be installed: `src/` is put on `sys.path`
when `eztinker` is not importable, and only the engine modules are imported (`eztinker/__init__.py`,
which pulls in the HTTP client, is never executed). Models are random-weight models built from configs
on the device, in the shapes of Qwen2.5-0.5B (`Qwen2Config`) and Qwen3-8B (`Qwen3Config`; fewer layers
only if memory or the time budget says so — the layer count is recorded).

Sections (each guarded: a failure records an error string and the rest still runs; each prints a line):

* **forward_backward at 8×2048, bf16** on both shapes: `Engine.forward_backward` tokens/s and MFU, side
  by side with a plain PEFT loop (`peft.get_peft_model`, micro-batched like the engine's chunks),
  interleaved rounds; ratio engine ÷ PEFT.
* **co-batching**: 8 runs, each a client thread doing `forward_backward` (1×256 tokens) + `optim_step`
  through the server's `Scheduler`, co-batched (`max_pass_jobs=64`) vs time-multiplexed (1).
* **sampling**: 64 concurrent requests × 128 new tokens through the continuous batcher
  (`Engine.sample_many`) vs Hugging Face `generate` on one static batch of the same prompts.
* **bf16 vs fp32 log-probabilities**: `Engine.forward` on the same tokens and adapter, bf16 vs fp32 base.
* **CUDA paths** (`cuda_paths`): each way of the co-batched LoRA delta (`lora.DENSE_PATH`) timed at a
  training and two decode shapes, with the way `lora` picks; the SDPA kernel each attention call gets
  in a co-batched training pass and in padded / unpadded sampling; syncing calls (CUDA sync debug mode)
  inside LoRA layers and in whole ops. Informative: no target.
* peak memory and the environment.

MFU (model FLOPs utilisation) counts the FLOPs the model needs, not what the kernels do (no recompute):

    flops = T · (4·N_linear + 6·N_lora) + Σ_seq 6·S²·d_attn·L

* `N_linear`: weights of every base `nn.Linear` (attention and MLP projections, and the LM head; not the
  embedding lookup). Forward is 2·N_linear per token; backward through a *frozen* base needs only the
  input gradients (2·N_linear); there is no weight-gradient matmul for the base. So 4·N_linear, not the
  6·N of full fine-tuning (and not 6·N_trainable, which would count only the adapter).
* `N_lora`: adapter weights (A and B of every adapted layer): forward, input and weight gradients, 6·N_lora.
* attention scores and values: 4·S²·d_attn per layer forward for a sequence of S tokens, halved by the
  causal mask (2·S²·d_attn), and twice that backward (dQ, dK, dV, dP): 6·S²·d_attn per layer, with
  d_attn = heads · head_dim and L layers.
* (≈: the first layer's input gradients are not needed, as the embedding is frozen; that is < 1/L of
  the linear term.) MFU = flops / seconds / peak, where peak is the device's dense bf16 tensor-core rate
  from `PEAK_BF16_TFLOPS` (by device name), `--peak-tflops`, or else the bf16 matmul rate measured here.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, summary, sync

ROOT = Path(__file__).resolve().parent.parent

SCHEMA = "eztinker-gpu-check/1"

# Dense (no sparsity) bf16 tensor-core peak per device, in TFLOPS, matched in order against
# torch.cuda.get_device_name(); more specific names first ("H100 NVL" before "H100", "A100" before "A10").
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
]

# Targets for the first GPU run (issue 21); they do not apply to --dry-run.
TARGETS = {
    "mfu_8b": {"min": 0.40, "what": "MFU of Engine.forward_backward at 8×2048 on the Qwen3-8B shape"},
    "cobatch_ratio_8_runs": {"min": 4.0, "what": "8 runs × 1×256: co-batched ÷ time-multiplexed tokens/s"},
    "sample_vs_hf_static": {"min": 1.0, "what": "64 × 128 tokens: continuous batcher ÷ HF generate tokens/s"},
    "bf16_vs_fp32_max_logprob_diff": {"max": 0.05, "what": "max |Δ logprob| bf16 vs fp32, same tokens"},
}

# Modules that must not load on this path (the GPU box may not have them); recorded, and checked by CI.
WEB_STACK = ("httpx", "fastapi", "starlette", "sqlalchemy", "uvicorn", "rich", "typer", "pydantic_settings")


# --- shapes and plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A decoder-only model shape, built with random weights from its transformers config."""

    label: str
    family: str  # qwen2 | qwen3
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    head_dim: int | None = None
    max_position_embeddings: int = 32768

    @property
    def d_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def config(self, *, eos_token_id: int, pad_token_id: int) -> Any:
        from transformers import Qwen2Config, Qwen3Config

        kwargs: dict[str, Any] = {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-6,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "bos_token_id": None,
        }
        if self.family == "qwen3":
            return Qwen3Config(head_dim=self.d_head, **kwargs)
        return Qwen2Config(**kwargs)


QWEN25_05B = Shape("Qwen2.5-0.5B", "qwen2", 896, 4864, 24, 14, 2, 151936, True)
QWEN3_8B = Shape(
    "Qwen3-8B", "qwen3", 4096, 12288, 36, 32, 8, 151936, False, head_dim=128, max_position_embeddings=40960
)
TINY_SMALL = Shape(
    "tiny-qwen2 (dry run)", "qwen2", 64, 128, 2, 4, 2, 2048, True, max_position_embeddings=4096
)
TINY_BIG = Shape(
    "tiny-qwen3 (dry run)", "qwen3", 128, 256, 2, 4, 2, 2048, False, head_dim=32, max_position_embeddings=4096
)


@dataclass(frozen=True)
class Plan:
    """Every size the check uses; `--dry-run` shrinks them, the code stays the same."""

    small: Shape
    big: Shape
    train_batch: int = 8
    train_seq: int = 2048
    train_rounds: int = 5  # measured rounds per side (one step each), after one warm-up step
    cobatch_runs: int = 8
    cobatch_seq: int = 256
    cobatch_steps: int = 10  # forward_backward + optim_step per run per round
    cobatch_rounds: int = 3
    sample_requests: int = 64
    sample_new_tokens: int = 128
    sample_prompt_len: tuple[int, int] = (16, 64)
    sample_rounds: int = 3
    agree_batch: int = 4
    agree_seq: int = 512
    lora_rank: int = 32
    matmul_n: int = 8192
    matmul_iters: int = 20


FULL = Plan(QWEN25_05B, QWEN3_8B)
DRY = Plan(
    TINY_SMALL,
    TINY_BIG,
    train_batch=4,
    train_seq=128,
    train_rounds=2,
    cobatch_seq=64,
    cobatch_steps=3,
    cobatch_rounds=2,
    sample_requests=16,
    sample_new_tokens=16,
    sample_prompt_len=(4, 12),
    sample_rounds=2,
    agree_batch=2,
    agree_seq=64,
    lora_rank=8,
    matmul_n=256,
    matmul_iters=5,
)


# --- FLOPs -------------------------------------------------------------------------------------------


def linear_params(model: torch.nn.Module) -> int:
    """Weights of every `nn.Linear` (the LM head included, tied or not): what the matmuls multiply by."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def train_flops(shape: Shape, n_linear: int, n_lora: int, seq_lens: list[int]) -> dict[str, float]:
    """Model FLOPs of one forward + backward over `seq_lens` with a frozen base (see the module docstring)."""
    tokens = sum(seq_lens)
    d_attn = shape.num_attention_heads * shape.d_head
    linear = 4.0 * n_linear * tokens
    lora = 6.0 * n_lora * tokens
    attention = sum(6.0 * s * s * d_attn * shape.num_hidden_layers for s in seq_lens)
    return {"total": linear + lora + attention, "linear": linear, "lora": lora, "attention": attention}


def peak_for(device_name: str) -> tuple[float | None, str | None]:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops, key
    return None, None


# --- bootstrap: the engine without the web stack ------------------------------------------------------


def bootstrap_eztinker() -> str:
    """Make `eztinker.engine` importable without running `eztinker/__init__.py`; return where it lives.

    The package's `__init__` imports the HTTP client (httpx, and through httpx's CLI rich, click and
    pygments) and pydantic models for the client; none of that is needed to drive the engine, and a bare
    GPU box may lack it. So the package is registered as a bare module whose `__path__` is the source
    directory, and submodules import normally. `src/` goes on `sys.path` if `eztinker` is not installed.
    """
    spec = importlib.util.find_spec("eztinker")
    if spec is None or not spec.submodule_search_locations:
        sys.path.insert(0, str(ROOT / "src"))
        spec = importlib.util.find_spec("eztinker")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"cannot find the eztinker package (looked in {ROOT / 'src'})")
    if "eztinker" not in sys.modules:
        package = types.ModuleType("eztinker")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        package.__file__ = spec.origin
        package.__package__ = "eztinker"
        sys.modules["eztinker"] = package
    return str(next(iter(spec.submodule_search_locations)))


# --- the check's bookkeeping -------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (and are then reported as missing, not as numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class Check:
    """The result being built, the time budget, and guarded sections."""

    def __init__(self, args: argparse.Namespace, plan: Plan, device: torch.device) -> None:
        self.args, self.plan, self.device = args, plan, device
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.budget_s
        self.out = Path(args.out)
        self.result: dict[str, Any] = {
            "schema": SCHEMA,
            "command": " ".join(["python bench/gpu_check.py", *sys.argv[1:]]),
            "dry_run": args.dry_run,
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "budget_s": args.budget_s,
            "budget_exhausted": False,
            "targets": TARGETS,
            "sections": {},
            "errors": {},
            "skipped": [],
            "shrunk": [],
        }
        self._peak_mb = 0.0
        self.cobatch_runs: list[str] = []  # the co-batching section's runs, sampled from with 8 adapters

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def say(self, message: str) -> None:
        print(f"[gpu_check {self.elapsed():6.1f}s] {message}", flush=True)

    def skip(self, name: str, reason: str) -> None:
        self.result["skipped"].append({"section": name, "reason": reason})
        self.result["sections"][name] = {"status": "skipped", "reason": reason}
        if reason.startswith("time budget"):
            self.result["budget_exhausted"] = True
        self.say(f"{name}: skipped ({reason})")

    def shrink(self, name: str, what: str) -> None:
        """Record that section `name` did less than planned to stay within the time budget."""
        self.result["shrunk"].append({"section": name, "what": what})
        self.result["budget_exhausted"] = True
        self.say(f"{name}: shrunk to fit the time budget ({what})")

    def section(
        self, name: str, fn: Callable[[], str | None], *, min_s: float = 0.0, needs: tuple[str, ...] = ()
    ) -> bool:
        """Run `fn` (which fills `self.result` and returns a one-line summary); never raise."""
        for dependency in needs:
            if self.result["sections"].get(dependency, {}).get("status") != "ok":
                self.skip(name, f"needs {dependency}, which did not complete")
                return False
        if self.left() < min_s:
            self.skip(name, f"time budget: {self.left():.0f} s left, the section needs about {min_s:.0f} s")
            return False
        self.say(f"{name} ...")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        status, line = "ok", ""
        try:
            line = fn() or ""
        except Exception as exc:  # recorded; the other sections still run
            status = "error"
            self.result["errors"][name] = f"{type(exc).__name__}: {exc}"
            line = self.result["errors"][name]
            traceback.print_exc()
        seconds = time.perf_counter() - start
        peak = self.memory_mb()
        self._peak_mb = max(self._peak_mb, peak)
        self.result["sections"][name] = {
            "status": status,
            "seconds": round(seconds, 3),
            "peak_memory_mb": round(peak, 1),
        }
        self.say(f"{name}: {status} in {seconds:.1f} s — {line}")
        self.write()
        return status == "ok"

    def memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def write(self) -> None:
        """Write the JSON (atomically) — after every section, so a killed run still leaves its results."""
        self.result["wall_s"] = round(self.elapsed(), 2)
        self.result["peak_memory_mb"] = round(self._peak_mb, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        tmp.write_text(json.dumps(_finite(self.result), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, self.out)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - t0, value


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- environment and peak ----------------------------------------------------------------------------


def environment(device: torch.device, eztinker_path: str) -> dict[str, Any]:
    info = machine_info(device)
    info["cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info["eztinker_source"] = eztinker_path
    for name in ("safetensors", "numpy", "pydantic"):
        try:
            info[name] = __import__(name).__version__
        except Exception:
            info[name] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["device_capability"] = f"{props.major}.{props.minor}"
        info["device_memory_mb"] = round(props.total_memory / 2**20)
        info["device_count"] = torch.cuda.device_count()
        with contextlib.suppress(Exception):
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10, check=False,
            )  # fmt: skip
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
    else:
        info["device_name"] = info.get("cpu", platform.processor() or "cpu")
    with contextlib.suppress(Exception):
        git = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
        info["git_commit"] = git.stdout.strip() or None
    return info


def measure_matmul_tflops(device: torch.device, n: int, iters: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    seconds, _ = timed(lambda: [a @ b for _ in range(iters)], device)
    return 2.0 * n**3 * iters / seconds / 1e12


# --- models -------------------------------------------------------------------------------------------


def build_model(
    shape: Shape,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    tokenizer: Any,
    layers: int | None = None,
) -> torch.nn.Module:
    """A random-weight causal LM of `shape` (optionally `layers` layers), built on `device`, frozen, eval."""
    from transformers import AutoModelForCausalLM

    if layers is not None:
        shape = replace(shape, num_hidden_layers=layers)
    config = shape.config(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype, attn_implementation="sdpa")
    model.to(device=device, dtype=dtype)  # a no-op unless this transformers ignored the device context
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        None,
    )
    model.eval()
    model.requires_grad_(False)
    return model


def cast_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A deep copy of `model` in `dtype` (its config saying so too)."""
    twin = copy.deepcopy(model).to(dtype)
    twin.config.dtype = dtype
    return twin


_TOKENIZER: list[Any] = []


def tokenizer() -> Any:
    """The tests' tiny byte-level BPE (trained here in well under a second; the models' vocabularies are
    bigger, which only matters for decoding stop strings, and none are used)."""
    if not _TOKENIZER:
        from transformers import AutoTokenizer

        from eztinker.testing import make_tiny_tokenizer

        with tempfile.TemporaryDirectory(prefix="gpu-check-tokenizer-") as tmp:
            tok = AutoTokenizer.from_pretrained(str(make_tiny_tokenizer(tmp)), local_files_only=True)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        _TOKENIZER.append(tok)
    return _TOKENIZER[0]


def add_base_model(engine: Any, name: str, model: torch.nn.Module, tokenizer: Any) -> None:
    """Give the engine an in-memory model as base model `name` (what `load_base_model` would return).

    The engine loads base models by hub id or path only; writing and re-reading 16 GB of random weights
    would cost a minute of the budget, so this sets the entry directly. (An `Engine.add_base_model(name,
    model, tokenizer)` would make this public.)
    """
    from eztinker.engine.model import BaseModel

    param = next(model.parameters())
    base = BaseModel(name=name, model=model, tokenizer=tokenizer, device=param.device, dtype=param.dtype)
    with engine._registry_lock:
        engine._models[name] = base


def shape_info(shape: Shape, model: torch.nn.Module, layers: int) -> dict[str, Any]:
    return {
        **asdict(shape),
        "num_hidden_layers": layers,
        "layers": layers,
        "layers_full": shape.num_hidden_layers,
        "params": sum(p.numel() for p in model.parameters()),
        "linear_params": linear_params(model),
    }


def random_rows(batch: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


# --- forward_backward: engine vs PEFT, MFU ------------------------------------------------------------


def train_section(
    check: Check, key: str, engine: Any, name: str, shape: Shape, peft_base: torch.nn.Module, n_linear: int
) -> str:
    """Engine.forward_backward vs a plain PEFT loop on the same weights and batch, interleaved rounds."""
    from peft import LoraConfig, get_peft_model

    from eztinker.engine import AdamParams, Datum
    from eztinker.engine.batch import budget_for

    plan, device = check.plan, check.device
    rank = plan.lora_rank
    info = engine.create_run(name, {"r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "seed": 0})
    base = engine.base_model(name)
    ids = random_rows(plan.train_batch, plan.train_seq, shape.vocab_size, seed=1)
    data = [Datum.from_labels(row.tolist()) for row in ids]
    chunk_tokens = budget_for(base.vocab_size, engine.config.token_budget, engine.config.logits_budget)
    micro = max(1, chunk_tokens // plan.train_seq)  # the PEFT loop gets the engine's rows per chunk

    peft_model = get_peft_model(
        peft_base,
        LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.0,
            target_modules=list(info.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    adam = AdamParams(learning_rate=1e-5)
    batches = [ids[i : i + micro].to(device) for i in range(0, len(ids), micro)]

    sides: dict[str, dict[str, list[float]]] = {
        s: {"fb": [], "opt": [], "loss": []} for s in ("engine", "peft")
    }

    def engine_step() -> None:
        fb, result = timed(lambda: engine.forward_backward(info.run_id, data), device)
        step, _ = timed(lambda: engine.optim_step(info.run_id, adam), device)
        sides["engine"]["fb"].append(fb)
        sides["engine"]["opt"].append(step)
        sides["engine"]["loss"].append(result.loss)

    def peft_fb() -> float:
        total = 0.0
        for mb in batches:
            out = peft_model(input_ids=mb, labels=mb, use_cache=False)
            (out.loss / len(batches)).backward()
            total += float(out.loss.detach()) / len(batches)
        return total

    def peft_step() -> None:
        fb, loss = timed(peft_fb, device)

        def step() -> None:
            opt.step()
            opt.zero_grad(set_to_none=True)

        seconds, _ = timed(step, device)
        sides["peft"]["fb"].append(fb)
        sides["peft"]["opt"].append(seconds)
        sides["peft"]["loss"].append(loss)

    engine_step()  # warm-up, one each; their losses (B = 0: the same model) are the agreement check
    peft_step()
    first_losses = (sides["engine"]["loss"][0], sides["peft"]["loss"][0])
    warm = max(sides["engine"]["fb"][0], sides["peft"]["fb"][0])
    for side in sides.values():
        for values in side.values():
            values.clear()
    rounds = 0
    for r in range(plan.train_rounds):
        if r >= 1 and check.left() < 3 * warm + 30:  # keep time for the rest; one round is the minimum
            check.shrink(f"{key}.forward_backward", f"{r} of {plan.train_rounds} rounds")
            break
        for step in (engine_step, peft_step) if r % 2 == 0 else (peft_step, engine_step):
            step()
        rounds += 1

    tokens = plan.train_batch * plan.train_seq
    flops = train_flops(shape, n_linear, info.num_parameters, [plan.train_seq] * plan.train_batch)
    peak = check.result["peak_bf16_tflops"] * 1e12
    e_fb = statistics.median(sides["engine"]["fb"])
    p_fb = statistics.median(sides["peft"]["fb"])
    per_round = [p / e for e, p in zip(sides["engine"]["fb"], sides["peft"]["fb"], strict=True)]
    out = {
        "model": shape.label,
        "batch": plan.train_batch,
        "seq_len": plan.train_seq,
        "tokens": tokens,
        "dtype": "bfloat16",
        "lora_rank": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(info.target_modules),
        "adapter_params": info.num_parameters,
        "linear_params": n_linear,
        "engine_chunk_tokens": chunk_tokens,
        "peft_micro_batch": micro,
        "rounds": rounds,
        "flops_per_step": flops["total"],
        "flops_breakdown": flops,
        "engine": {
            "forward_backward_s": summary(sides["engine"]["fb"]),
            "optim_step_s": summary(sides["engine"]["opt"]),
            "tokens_per_s": tokens / e_fb,
        },
        "peft": {
            "forward_backward_s": summary(sides["peft"]["fb"]),
            "optim_step_s": summary(sides["peft"]["opt"]),
            "tokens_per_s": tokens / p_fb,
        },
        "mfu": flops["total"] / e_fb / peak,
        "peft_mfu": flops["total"] / p_fb / peak,
        "vs_peft_ratio": p_fb / e_fb,  # engine tokens/s ÷ PEFT tokens/s, medians
        "vs_peft_ratio_median_of_rounds": statistics.median(per_round),
        "first_step_loss": {
            "engine": first_losses[0],
            "peft": first_losses[1],
            "abs_diff": abs(first_losses[0] - first_losses[1]),
        },
    }
    check.result.setdefault("forward_backward", {})[key] = out
    suffix = "8b" if key == "big" else "0_5b"
    check.result[f"forward_backward_tokens_per_s_{suffix}"] = out["engine"]["tokens_per_s"]
    check.result[f"mfu_{suffix}"] = out["mfu"]
    check.result[f"vs_peft_ratio_{suffix}"] = out["vs_peft_ratio"]
    engine.delete_run(info.run_id)
    return (
        f"{out['engine']['tokens_per_s']:.0f} tokens/s, MFU {out['mfu']:.1%} (PEFT {out['peft_mfu']:.1%}), "
        f"engine ÷ PEFT {out['vs_peft_ratio']:.2f}× over {rounds} rounds"
    )


# --- co-batching through the scheduler ----------------------------------------------------------------


def cobatch_section(check: Check, engine: Any, name: str, shape: Shape) -> str:
    """8 client threads, each forward_backward (1×seq) + optim_step per step, through the `Scheduler`
    with the server's runners: co-batched (max_pass_jobs=64) vs time-multiplexed (1), interleaved rounds.
    The engine-level ratio (`forward_backward_many` of 8 ops vs 8 lone ops, no threads) is recorded too."""
    from eztinker.engine import AdamParams, Datum, TrainOp
    from eztinker.scheduler import Batchable, Job, Scheduler

    plan, device = check.plan, check.device
    runs = [
        engine.create_run(name, {"r": plan.lora_rank, "lora_alpha": 2 * plan.lora_rank, "seed": i}).run_id
        for i in range(plan.cobatch_runs)
    ]
    check.cobatch_runs = runs  # reused by the sampling section (8 adapters)
    datas = {
        run_id: [
            Datum.from_labels(random_rows(1, plan.cobatch_seq, shape.vocab_size, seed=100 + i)[0].tolist())
        ]
        for i, run_id in enumerate(runs)
    }
    adam = AdamParams(learning_rate=1e-5)
    modes = {"co-batched": 64, "time-multiplexed": 1}
    scheduler = Scheduler(
        workers=1,
        max_pass_jobs=64,
        pass_token_budget=32_768,
        pass_linger=0.005,
        runners={"train": engine.forward_backward_many, "optim": engine.optim_step_many},
    )  # the server's defaults (Settings) and runners (Service)

    def finish(outcome: Any) -> dict[str, Any]:
        if isinstance(outcome, BaseException):
            raise outcome
        return {}

    def fb_job(run_id: str) -> Job:
        op = TrainOp(run_id, datas[run_id])
        return Job(
            op="forward_backward",
            run_id=run_id,
            fn=lambda: finish(engine.forward_backward_many([op])[0]),
            tokens=plan.cobatch_seq,
            batch=Batchable(kind="train", group=name, request=op, finish=finish),
        )

    def optim_job(run_id: str) -> Job:
        request = (run_id, adam)
        return Job(
            op="optim_step",
            run_id=run_id,
            fn=lambda: finish(engine.optim_step_many([request])[0]),
            batch=Batchable(kind="optim", group=name, request=request, finish=finish),
        )

    def concurrently(steps: int) -> float:
        start_line = threading.Barrier(len(runs) + 1)
        errors: list[BaseException] = []

        def loop(run_id: str) -> None:
            start_line.wait()
            try:
                for _ in range(steps):
                    for make in (fb_job, optim_job):
                        job = scheduler.submit(make(run_id))
                        if not job.wait_sync(600) or job.status != "completed":
                            raise RuntimeError(f"{job.op} on {run_id}: {job.status} {job.error}")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=loop, args=(r,)) for r in runs]
        for t in threads:
            t.start()
        start_line.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        if errors:
            raise errors[0]
        return seconds

    scheduler.start()
    try:
        scheduler.max_pass_jobs = 64
        warm = concurrently(1)  # warm-up
        rates: dict[str, list[float]] = {m: [] for m in modes}
        jobs_per_pass: dict[str, list[float]] = {m: [] for m in modes}
        tokens = len(runs) * plan.cobatch_steps * plan.cobatch_seq
        for r in range(plan.cobatch_rounds):
            if r >= 1 and check.left() < 20 * warm * plan.cobatch_steps + 30:
                check.shrink("small.cobatching", f"{r} of {plan.cobatch_rounds} rounds")
                break
            for mode in modes if r % 2 == 0 else reversed(modes):
                scheduler.max_pass_jobs = modes[mode]
                passes, jobs = scheduler.passes, scheduler.jobs_in_passes
                rates[mode].append(tokens / concurrently(plan.cobatch_steps))
                jobs_per_pass[mode].append(
                    (scheduler.jobs_in_passes - jobs) / max(1, scheduler.passes - passes)
                )
    finally:
        scheduler.stop()

    # The engine alone: one forward_backward_many + optim_step_many of every run vs each run in turn.
    ops = [TrainOp(r, datas[r]) for r in runs]

    def together() -> None:
        for outcome in engine.forward_backward_many(ops):
            finish(outcome)
        for outcome in engine.optim_step_many([(r, adam) for r in runs]):
            finish(outcome)

    def one_by_one() -> None:
        for r in runs:
            engine.forward_backward(r, datas[r])
            engine.optim_step(r, adam)

    direct: dict[str, list[float]] = {"together": [], "one_by_one": []}
    for r in range(max(2, plan.cobatch_rounds)):
        for label, fn in (("together", together), ("one_by_one", one_by_one))[:: 1 if r % 2 == 0 else -1]:
            direct[label].append(timed(fn, device)[0])

    per_round = [a / b for a, b in zip(rates["co-batched"], rates["time-multiplexed"], strict=True)]
    ratio = statistics.median(rates["co-batched"]) / statistics.median(rates["time-multiplexed"])
    check.result["cobatching"] = {
        "model": shape.label,
        "runs": len(runs),
        "seq_len": plan.cobatch_seq,
        "seqs_per_op": 1,
        "steps_per_round": plan.cobatch_steps,
        "rounds": len(per_round),
        "tokens_per_s": {m: summary(v) for m, v in rates.items()},
        "ratio": ratio,  # medians of rounds
        "ratio_best_rounds": max(rates["co-batched"]) / max(rates["time-multiplexed"]),
        "ratios_per_round": per_round,
        "mean_jobs_per_pass": {m: statistics.mean(v) for m, v in jobs_per_pass.items()},
        "engine_direct_ratio": statistics.median(direct["one_by_one"])
        / statistics.median(direct["together"]),
        "engine_direct_s": {k: summary(v) for k, v in direct.items()},
    }
    check.result["cobatch_ratio_8_runs"] = ratio
    return (
        f"co-batched ÷ time-multiplexed {ratio:.2f}× "
        f"({statistics.median(rates['co-batched']):.0f} vs {statistics.median(rates['time-multiplexed']):.0f} tokens/s), "
        f"engine alone {check.result['cobatching']['engine_direct_ratio']:.2f}×"
    )


# --- sampling: continuous batcher vs HF generate ----------------------------------------------------


def sampling_section(check: Check, engine: Any, name: str, shape: Shape, hf_model: torch.nn.Module) -> str:
    """All requests at once through `Engine.sample_many` (the continuous batcher) vs one static
    `generate` batch of the same prompts (left-padded), both sampling at temperature 1 with no early stop."""
    from eztinker.engine import Datum, SamplingParams
    from eztinker.engine.sampler import SampleRequest

    plan, device = check.plan, check.device
    n, new = plan.sample_requests, plan.sample_new_tokens
    g = torch.Generator().manual_seed(7)
    low, high = plan.sample_prompt_len
    prompts = [
        torch.randint(
            3, shape.vocab_size, (int(torch.randint(low, high + 1, (1,), generator=g)),), generator=g
        ).tolist()
        for _ in range(n)
    ]
    width = max(len(p) for p in prompts)
    pad = hf_model.generation_config.pad_token_id or 0
    input_ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as generate wants for a decoder-only model
        input_ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    adapters = list(check.cobatch_runs)

    def ours(seed: int, with_adapters: bool = False) -> list[Any]:
        requests = [
            SampleRequest(
                prompt=p,
                params=SamplingParams(max_tokens=new, temperature=1.0, seed=seed + i, stop=[]),
                adapter=adapters[i % len(adapters)] if with_adapters else None,
            )
            for i, p in enumerate(prompts)
        ]
        results = engine.sample_many(name, requests)
        if any(len(s.tokens) != new for r in results for s in r.sequences):
            raise RuntimeError("a request stopped early")
        return results

    def hf(seed: int) -> None:
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = hf_model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                pad_token_id=pad,
            )
        if out.shape != (n, width + new):
            raise RuntimeError(f"generate returned {tuple(out.shape)}, expected {(n, width + new)}")

    sides: dict[str, Callable[[int], Any]] = {"eztinker": ours, "hf_generate_static": hf}
    if adapters:
        sides["eztinker_8_adapters"] = lambda seed: ours(seed, with_adapters=True)
    warm = max(timed(lambda fn=fn: fn(0), device)[0] for fn in sides.values())
    rates: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(plan.sample_rounds):
        if r >= 1 and check.left() < 3 * len(sides) * warm + 30:
            check.shrink("small.sampling", f"{r} of {plan.sample_rounds} rounds")
            break
        for side in list(sides) if r % 2 == 0 else list(reversed(sides)):
            seconds, _ = timed(lambda side=side, r=r: sides[side](1000 * (r + 1)), device)
            rates[side].append(n * new / seconds)

    # RL needs sampling log-probs to equal training log-probs: forward the sampled sequences on their runs.
    sample_vs_forward = None
    if adapters:
        k = min(8, n)
        results = ours(99, with_adapters=True)
        diffs = []
        for i in range(k):
            seq = results[i].sequences[0]
            tokens = prompts[i] + seq.tokens
            labels = [-100] * len(prompts[i]) + seq.tokens
            forward = engine.forward(adapters[i % len(adapters)], [Datum.from_labels(tokens, labels)])
            trained = forward.logprobs[0][len(prompts[i]) - 1 :].float().cpu()
            diffs.append(float((trained - torch.tensor(seq.logprobs)).abs().max()))
        sample_vs_forward = max(diffs)

    med = {s: statistics.median(v) for s, v in rates.items()}
    ratio = med["eztinker"] / med["hf_generate_static"]
    check.result["sampling"] = {
        "model": shape.label,
        "requests": n,
        "new_tokens": new,
        "prompt_len": list(plan.sample_prompt_len),
        "rounds": len(rates["eztinker"]),
        "tokens_per_s": {s: summary(v) for s, v in rates.items()},
        "ratio": ratio,  # medians of rounds
        "ratios_per_round": [
            a / b for a, b in zip(rates["eztinker"], rates["hf_generate_static"], strict=True)
        ],
        "eight_adapters_vs_base": med["eztinker_8_adapters"] / med["eztinker"] if adapters else None,
        "sample_vs_forward_max_logprob_diff_bf16": sample_vs_forward,
    }
    check.result["sample_vs_hf_static"] = ratio
    return f"continuous ÷ HF static batch {ratio:.2f}× ({med['eztinker']:.0f} vs {med['hf_generate_static']:.0f} tokens/s)"


# --- constrained decoding ------------------------------------------------------------------------------


CONSTRAINED_GRAMMAR = "start: /[A-Za-z ,.]*/"  # never complete: every row samples all its tokens


def constrained_section(check: Check, engine: Any, name: str, shape: Shape) -> str:
    """The same requests as the sampling section, every row within a grammar (`SamplingParams.grammar`:
    llguidance's token mask per row and step, masked on the device) vs free, interleaved in rounds.

    The kit's tokenizer has 1,024 tokens, so llguidance's walk over the vocabulary is cheaper than a real
    150k-token one's; the masking on the device is full-size. `bench/constrained_sampling.py` measures it
    on a real tokenizer."""
    from eztinker.engine import SamplingParams
    from eztinker.engine.sampler import SampleRequest

    plan = check.plan
    n, new = plan.sample_requests, plan.sample_new_tokens
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 1000, (32,), generator=g).tolist() for _ in range(n)]

    def run(seed: int, grammar: str | None) -> None:
        params = [
            SamplingParams(max_tokens=new, temperature=1.0, seed=seed + i, stop=[], grammar=grammar)
            for i in range(n)
        ]
        results = engine.sample_many(
            name, [SampleRequest(prompt=p, params=q) for p, q in zip(prompts, params, strict=True)]
        )
        if any(len(s.tokens) != new for r in results for s in r.sequences):
            raise RuntimeError("a request stopped early")

    sides: dict[str, str | None] = {"free": None, "constrained": CONSTRAINED_GRAMMAR}
    warm = max(timed(lambda grammar=grammar: run(0, grammar), check.device)[0] for grammar in sides.values())
    rates: dict[str, list[float]] = {side: [] for side in sides}
    for r in range(plan.sample_rounds):
        if r >= 1 and check.left() < 3 * len(sides) * warm + 30:
            check.shrink("small.constrained", f"{r} of {plan.sample_rounds} rounds")
            break
        for side in list(sides) if r % 2 == 0 else list(reversed(sides)):
            seconds, _ = timed(lambda side=side, r=r: run(1000 * (r + 1), sides[side]), check.device)
            rates[side].append(n * new / seconds)
    ratios = [a / b for a, b in zip(rates["constrained"], rates["free"], strict=True)]
    check.result["constrained"] = {
        "model": shape.label,
        "requests": n,
        "new_tokens": new,
        "grammar": CONSTRAINED_GRAMMAR,
        "tokens_per_s": {side: summary(v) for side, v in rates.items()},
        "ratios_per_round": ratios,
    }
    check.result["constrained_vs_free"] = statistics.median(ratios)
    return f"constrained ÷ free {statistics.median(ratios):.2f}× tokens/s"


# --- bf16 vs fp32 log-probabilities -------------------------------------------------------------------


def agreement_section(check: Check, engine: Any, name_bf16: str, name_fp32: str, shape: Shape) -> str:
    """The same adapter (one large AdamW step, so it is not zero) and tokens on the bf16 and fp32 copies
    of one base model: max |Δ| of `Engine.forward`'s log-probabilities over every target token."""
    from eztinker.engine import AdamParams, Datum

    plan = check.plan
    ids = random_rows(plan.agree_batch, plan.agree_seq, shape.vocab_size, seed=3)
    data = [Datum.from_labels(row.tolist()) for row in ids]
    run = engine.create_run(
        name_bf16, {"r": plan.lora_rank, "lora_alpha": 2 * plan.lora_rank, "seed": 5}
    ).run_id
    engine.forward_backward(run, data)
    engine.optim_step(run, AdamParams(learning_rate=1e-2))
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_weights(run, Path(tmp) / "adapter")
        twin = engine.create_run(name_fp32, adapter_path=Path(tmp) / "adapter").run_id
    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    try:
        low = engine.forward(run, data)
        high = engine.forward(twin, data)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = cuda_tf32
    diffs = torch.cat(
        [
            (a.float().cpu() - b.float().cpu()).abs().flatten()
            for a, b in zip(low.logprobs, high.logprobs, strict=True)
        ]
    )
    mean_logprob = float(torch.cat([b.float().flatten() for b in high.logprobs]).mean())
    out = {
        "model": shape.label,
        "batch": plan.agree_batch,
        "seq_len": plan.agree_seq,
        "targets_compared": diffs.numel(),
        "max_abs_diff": float(diffs.max()),
        "mean_abs_diff": float(diffs.mean()),
        "p99_abs_diff": float(diffs.quantile(0.99)) if diffs.numel() <= 16_000_000 else None,
        "mean_logprob_fp32": mean_logprob,
        "loss_bf16": low.loss,
        "loss_fp32": high.loss,
        "note": "random weights give flat distributions; a trained checkpoint's sharper ones may differ more",
    }
    check.result["logprob_agreement"] = out
    check.result["bf16_vs_fp32_max_logprob_diff"] = out["max_abs_diff"]
    engine.delete_run(run)
    engine.delete_run(twin)
    return f"max |Δ logprob| {out['max_abs_diff']:.4f}, mean {out['mean_abs_diff']:.5f} over {diffs.numel()} tokens"


# --- the CUDA paths: LoRA delta ways, SDPA kernels, host syncs ------------------------------------------


def cuda_paths_section(check: Check, engine: Any, name: str, shape: Shape) -> str:
    """What `engine.lora` and the sampler chose for this device, measured: each way of the co-batched
    dense delta (`lora.DENSE_PATH`) timed at a training and two decode shapes against the per-adapter loop
    (and its max relative difference); the SDPA kernel each attention call of a co-batched training pass
    and of padded / unpadded sampling gets (`torch._fused_sdp_choice`); and, on CUDA, how many syncing
    calls `torch.cuda.set_sync_debug_mode` reports inside LoRA layers and in whole ops."""
    from eztinker.engine import Datum, TrainOp, lora
    from eztinker.engine.sampler import SampleRequest
    from eztinker.engine.types import SamplingParams

    plan, device = check.plan, check.device
    hidden, ranks = shape.hidden_size, [plan.lora_rank // 4, plan.lora_rank // 2, plan.lora_rank] * 3
    g = torch.Generator().manual_seed(11)
    layer = lora.LoRALinear(
        torch.nn.Linear(hidden, hidden).to(device, torch.bfloat16), lora.Routing(), "probe"
    )
    layer.requires_grad_(False)
    for i, r in enumerate(ranks[:8]):  # 8 adapters of mixed ranks
        a = (torch.randn(r, hidden, generator=g) / hidden**0.5).to(device)
        b = (torch.randn(hidden, r, generator=g) / r**0.5).to(device)
        layer.adapters[str(i)] = lora.LoRAWeights(torch.nn.Parameter(a), torch.nn.Parameter(b), 2.0, 0.0)
    shapes = {"train_8x256": (8, 256, True), "decode_64": (64, 1, False), "decode_256": (256, 1, False)}
    if check.args.dry_run:
        shapes = {"train_8x32": (8, 32, True), "decode_16": (16, 1, False), "decode_64": (64, 1, False)}
    iters = 3 if check.args.dry_run else 20
    saved_path = lora.layer.DENSE_PATH
    paths: dict[str, Any] = {}
    try:
        for label, (rows, tokens, train) in shapes.items():
            segments = [lora.Segment(str(i % 8), i * rows // 8, (i + 1) * rows // 8) for i in range(8)]
            x = torch.randn(rows, tokens, hidden, generator=g).to(device, torch.bfloat16)
            slots = [layer.adapters[seg.adapter or ""] for seg in segments]
            planned = lora._row_plan(layer.routing, segments, slots, x.device)
            assert planned is not None
            out: dict[str, Any] = {"auto": lora._dense_path(planned[0], tokens, device.type)}
            reference = None
            for way in ("loop", "concat", "rows", "groups"):
                lora.layer.DENSE_PATH = way

                def step(rows=rows, x=x, train=train, segments=segments) -> torch.Tensor:
                    with lora.routed(layer.routing, segments, train=train), torch.set_grad_enabled(train):
                        y = layer(x.requires_grad_(train) if train else x)
                        if train:
                            y.float().sum().backward()
                    return y.detach()

                y = step()  # warm-up (and the layout's index tensors)
                times = [timed(step, device)[0] for _ in range(iters)]
                reference = y if reference is None else reference
                diff = float(((y.float() - reference.float()).norm() / reference.float().norm()).cpu())
                out[way] = {"ms": statistics.median(times) * 1e3, "rel_diff_vs_loop": diff}
            paths[label] = out
    finally:
        lora.layer.DENSE_PATH = saved_path

    # What reaches SDPA, and the kernel it picks, in a co-batched training pass and in sampling.
    calls: list[dict[str, Any]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        choice = torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, is_causal, **kwargs)
        calls.append(
            {
                "mask": None if attn_mask is None else str(attn_mask.dtype),
                "is_causal": bool(is_causal),
                "dtype": str(q.dtype),
                "decode": k.shape[-2] > q.shape[-2],  # (a decode step's GQA query packs its heads as rows)
                "kernel": str(torch.nn.attention.SDPBackend(choice)).split(".")[-1],
            }
        )
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    runs = [
        engine.create_run(name, {"r": r, "lora_alpha": 2 * r, "seed": 40 + r}).run_id
        for r in (plan.lora_rank // 2, plan.lora_rank)
    ]
    ops = [
        TrainOp(runs[0], [Datum.from_labels(random_rows(1, 48, shape.vocab_size, seed=41)[0].tolist())]),
        TrainOp(runs[1], [Datum.from_labels(random_rows(1, 32, shape.vocab_size, seed=42)[0].tolist())]),
    ]

    def sample(lengths: tuple[int, int]) -> Any:
        requests = [
            SampleRequest(
                prompt=random_rows(1, n, shape.vocab_size, seed=43 + n)[0].tolist(),
                params=SamplingParams(max_tokens=4, temperature=1.0, seed=1, stop=[]),
                adapter=run,
            )
            for n, run in zip(lengths, runs, strict=True)
        ]
        return engine.sample_many(name, requests)

    def kernels(fn: Callable[[], Any]) -> dict[str, int]:
        calls.clear()
        torch.nn.functional.scaled_dot_product_attention = recording
        try:
            fn()
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa
        summary_: dict[str, int] = {}
        for c in calls:
            phase = "decode" if c["decode"] else "prefill/train"
            key = f"{phase} mask={c['mask']} causal={c['is_causal']} {c['dtype']} -> {c['kernel']}"
            summary_[key] = summary_.get(key, 0) + 1
        return summary_

    attention = {
        "cobatched_training_pass": kernels(lambda: engine.forward_backward_many(ops)),
        "sampling_equal_prompts": kernels(lambda: sample((12, 12))),
        "sampling_left_padded": kernels(lambda: sample((12, 20))),
    }

    # Host syncs (CUDA only): syncing calls inside LoRA layers (expected 0) and in whole ops (the loss and
    # finiteness checks of an op, the sampler's one read-back per step and transformers' mask check).
    syncs: dict[str, Any] = {"note": "CUDA only (torch.cuda.set_sync_debug_mode)"}
    if device.type == "cuda":
        forward = lora.LoRALinear.forward
        inside = [0]

        def counting_forward(self, x):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                y = forward(self, x)
            inside[0] += sum("synchroniz" in str(w.message) for w in caught)
            return y

        def count(fn: Callable[[], Any]) -> dict[str, int]:
            inside[0] = 0
            lora.LoRALinear.forward = counting_forward  # type: ignore[method-assign]
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
                lora.LoRALinear.forward = forward  # type: ignore[method-assign]
            return {
                "in_lora_layers": inside[0],
                "elsewhere_in_op": sum("synchroniz" in str(w.message) for w in caught),
            }

        engine.forward_backward_many(ops)  # layouts planned
        syncs["cobatched_forward_backward"] = count(lambda: engine.forward_backward_many(ops))
        syncs["sampling_4_tokens_left_padded"] = count(lambda: sample((12, 20)))
    for run in runs:
        engine.delete_run(run)

    check.result["cuda_paths"] = {
        "dense_lora_paths": paths,
        "attention_kernels": attention,
        "host_syncs": syncs,
        "note": "times in ms per call (forward, plus backward for train_*); auto = the way lora picks here",
    }
    train_label = next(iter(shapes))
    auto = paths[train_label]["auto"]
    return (
        f"{train_label}: auto={auto} {paths[train_label][auto]['ms']:.3f} ms vs loop "
        f"{paths[train_label]['loop']['ms']:.3f} ms; "
        f"attention: {', '.join(sorted(attention['cobatched_training_pass']))}"
    )


def resume_section(check: Check, engine: Any, name: str, shape: Shape) -> str:
    """Training resumed from a `save_state` checkpoint on this device equals training straight through:
    AdamW's restored state (its `step` counter, moments) must reach the fused update where that update
    reads it (on CUDA, the device), or the resumed run crashes or steps differently. 2 steps, save, 2 more;
    then a new run from the checkpoint, the same 2 steps: the weights are compared, bit for bit, beside
    the same 4 steps run twice from scratch (the device's own run-to-run noise: attention backward kernels
    need not be deterministic on a GPU, so "as close as two straight runs" is what resuming must meet)."""
    from eztinker.engine import AdamParams, Datum

    lora = {"r": check.plan.lora_rank // 4, "lora_alpha": check.plan.lora_rank // 2, "seed": 5}
    data = [
        Datum.from_labels(random_rows(1, 64, shape.vocab_size, seed=50 + i)[0].tolist()) for i in range(2)
    ]
    adam = [AdamParams(learning_rate=1e-4 * (i + 1), weight_decay=0.01, grad_clip_norm=1.0) for i in range(4)]

    def steps(run_id: str, schedule: list[Any]) -> None:
        for params in schedule:
            engine.forward_backward(run_id, data)
            engine.optim_step(run_id, params)

    def weights(run_id: str) -> list[torch.Tensor]:
        return [p.detach().float().cpu() for p in engine._run(run_id).params]

    straight = engine.create_run(name, lora).run_id
    with tempfile.TemporaryDirectory(prefix="gpu-check-resume-") as tmp:
        steps(straight, adam[:2])
        engine.save_state(straight, Path(tmp) / "step-2")
        steps(straight, adam[2:])
        resumed = engine.create_run(name, adapter_path=Path(tmp) / "step-2").run_id
        steps(resumed, adam[2:])
    again = engine.create_run(name, lora).run_id
    steps(again, adam)

    def max_diff(x: list[torch.Tensor], y: list[torch.Tensor]) -> float:
        return max(float((p - q).abs().max()) for p, q in zip(x, y, strict=True))

    a, b, c = weights(straight), weights(resumed), weights(again)
    diff, noise = max_diff(a, b), max_diff(a, c)
    identical = all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for run in (straight, resumed, again):
        engine.delete_run(run)
    check.result["resume"] = {
        "steps_before_save": 2,
        "steps_after": 2,
        "max_abs_weight_diff": diff,
        "straight_run_twice_max_abs_weight_diff": noise,
        "bit_identical": identical,
        "within_run_to_run_noise": diff <= noise,
    }
    return f"resumed vs straight through: max |Δw| {diff:.3g} (two straight runs: {noise:.3g}), bit-identical {identical}"


# --- the big shape: how many layers fit ---------------------------------------------------------------


def big_layers(check: Check, shape: Shape) -> tuple[int, str]:
    """Layers of the big shape that fit the device memory (engine + PEFT copies + one chunk's
    activations) and the time left (about 2·(rounds+1) steps per side at 30 % MFU, plus build time)."""
    plan, full = check.plan, shape.num_hidden_layers
    if check.args.big_layers:
        return min(check.args.big_layers, full), "--big-layers"
    reasons = []
    layers = full
    h, i, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    kv = shape.num_key_value_heads * shape.d_head
    q = shape.num_attention_heads * shape.d_head
    layer_params = h * (q + 2 * kv) + q * h + 3 * h * i
    embed_params = v * h * (1 if shape.tie_word_embeddings else 2)
    if check.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(check.device)
        chunk = plan.train_seq  # one sequence per chunk at least
        per_layer = 2 * 2 * layer_params + chunk * (10 * h + 5 * i) * 2  # two bf16 copies + activations
        # Both copies of the embeddings, one chunk's logits (bf16, fp32 and their gradient), and slack.
        fixed = 2 * 2 * embed_params + chunk * v * 10 + 2 * 2**30
        fit = int((0.85 * free - fixed) // per_layer)
        if fit < layers:
            layers = max(1, fit)
            reasons.append(f"memory: {free / 2**30:.0f} GiB free fits {fit} layers")
    peak = check.result["peak_bf16_tflops"] * 1e12
    tokens = plan.train_batch * plan.train_seq

    def seconds(n: int) -> float:  # the section's estimated time with n layers
        step = 4.0 * (n * layer_params + embed_params) * tokens / (0.3 * peak)
        return 2 * (plan.train_rounds + 1) * step * 1.2 + 20 + 0.5 * n

    by_memory = layers
    while layers > 1 and seconds(layers) > check.left() - 15:
        layers -= 1
    if layers < by_memory:
        reasons.append(f"time budget: {check.left():.0f} s left")
        check.shrink("big.build", f"{layers} of {full} layers")
    return layers, "; ".join(reasons) or "full depth"


# --- main ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="where to write the JSON (default gpu_check.json)")
    p.add_argument("--budget-s", type=float, default=450.0, help="total time budget in seconds (default 450)")
    p.add_argument(
        "--dry-run", action="store_true", help="tiny models and sizes (on the CPU unless --device)"
    )
    p.add_argument(
        "--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available, cpu for --dry-run)"
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, overriding the table"
    )
    p.add_argument(
        "--big-layers",
        type=int,
        default=None,
        help="layers of the Qwen3-8B shape (default: all 36 if they fit)",
    )
    p.add_argument("--skip-big", action="store_true", help="skip the Qwen3-8B shape")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub (set before transformers loads)
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes from transformers/peft
    plan = DRY if args.dry_run else FULL
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if not args.dry_run and device.type != "cuda":
        print("gpu_check: no CUDA device; the full check needs one (use --dry-run on a CPU)", file=sys.stderr)
    if device.type == "cpu" and args.dry_run:
        # Tiny models are latency-bound: one thread is faster and steadier on a small shared CPU (as in tests).
        torch.set_num_threads(1)
    check = Check(args, plan, device)
    check.result["device"] = str(device)
    check.result["dtype"] = "bfloat16"
    dtype = torch.bfloat16

    source = bootstrap_eztinker()
    if importlib.util.find_spec("pydantic") is None:  # the engine's one dependency beyond torch & HF
        print(
            "gpu_check: pydantic is missing; the engine imports it (eztinker.models.configs, for LoRAConfig)."
            " pip install pydantic, or put a directory holding it on PYTHONPATH. Engine sections will fail.",
            file=sys.stderr,
        )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    def env() -> str:
        check.result["environment"] = environment(device, source)
        e = check.result["environment"]
        return f"{e['device_name']}, torch {e['torch']} (CUDA {e['cuda']}), transformers {e.get('transformers')}, peft {e.get('peft')}"

    def peak() -> str:
        measured = measure_matmul_tflops(device, plan.matmul_n, plan.matmul_iters)
        check.result["measured_matmul_tflops"] = measured
        name = check.result.get("environment", {}).get("device_name", "")
        table, key = peak_for(name) if device.type == "cuda" else (None, None)
        if args.peak_tflops:
            check.result["peak_bf16_tflops"], check.result["peak_source"] = args.peak_tflops, "--peak-tflops"
        elif table is not None:
            check.result["peak_bf16_tflops"], check.result["peak_source"] = table, f"table: {key}"
        else:
            check.result["peak_bf16_tflops"], check.result["peak_source"] = measured, "measured bf16 matmul"
        return f"bf16 matmul {measured:.1f} TFLOPS measured; peak for MFU {check.result['peak_bf16_tflops']:.1f} ({check.result['peak_source']})"

    check.section("environment", env)
    if not check.section("peak", peak):
        check.result.setdefault("peak_bf16_tflops", args.peak_tflops or float("nan"))

    state: dict[str, Any] = {}

    def build_small() -> str:
        from eztinker.engine import Engine, EngineConfig

        tok = tokenizer()
        state["engine"] = engine = Engine(EngineConfig(device=str(device), dtype=dtype))
        fp32 = build_model(plan.small, torch.float32, device, seed=0, tokenizer=tok)
        bf16 = cast_copy(fp32, torch.bfloat16)  # the same weights, rounded: for the fp32 comparison
        state["small_peft"] = cast_copy(bf16, torch.bfloat16)
        state["small_hf"] = cast_copy(bf16, torch.bfloat16)
        state["small_linear"] = linear_params(bf16)
        check.result.setdefault("models", {})["small"] = shape_info(
            plan.small, bf16, plan.small.num_hidden_layers
        )
        add_base_model(engine, "small", bf16, tok)
        add_base_model(engine, "small-fp32", fp32, tok)
        return f"{plan.small.label}: {check.result['models']['small']['params'] / 1e6:.1f} M parameters"

    check.section("small.build", build_small)
    engine = state.get("engine")
    check.section(
        "small.forward_backward",
        lambda: train_section(check, "small", engine, "small", plan.small, state.pop("small_peft"), state["small_linear"]),
        min_s=20, needs=("small.build", "peak"),
    )  # fmt: skip
    state.pop("small_peft", None)
    free_memory(device)
    check.section(
        "small.cobatching",
        lambda: cobatch_section(check, engine, "small", plan.small),
        min_s=20,
        needs=("small.build",),
    )
    check.section(
        "small.sampling",
        lambda: sampling_section(check, engine, "small", plan.small, state["small_hf"]),
        min_s=20, needs=("small.build",),
    )  # fmt: skip
    state.pop("small_hf", None)
    if importlib.util.find_spec("llguidance") is None:  # optional: the kit needs only torch & co
        check.skip("small.constrained", "llguidance is not installed (pip install llguidance to measure it)")
    else:
        check.section(
            "small.constrained",
            lambda: constrained_section(check, engine, "small", plan.small),
            min_s=20, needs=("small.build",),
        )  # fmt: skip
    check.section(
        "small.logprob_agreement",
        lambda: agreement_section(check, engine, "small", "small-fp32", plan.small),
        min_s=10, needs=("small.build",),
    )  # fmt: skip
    check.section(
        "small.cuda_paths",
        lambda: cuda_paths_section(check, engine, "small", plan.small),
        min_s=10, needs=("small.build",),
    )  # fmt: skip
    check.section(
        "small.resume",
        lambda: resume_section(check, engine, "small", plan.small),
        min_s=10, needs=("small.build",),
    )  # fmt: skip
    # Free the small models before the big one.
    engine = None
    check.cobatch_runs = []
    state.clear()
    free_memory(device)

    if args.skip_big:
        check.skip("big.build", "--skip-big")
        check.skip("big.forward_backward", "--skip-big")
    else:

        def build_big() -> str:
            from eztinker.engine import Engine, EngineConfig

            layers, why = big_layers(check, plan.big)
            tok = tokenizer()
            state["engine"] = engine = Engine(EngineConfig(device=str(device), dtype=dtype))
            model = build_model(plan.big, dtype, device, seed=0, tokenizer=tok, layers=layers)
            state["big_peft"] = copy.deepcopy(model)
            state["big_linear"] = linear_params(model)
            state["big_shape"] = replace(plan.big, num_hidden_layers=layers)
            info = shape_info(plan.big, model, layers)
            info["layers_reason"] = why
            check.result.setdefault("models", {})["big"] = info
            check.result["big_model_layers"] = layers
            add_base_model(engine, "big", model, tok)
            return f"{plan.big.label}: {layers}/{plan.big.num_hidden_layers} layers ({why}), {info['params'] / 1e9:.2f} B parameters"

        check.section("big.build", build_big, min_s=60 if not args.dry_run else 5, needs=("peak",))
        check.section(
            "big.forward_backward",
            lambda: train_section(check, "big", state["engine"], "big", state["big_shape"], state.pop("big_peft"), state["big_linear"]),
            min_s=20 if not args.dry_run else 5, needs=("big.build",),
        )  # fmt: skip
        state.clear()
        free_memory(device)

    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(WEB_STACK))
    check.result.setdefault("environment", {})["web_stack_modules_loaded"] = loaded
    meets: dict[str, bool | None] = {}
    for key, target in TARGETS.items():
        value = check.result.get(key)
        if not isinstance(value, int | float) or not math.isfinite(value):
            meets[key] = None
        else:
            meets[key] = value >= target["min"] if "min" in target else value <= target["max"]
    check.result["meets_targets"] = meets
    if args.dry_run:
        check.result["meets_targets_note"] = "dry run: tiny CPU models; the targets apply to the GPU run only"
    check.write()
    errors = check.result["errors"]
    headline = ", ".join(
        f"{key} {check.result[key]:.3g}" if isinstance(check.result.get(key), float) else f"{key} -"
        for key in TARGETS
    )
    check.say(
        f"done in {check.elapsed():.0f} s: {headline}; {len(errors)} error(s), "
        f"{len(check.result['skipped'])} skipped → {check.out}"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
