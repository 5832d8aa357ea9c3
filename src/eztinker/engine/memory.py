"""Long context without the memory wall: what a training pass keeps, how much memory it needs, and
gradient checkpointing of the decoder layers.

A `forward_backward` pass holds, until its backward: the activations every decoder layer saves for its
gradient (with LoRA on every projection ≈ 10 k floats per token per layer on SmolLM2), and whatever the
loss keeps of the output head. The engine bounds both:

* **The head** never produces (B, T, V) logits for a chunkable loss (`eztinker.engine.head`): the loss is
  computed from hidden states in chunks of `logits_chunk // V` positions, recomputed in backward.
* **Decoder layers** are checkpointed when a pass has more than `checkpoint_tokens` padded tokens (or
  when the pass would not fit the memory limit without it): each layer keeps only its input and is run
  again in backward, one layer at a time (`checkpointed`). Shorter passes keep today's speed.
* **Attention** runs through SDPA with ``is_causal=True`` and no mask: rows of a pass are right-padded,
  so causality alone keeps real tokens from seeing padding; with no explicit mask SDPA takes its
  flash / memory-efficient kernels (O(T) memory) instead of a (B, 1, T, T) mask.

`MemoryProfile` measures, once per base model, how many bytes a row of T tokens saves for backward (the
tensors autograd keeps, counted through `saved_tensors_hooks` on a few short probe sequences with every
base weight requiring grad, as if LoRA adapted every layer; fitted as a + b·T + c·T², so quadratic
attention of eager-only families is caught too). `estimate_pass_bytes` turns it into the peak of a pass,
and `largest_sequence` into the longest sequence a memory limit allows; the engine refuses a longer one
before any compute (`InvalidInputError`), never running out of memory half-way.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import weakref
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from eztinker.engine.families import is_vision_path
from eztinker.engine.lora import output_head_path, routed

__all__ = [
    "MemoryProfile",
    "PassMemory",
    "available_bytes",
    "checkpointed",
    "decoder_layers",
    "memory_profile",
]

MiB = 2**20
# Allocator slack and the bookkeeping no formula sees (autograd nodes, rounding of allocations).
_SAFETY = 1.25
_FIXED_OVERHEAD = 64 * MiB
# Fraction of the free device memory a pass may use when no limit is configured.
_AUTO_FRACTION = 0.9
_PROBE_LENGTHS = (16, 32, 64)


@dataclass(frozen=True)
class MemoryProfile:
    """What one base model's training passes keep per token, measured once (see the module docstring)."""

    backbone: nn.Module  # the decoder stack (`model.base_model`): input ids -> final hidden states
    head_path: str | None  # module path of the output head; None: the model has none
    plain_head: bool  # logits == head(final hidden states): the loss can be computed from hidden states
    layers: tuple[nn.Module, ...]  # the decoder layers gradient checkpointing applies to
    hidden_size: int
    vocab_size: int
    dtype_bytes: int
    saved: tuple[float, float, float]  # bytes a row of T tokens saves for backward: a + b·T + c·T²

    @property
    def num_layers(self) -> int:
        return max(1, len(self.layers))

    def head(self, model: nn.Module) -> nn.Module:
        """The output head module as it is now (a `LoRALinear` once `train_unembed` wrapped it)."""
        assert self.head_path is not None
        return model.get_submodule(self.head_path)

    def saved_bytes(self, width: int) -> float:
        """Bytes one row of `width` tokens saves for backward without checkpointing."""
        a, b, c = self.saved
        return max(0.0, a + b * width + c * width * width)


