"""The optimizers a training run can have — AdamW (torch's) and Dimuon — and Dimuon's maths, in one place.

A run's optimizer family is fixed when the run is created (Tinker: `create_lora_training_client(...,
optimizer=AdamOptimizerConfig() | DimuonOptimizerConfig())`); every `optim_step` passes that family's
hyperparameters (`AdamParams` / `DimuonParams`), and a step of the other family is refused.

**AdamW** is `torch.optim.AdamW` (decoupled weight decay), as Tinker documents it; its state per
parameter is torch's `step`, `exp_avg`, `exp_avg_sq`.

**Dimuon** implements Tinker's Dimuon (SDK 0.38 `tinker.types.DimuonParams` / `DimuonOptimizerConfig`
v1; docs: tinker-docs.thinkingmachines.ai/tinker/optimizers/ and the API reference of `DimuonParams`):
a momentum optimizer for matrices whose update direction is a matrix sign (polar factor), taken after a
damped row and column preconditioner, with the learning rate "applied to a direction with Frobenius
norm sqrt(rank), with rank correction applied uniformly to all LoRA matrices", the correction being
relative to rank 32 with exponent `rank_lr_correction_exponent` (0 disables it). SDK 0.38 sends
`learning_rate`, `grad_clip_norm` (<= 0: no clipping) and `beta1`; the newer SDK's `damping` (default
1e-4, > 0) and `rank_lr_correction_exponent` (default 0.175) are accepted too. Tinker keeps the
matrix-sign iteration count and the normalisation epsilon internal; so does this module. Tinker does
not publish the rest of the formula (nor the sign of the rank correction: here it raises the rate for
ranks above 32, partly making up LoRA's alpha / r scaling); the precise reading implemented here, for
each matrix P (m × n) with gradient G and momentum M (its only state), with η = `learning_rate`,
β = `beta1`, δ = `damping`, e = `rank_lr_correction_exponent`, r = the LoRA rank:

```
G  <- G · min(1, c / ||g||)                        c = grad_clip_norm > 0, ||g|| over all the run's matrices
M  <- β·M + (1 - β)·G                              the running average of gradients (zero at the start)
M̂  =  M / rms(M)                                   scale-free, so δ is relative
ρ_i = mean_j M̂_ij²      γ_j = mean_i M̂_ij²          row and column second moments of M̂
X  =  diag(ρ + δ)^(-1/4) · M̂ · diag(γ + δ)^(-1/4)   the damped two-sided diagonal preconditioner
O  =  msign(X) = U·Vᵀ   (X = U·Σ·Vᵀ)                Newton–Schulz iteration, `matrix_sign`
D  =  sqrt(r) · O / ||O||_F                        a direction of Frobenius norm sqrt(rank)
P  <- P - η · (r / 32)^e · D
```

The preconditioner is the diagonal of Shampoo's two-sided L^(-1/4)·G·R^(-1/4) (L = GGᵀ, R = GᵀG); its
damping δ > 0 smooths it (δ → ∞ gives plain Muon, msign(M)) and keeps an all-zero row or column finite.
A zero momentum gives a zero update.

Why per LoRA factor: a LoRA adapter's trainable tensors are its factors A (r × in) and B (out × r), each a
2-D matrix with one side of length r. Tinker applies the learning rate "uniformly to all LoRA matrices",
to a direction of Frobenius norm sqrt(rank) — exactly the norm of the matrix sign of an r × n (or m × r)
matrix of full rank, whose r singular values are 1. So Dimuon treats each factor A and B as its own
matrix (not the product B·A, whose rank-r update would need a different geometry), and the matrix sign
orthogonalises each factor's r directions: it equalises how far each of the adapter's r rank-1
components moves, which is what the rank-uniform learning rate presumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, overload

import torch
from torch import nn

from eztinker.engine.errors import InvalidInputError
from eztinker.engine.types import AdamParams, DimuonParams

OptimizerName = Literal["adamw", "dimuon"]
OPTIMIZERS: tuple[OptimizerName, ...] = ("adamw", "dimuon")

STATE_STATS: dict[str, tuple[str, ...]] = {
    "adamw": ("step", "exp_avg", "exp_avg_sq"),
    "dimuon": ("momentum_buffer",),
}
"""The per-parameter statistics each optimizer keeps (and a checkpoint's `optimizer.safetensors` holds)."""

DIMUON_REFERENCE_RANK = 32
"""The LoRA rank at which Dimuon's rank correction of the learning rate is 1."""

# Internal constants of the matrix sign (Tinker keeps them internal too).
NS_QUINTIC_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Muon's (Jordan et al., 2024): fast growth near 0
NS_QUINTIC_STEPS = 5  # bring every singular value above ~1e-3 (of the largest) into ~[0.7, 1.2]
NS_CUBIC_STEPS = 5  # then s <- 1.5·s - 0.5·s³, which converges quadratically to exactly 1
NORM_EPS = 1e-7  # the normalisation epsilon of the iteration's start


def check_optimizer_name(name: Any, field: str) -> OptimizerName:
    """`name` if it is an optimizer this server has, else `InvalidInputError(field)`."""
    if name not in OPTIMIZERS:
        raise InvalidInputError(field, f"unknown optimizer {name!r}; this server has {list(OPTIMIZERS)}")
    return name


def optimizer_config(name: OptimizerName) -> dict[str, Any]:
    """The optimizer as Tinker's `OptimizerConfig` spells it: `{"type": "adamw"}` or `{"type": "dimuon", "version": 1}`."""
    return {"type": "dimuon", "version": 1} if name == "dimuon" else {"type": "adamw"}


def make_optimizer(
    params: Sequence[nn.Parameter], name: OptimizerName = "adamw", *, rank: int
) -> torch.optim.Optimizer:
    """A fresh optimizer of family `name` over a run's adapter; its hyperparameters come with each step."""
    if check_optimizer_name(name, "optimizer") == "dimuon":
        return Dimuon(params, rank=rank)
    return torch.optim.AdamW(list(params), lr=0.0, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)


def optimizer_name(optimizer: torch.optim.Optimizer) -> OptimizerName:
    """The family of a run's optimizer."""
    return "dimuon" if isinstance(optimizer, Dimuon) else "adamw"


def check_step_params(
    optimizer: OptimizerName, params: AdamParams | DimuonParams, run_id: str, *, rank: int | None = None
) -> None:
    """Refuse (before any compute) a step of the other family than the run's, or an out-of-range value.

    Every value must be finite as a float32 (the optimizers compute in it: a larger one fails inside torch
    as an OverflowError); a Dimuon step also needs the learning rate it applies, `learning_rate ×
    (rank / 32) ** rank_lr_correction_exponent` for the run's LoRA `rank` (when given), to be one.

    The field names are the Tinker wire's: `adam_params` carries `AdamParams`, `optimizer_params`
    carries `DimuonParams`.
    """
    field, family, given, other = (
        ("optimizer_params", "dimuon", "DimuonParams", "AdamParams")
        if isinstance(params, DimuonParams)
        else ("adam_params", "adamw", "AdamParams", "DimuonParams (sent as optimizer_params)")
    )
    if optimizer != family:
        raise InvalidInputError(
            field,
            f"{given} for run {run_id!r}, whose optimizer is {optimizer} (fixed when the run "
            f"was created): pass {other}",
        )
    checks = {"learning_rate": params.learning_rate >= 0, "beta1": 0 <= params.beta1 < 1}
    if isinstance(params, DimuonParams):
        checks |= {
            "grad_clip_norm": True,  # <= 0 disables clipping
            "damping": params.damping > 0,
            "rank_lr_correction_exponent": True,
        }
    else:
        checks |= {
            "beta2": 0 <= params.beta2 < 1,
            "eps": params.eps > 0,
            "weight_decay": params.weight_decay >= 0,
            "grad_clip_norm": params.grad_clip_norm >= 0,
        }
    _check_ranges(field, params, checks)
    if isinstance(params, DimuonParams) and rank is not None:
        _check_dimuon_rate(field, params, rank)


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _check_ranges(prefix: str, params: Any, checks: Mapping[str, bool]) -> None:
    for name, ok in checks.items():
        value = getattr(params, name)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise InvalidInputError(f"{prefix}.{name}", f"must be a number, got {value!r}")
        if not ok or not math.isfinite(value):
            raise InvalidInputError(f"{prefix}.{name}", f"{value} is out of range")
        if abs(value) > FLOAT32_MAX:
            raise InvalidInputError(
                f"{prefix}.{name}", f"{value} is out of range: at most {FLOAT32_MAX:.3g} in magnitude"
            )


def _applied_rate(learning_rate: float, rank: int, exponent: float) -> float:
    """The rate a Dimuon step applies; an overflow (the step was not checked with the rank) is refused
    before any weight changes, naming the setting."""
    _check_dimuon_rate(
        "optimizer_params", DimuonParams(learning_rate, rank_lr_correction_exponent=exponent), rank
    )
    return learning_rate * rank_lr_factor(rank, exponent)


def _check_dimuon_rate(prefix: str, params: DimuonParams, rank: int) -> None:
    """The rate Dimuon applies at `rank` must be a float32: a huge exponent overflows it (OverflowError)."""
    exponent = params.rank_lr_correction_exponent
    try:
        factor = rank_lr_factor(rank, exponent)
    except OverflowError:
        factor = math.inf
    if not factor <= FLOAT32_MAX:
        raise InvalidInputError(
            f"{prefix}.rank_lr_correction_exponent",
            f"{exponent} is out of range: at LoRA rank {rank} the rank correction (rank / "
            f"{DIMUON_REFERENCE_RANK}) ** exponent overflows; use an exponent near the default 0.175",
        )
    if not params.learning_rate * factor <= FLOAT32_MAX:
        raise InvalidInputError(
            f"{prefix}.learning_rate",
            f"{params.learning_rate} is out of range: times the rank correction {factor:.3g} (LoRA rank "
            f"{rank}) it overflows a float32",
        )


# --- Dimuon ------------------------------------------------------------------------------------------


def matrix_sign(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor U·Vᵀ of each matrix x = U·Σ·Vᵀ in (..., m, n), by Newton–Schulz.

    Float32 throughout. Singular values far below the largest (under ~1e-4 of it) are not fully lifted
    to 1: directions the matrix barely has stay small, as in Muon.
    """
    x = x.float()
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:  # iterate on the small Gram matrix
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + NORM_EPS)  # every singular value <= 1
    a, b, c = NS_QUINTIC_COEFFICIENTS
    for _ in range(NS_QUINTIC_STEPS):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    for _ in range(NS_CUBIC_STEPS):
        x = 1.5 * x - 0.5 * ((x @ x.mT) @ x)
    return x if wide else x.mT


def dimuon_direction(momentum: torch.Tensor, *, rank: int, damping: float) -> torch.Tensor:
    """Dimuon's update direction D for each momentum matrix in (..., m, n) (see the module docstring).

    Float32; ||D||_F = sqrt(rank) for each matrix, or D = 0 where the momentum is 0.
    """
    m = momentum.float()
    rms = m.square().mean(dim=(-2, -1), keepdim=True).sqrt()
    m = m / torch.where(rms > 0, rms, torch.ones_like(rms))
    squares = m.square()
    rows = (squares.mean(dim=-1, keepdim=True) + damping).pow(-0.25)  # (..., m, 1)
    cols = (squares.mean(dim=-2, keepdim=True) + damping).pow(-0.25)  # (..., 1, n)
    o = matrix_sign(rows * m * cols)
    norm = torch.linalg.matrix_norm(o, keepdim=True)
    return o * (math.sqrt(rank) / torch.where(norm > 0, norm, torch.ones_like(norm)))


def rank_lr_factor(rank: int, exponent: float) -> float:
    """Dimuon's rank correction of the learning rate: (rank / 32) ** exponent (1 at rank 32 or exponent 0)."""
    return (rank / DIMUON_REFERENCE_RANK) ** exponent


class Dimuon(torch.optim.Optimizer):
    """Dimuon over a LoRA adapter's 2-D factors (see the module docstring).

    State per parameter: `momentum_buffer` (same shape and dtype as the parameter). Hyperparameters
    live in the param group (`lr`, `beta1`, `damping`, `rank_lr_correction_exponent`) and are set before
    each step. Gradient clipping is the caller's (it is global over the run's parameters). Matrices of
    one shape are stepped together, as one batch.
    """

    def __init__(self, params: Iterable[nn.Parameter], *, rank: int) -> None:
        params = list(params)
        for p in params:
            if p.ndim != 2:
                raise ValueError(f"Dimuon steps matrices; got a parameter of shape {tuple(p.shape)}")
        defaults = {"lr": 0.0, "beta1": 0.9, "damping": 1e-4, "rank_lr_correction_exponent": 0.175}
        super().__init__(params, defaults)
        self.rank = rank

    def set_hyperparameters(self, params: DimuonParams) -> None:
        for group in self.param_groups:
            group.update(
                lr=params.learning_rate,
                beta1=params.beta1,
                damping=params.damping,
                rank_lr_correction_exponent=params.rank_lr_correction_exponent,
            )

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter with a gradient (`closure` is not used: no re-evaluation)."""
        for group in self.param_groups:
            lr = _applied_rate(group["lr"], self.rank, group["rank_lr_correction_exponent"])
            beta1 = group["beta1"]
            by_shape: dict[tuple[Any, ...], list[nn.Parameter]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault((tuple(p.shape), p.device, p.dtype), []).append(p)
            for params in by_shape.values():
                buffers = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    buffers.append(state["momentum_buffer"])
                grads = [p.grad for p in params if p.grad is not None]
                torch._foreach_mul_(buffers, beta1)
                torch._foreach_add_(buffers, grads, alpha=1.0 - beta1)
                directions = dimuon_direction(torch.stack(buffers), rank=self.rank, damping=group["damping"])
                for p, d in zip(params, directions.unbind(0), strict=True):
                    p.add_(d.to(p.dtype), alpha=-lr)
        return None