@dataclass(frozen=True)
class PassMemory:
    """How a pass is run and how much memory it may take: the engine config's knobs, resolved."""

    checkpoint_tokens: int  # checkpoint decoder layers of passes with more padded tokens than this
    logits_chunk: int  # logits elements per head chunk
    limit: int  # bytes a pass may use on top of what is already allocated

    def chunk_tokens(self, profile: MemoryProfile) -> int:
        """Positions per head chunk."""
        return max(1, self.logits_chunk // max(1, profile.vocab_size))

    def estimate(
        self,
        profile: MemoryProfile,
        rows: int,
        width: int,
        *,
        backward: bool,
        checkpoint: bool,
        full_logits: bool = False,
    ) -> int:
        """Peak bytes of one pass over `rows` × `width` padded tokens (an upper estimate).

        `checkpoint`: decoder layers checkpointed; `full_logits`: the loss takes (B, T, V) logits (a
        registered loss without `token_terms`, or a model whose head is not plain).
        """
        tokens = rows * width
        hidden = tokens * profile.hidden_size * profile.dtype_bytes
        layer = rows * profile.saved_bytes(width) / profile.num_layers
        if not backward:
            activations = 2 * layer + 4 * hidden
        elif checkpoint:
            # Each layer's input is kept; backward runs one layer again and holds its gradients.
            activations = (profile.num_layers + 4) * hidden + 3 * layer
        else:
            activations = rows * profile.saved_bytes(width) + 2 * layer + 2 * hidden
        copies = 4 if backward else 2  # logits, their log-softmax, the gradient and a temporary
        logits = copies * min(tokens, self.chunk_tokens(profile)) * profile.vocab_size * 4
        if full_logits or not profile.plain_head:
            logits = copies * tokens * profile.vocab_size * 4
        return int(_SAFETY * (activations + logits) + _FIXED_OVERHEAD)

    def should_checkpoint(self, profile: MemoryProfile, rows: int, width: int, *, full_logits: bool) -> bool:
        """Checkpoint a backward pass's decoder layers: more than `checkpoint_tokens` padded tokens, or it
        would not fit the limit without."""
        if not profile.layers:
            return False
        if rows * width > self.checkpoint_tokens:
            return True
        plain = self.estimate(profile, rows, width, backward=True, checkpoint=False, full_logits=full_logits)
        return plain > self.limit

    def fits(
        self, profile: MemoryProfile, rows: int, width: int, *, backward: bool, full_logits: bool
    ) -> bool:
        return (
            self.estimate(
                profile,
                rows,
                width,
                backward=backward,
                checkpoint=backward and bool(profile.layers),
                full_logits=full_logits,
            )
            <= self.limit
        )

    def largest_sequence(self, profile: MemoryProfile, *, backward: bool, full_logits: bool) -> int:
        """The longest single sequence whose pass fits the limit (0 if none does)."""
        lo, hi = 0, 1
        while hi < 2**31 and self.fits(profile, 1, hi, backward=backward, full_logits=full_logits):
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # fits(lo), not fits(hi): the estimate grows with the length
            mid = (lo + hi) // 2
            if self.fits(profile, 1, mid, backward=backward, full_logits=full_logits):
                lo = mid
            else:
                hi = mid
        return lo


def available_bytes(device: torch.device) -> int:
    """Memory this process could still allocate on `device`: CUDA's free memory plus what the caching
    allocator holds unused; on CPU, the kernel's MemAvailable (or the cgroup's headroom if smaller)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    now = time.monotonic()
    with _HOST_LOCK:
        read_at, available = _HOST_AVAILABLE
        if now - read_at < _HOST_REREAD_SECONDS:
            return available
    available = _meminfo_available()
    headroom = _cgroup_headroom()
    if headroom is not None:
        available = min(available, headroom)
    with _HOST_LOCK:
        _HOST_AVAILABLE[:] = [now, available]
    return available


# Host memory is read from /proc and the cgroup files at most this often: each read costs about half a
# millisecond, which short ops (one every few ms per run) would otherwise pay on every pass.
_HOST_REREAD_SECONDS = 0.25
_HOST_AVAILABLE: list = [float("-inf"), 0]
_HOST_LOCK = threading.Lock()


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62  # unknown: do not refuse on memory grounds


def _cgroup_headroom() -> int | None:
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def pass_memory(
    device: torch.device, *, checkpoint_tokens: int, logits_chunk: int, memory_limit: int | None
) -> PassMemory:
    """The knobs for the next pass; without a configured limit, 90 % of what the device has free now."""
    limit = memory_limit if memory_limit is not None else int(_AUTO_FRACTION * available_bytes(device))
    return PassMemory(checkpoint_tokens=checkpoint_tokens, logits_chunk=max(1, logits_chunk), limit=limit)


# --- the profile -----------------------------------------------------------------------------------------

_PROFILES: weakref.WeakKeyDictionary[nn.Module, MemoryProfile] = weakref.WeakKeyDictionary()
_PROFILES_LOCK = threading.Lock()


def memory_profile(base) -> MemoryProfile:
    """The (cached) profile of base model `base` (a `BaseModel`); measured on first use, under its lock."""
    model = base.model
    profile = _PROFILES.get(model)
    if profile is not None:
        return profile
    with base.lock, _PROFILES_LOCK:
        profile = _PROFILES.get(model)
        if profile is None:
            profile = _measure(base)
            _PROFILES[model] = profile
    return profile


def last_hidden_state(output) -> torch.Tensor:
    """The final hidden states (B, T, H) of a backbone's output (a ModelOutput or a tuple)."""
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if hidden is not None else output[0]


def _measure(base) -> MemoryProfile:
    model = base.model
    backbone = model.base_model
    head_path = output_head_path(model)
    config = model.config.get_text_config()
    hidden_size = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 1)
    vocab = int(base.vocab_size)
    probe = torch.arange(_PROBE_LENGTHS[-1], dtype=torch.int64).mul_(7).add_(3).remainder_(vocab)
    probe = probe.unsqueeze(0).to(base.device)
    with routed(base.routing, []):
        plain = (
            head_path is not None and backbone is not model and _plain_head(model, backbone, head_path, probe)
        )
        saved = [_saved_bytes(backbone, probe[:, :n]) for n in _PROBE_LENGTHS]
    return MemoryProfile(
        backbone=backbone,
        head_path=head_path,
        plain_head=plain,
        layers=tuple(decoder_layers(model)),
        hidden_size=hidden_size,
        vocab_size=vocab,
        dtype_bytes=torch.finfo(base.dtype).bits // 8 if base.dtype.is_floating_point else 4,
        saved=_fit_quadratic(_PROBE_LENGTHS, saved),
    )


def _plain_head(model: nn.Module, backbone: nn.Module, head_path: str, probe: torch.Tensor) -> bool:
    """Whether the model's logits are exactly its head applied to the backbone's final hidden states (no
    soft-capping or scaling after the head), checked on a probe sequence."""
    try:
        with torch.no_grad():
            full = model(input_ids=probe[:, :8], use_cache=False).logits
            hidden = last_hidden_state(backbone(input_ids=probe[:, :8], use_cache=False))
            mine = model.get_submodule(head_path)(hidden)
    except Exception:  # a family whose backbone cannot be called alone: keep the full-logits path
        return False
    if full.shape != mine.shape:
        return False
    return bool(torch.allclose(full.float(), mine.float(), rtol=1e-5, atol=1e-5))


def _saved_bytes(backbone: nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in a forward of `ids`, every base weight requiring
    grad (so each linear layer keeps its input, as LoRA makes it); weights themselves are not counted."""
    params = list(backbone.parameters())
    flags = [p.requires_grad for p in params]
    weights = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = last_hidden_state(backbone(input_ids=ids, use_cache=False))
            total = sum(seen.values()) + out.numel() * out.element_size()
        del out
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return total


def _fit_quadratic(xs: Sequence[int], ys: Sequence[int]) -> tuple[float, float, float]:
    """(a, b, c) with a + b·x + c·x² through the three points; c and b clamped at 0 (bytes only grow)."""
    x = torch.tensor([[1.0, float(v), float(v) ** 2] for v in xs], dtype=torch.float64)
    y = torch.tensor([float(v) for v in ys], dtype=torch.float64)
    a, b, c = torch.linalg.solve(x, y).tolist()
    c = max(0.0, c)
    if b < 0:
        b = 0.0
    if not all(math.isfinite(v) for v in (a, b, c)):
        return (0.0, float(ys[-1]) / xs[-1], 0.0)
    return (a, b, c)


# --- gradient checkpointing --------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The outermost decoder layers of `model` (transformers' `GradientCheckpointingLayer`s), vision tower
    excluded; [] for a family without them (its passes are then never checkpointed)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers < 4.52
        return []
    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if not isinstance(module, GradientCheckpointingLayer) or is_vision_path(path):
            continue
        if any(path.startswith(outer + ".") for outer, _ in found):
            continue
        found.append((path, module))
    return [module for _, module in found]


def _heap_trimmer():
    """A gradient hook that hands the C heap's free pages back to the kernel (glibc `malloc_trim`), or None
    off glibc.

    On CPU, torch allocates with malloc. A checkpointed backward frees and allocates each layer's
    activations again, and glibc keeps the freed pages of its heap mapped (its mmap threshold drifts up to
    32 MiB, so tensors of a few MiB live in the heap): a 2,048-token step of SmolLM2 then peaked at
    ~2.3 GiB of resident memory for ~0.6 GiB of live tensors. Trimming once per layer in backward (a few
    ms each) keeps resident memory near what is live; short passes are never checkpointed, so never
    trimmed.
    """
    libc = _libc()
    if libc is None:
        return None

    def trim(grad: torch.Tensor) -> None:
        if grad.device.type == "cpu":
            libc.malloc_trim(0)

    return trim


_LIBC: list = []


def _libc():
    if not _LIBC:
        handle = None
        try:
            import ctypes
            import ctypes.util

            candidate = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            handle = candidate if hasattr(candidate, "malloc_trim") else None
        except (OSError, AttributeError):
            handle = None
        _LIBC.append(handle)
    return _LIBC[0]


@contextlib.contextmanager
def checkpointed(layers: Sequence[nn.Module], enabled: bool = True) -> Generator[None]:
    """While active, each layer keeps only its inputs for backward and runs again during backward
    (`torch.utils.checkpoint`, non-reentrant, RNG state preserved: LoRA dropout draws the same masks).

    The model stays in eval mode (transformers' own switch needs `model.train()`, which would turn on
    the base model's dropout); the layers' `forward` is wrapped on the instance and restored after.
    """
    if not enabled or not layers:
        yield
        return
    previous: list[tuple[nn.Module, object]] = []
    trim = _heap_trimmer()
    for layer in layers:
        previous.append((layer, layer.__dict__.get("forward")))
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            out = checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            first = out if isinstance(out, torch.Tensor) else next(iter(out), None)
            if trim is not None and isinstance(first, torch.Tensor):
                trim(first)  # this layer's temporaries are freed: return their pages
                if first.requires_grad:
                    first.register_hook(trim)  # before this layer's backward: return the last one's
            return out

        layer.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        for layer, own in previous:
            if own is None:
                del layer.__dict__["forward"]
            else:
                layer.__dict__["forward"] = own
