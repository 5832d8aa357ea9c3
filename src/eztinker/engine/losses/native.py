"""The native family: losses over logits and labels (cross-entropy, weighted, focal, smooth L1, contrastive),
each a token term reduced with the loss's normalizer; and the shifted target log-probabilities they share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from eztinker.engine.types import IGNORE_INDEX


@dataclass(frozen=True)
class TokenTerms:
    """A native loss in token-separable form: ``loss = reduce(term(z_t, y_t) for each target t)``.

    * ``term(z, y, lp, **kwargs) -> (n,)``: the per-token term of `n` positions from their logits `z`
      (n, V) (upcast as `fn` does: fp16/bf16 to fp32), their targets `y` (n,) (never the ignore index),
      and ``lp = log p(y | z)`` (n,), which the engine computes anyway (its reported log-probs). `kwargs`
      are the loss config's, as `fn` receives them.
    * `weighted_mean` False: ``Σ_t w_t · term_t / #targets`` (the count normalizer); True:
      ``Σ_t w_t · term_t / Σ_t w_t`` (0 when ``Σ w = 0``). Weights default to 1; ignored targets count 0.

    The engine then never needs (B, T, V) logits for this loss (see the module docstring).
    """

    term: Callable[..., Tensor]
    weighted_mean: bool = False


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 are upcast to fp32; fp32 and fp64 are kept."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _shifted(
    logits: Tensor, labels: Tensor, weights: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(z, safe_labels, valid, w, lp): shifted logits (B,T-1,V) upcast, labels with ignored set to 0,
    the non-ignored mask, shifted weights (ones by default, 0 where ignored), and target log-probs."""
    full = logits.to(_compute_dtype(logits.dtype))
    batch, length, vocab = full.shape
    y = labels[:, 1:].long()
    valid = y != IGNORE_INDEX
    safe = torch.where(valid, y, torch.zeros_like(y))
    w = torch.ones_like(y, dtype=full.dtype) if weights is None else weights[:, 1:].to(full.dtype)
    w = torch.where(valid, w, torch.zeros_like(w))
    # One fused log-softmax + gather over the unsliced logits (position t predicts labels[t+1]; the last
    # position predicts nothing): ~2x faster than gather - logsumexp on a sliced view, forward and backward.
    targets = F.pad(y, (0, 1), value=IGNORE_INDEX)
    nll = F.cross_entropy(
        full.reshape(-1, vocab), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    lp = -nll.view(batch, length)[:, :-1]  # 0 where the label is ignored
    return full[:, :-1, :], safe, valid, w, lp


def shifted_target_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(labels[:, t+1] | logits[:, t]) for t < T-1: shape (B, T-1), 0.0 where the label is ignored.

    Computed as ``z_y − logsumexp(z)`` in fp32 (fp16/bf16 logits are upcast; fp64 stays fp64). The engine
    reports these as the native family's per-datum `logprobs`; every built-in uses this one implementation.
    """
    return _shifted(logits, labels, None)[4]


def default_normalizer(labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """The number of non-ignored shifted labels, ``#{t : labels[:, 1:] != -100}`` (a 0-d float tensor)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum().to(torch.float32)


def _weight_sum_normalizer(labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """``Σ_t w_t`` over non-ignored shifted targets (the token count when there are no weights)."""
    if weights is None:
        return default_normalizer(labels, None)
    valid = labels[:, 1:] != IGNORE_INDEX
    w = weights[:, 1:].to(torch.float64)
    return torch.where(valid, w, torch.zeros_like(w)).sum().to(torch.float32)


def _mean(per_token: Tensor, valid: Tensor) -> Tensor:
    """Σ per_token over valid positions / max(#valid, 1): an empty batch gives 0 (graph kept)."""
    total = torch.where(valid, per_token, torch.zeros_like(per_token)).sum()
    return total / valid.sum().clamp_min(1).to(total.dtype)


def _opt(value: float | None, default: float) -> float:
    return default if value is None else float(value)


def reduce_token_terms(
    terms: Tensor, valid: Tensor, weights: Tensor, *, weighted_mean: bool = False
) -> Tensor:
    """A native loss from its per-token terms, as the built-ins reduce them (see `TokenTerms`).

    `terms`, `valid` and `weights` are (B, T-1), aligned with the shifted targets; `weights` is already 0
    where the target is ignored (`valid` False). ``Σ w·term / #valid`` (0 if none), or with
    `weighted_mean` ``Σ w·term / Σ w`` (0 if ``Σ w = 0``).
    """
    if not weighted_mean:
        return _mean(weights * terms, valid)
    num = (weights * terms).sum()
    den = weights.sum()
    return num / torch.where(den != 0, den, torch.ones_like(den))


def _reduce_native(
    spec_terms: TokenTerms, logits: Tensor, labels: Tensor, weights: Tensor | None, kwargs: Mapping
) -> Tensor:
    """`fn(logits, labels, weights, **kwargs)` of a built-in: its token terms on full logits, reduced."""
    z, safe, valid, w, lp = _shifted(logits, labels, weights)
    terms = spec_terms.term(z, safe, lp, **kwargs)
    return reduce_token_terms(terms, valid, w, weighted_mean=spec_terms.weighted_mean)


def _cross_entropy_term(z: Tensor, y: Tensor, lp: Tensor, **kwargs) -> Tensor:
    return -lp


def _focal_term(
    z: Tensor,
    y: Tensor,
    lp: Tensor,
    *,
    focal_alpha: float | None = 0.25,
    focal_gamma: float | None = 2.0,
    **kwargs,
) -> Tensor:
    alpha = _opt(focal_alpha, 0.25)
    gamma = _opt(focal_gamma, 2.0)
    p = lp.exp()
    return alpha * (1.0 - p).clamp_min(0.0).pow(gamma) * (-lp)


def _smooth_l1_term(
    z: Tensor, y: Tensor, lp: Tensor, *, smooth_l1_beta: float | None = 1.0, **kwargs
) -> Tensor:
    beta = _opt(smooth_l1_beta, 1.0)
    probs = torch.softmax(z, dim=-1)
    p_y = probs.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return _huber(probs, beta).sum(-1) - _huber(p_y, beta) + _huber(p_y - 1.0, beta)


def _contrastive_term(
    z: Tensor, y: Tensor, lp: Tensor, *, contrastive_margin: float | None = 1.0, **kwargs
) -> Tensor:
    margin = _opt(contrastive_margin, 1.0)
    if z.shape[-1] < 2:  # no negative: the term is 0 (with a graph, as every other term has)
        return z.sum(-1) * 0.0
    z_y = z.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    top_vals, top_idx = z.topk(2, dim=-1)
    neg = torch.where(top_idx[..., 0] == y, top_vals[..., 1], top_vals[..., 0])
    return torch.relu(margin - (z_y - neg))


CROSS_ENTROPY_TERMS = TokenTerms(_cross_entropy_term)
WEIGHTED_CROSS_ENTROPY_TERMS = TokenTerms(_cross_entropy_term, weighted_mean=True)
FOCAL_TERMS = TokenTerms(_focal_term)
SMOOTH_L1_TERMS = TokenTerms(_smooth_l1_term)
CONTRASTIVE_TERMS = TokenTerms(_contrastive_term)


def native_cross_entropy(logits: Tensor, labels: Tensor, weights: Tensor | None = None, **kwargs) -> Tensor:
    """``mean_t −log p(y_t)``; with weights, ``mean_t w_t · (−log p(y_t))``.

    The mean runs over the non-ignored shifted targets (``y_t = labels[:, t+1] != −100``), whatever the
    weights; the normalizer is the token count (`default_normalizer`).
    """
    return _reduce_native(CROSS_ENTROPY_TERMS, logits, labels, weights, kwargs)


def native_weighted_cross_entropy(
    logits: Tensor, labels: Tensor, weights: Tensor | None = None, **kwargs
) -> Tensor:
    """``Σ_t w_t · (−log p(y_t)) / Σ_t w_t`` over non-ignored shifted targets (weights default to 1).

    The normalizer is ``Σ_t w_t`` (not the token count). If ``Σ w = 0`` the loss is 0. Weights are meant
    to be non-negative; with mixed signs summing to 0 a chunk's contribution would be lost.
    """
    return _reduce_native(WEIGHTED_CROSS_ENTROPY_TERMS, logits, labels, weights, kwargs)


def native_focal_loss(logits: Tensor, labels: Tensor, weights: Tensor | None = None, **kwargs) -> Tensor:
    """Focal loss (Lin et al., 2017): ``mean_t α · (1 − p_t)^γ · (−log p_t)``, p_t = p(y_t).

    `focal_alpha` α defaults to 0.25 and `focal_gamma` γ to 2.0 (None means the default). With weights,
    each token's term is multiplied by w_t; the mean runs over non-ignored targets (count normalizer).
    """
    return _reduce_native(FOCAL_TERMS, logits, labels, weights, kwargs)


def _huber(x: Tensor, beta: float) -> Tensor:
    """PyTorch's smooth_l1: 0.5·x²/β if |x| < β else |x| − 0.5·β (plain |x| when β = 0)."""
    return F.smooth_l1_loss(x, torch.zeros_like(x), reduction="none", beta=beta)


def native_smooth_l1(logits: Tensor, labels: Tensor, weights: Tensor | None = None, **kwargs) -> Tensor:
    """``mean_t Σ_v huber_β(softmax(z_t)_v − onehot(y_t)_v)`` with PyTorch's smooth_l1 definition
    (``0.5·x²/β`` if ``|x| < β`` else ``|x| − 0.5·β``); `smooth_l1_beta` β defaults to 1.0.

    Computed without a one-hot tensor: ``Σ_v huber(p_v) − huber(p_y) + huber(p_y − 1)``. With weights,
    each token's term is multiplied by w_t; the mean runs over non-ignored targets (count normalizer).
    """
    return _reduce_native(SMOOTH_L1_TERMS, logits, labels, weights, kwargs)


def native_contrastive_loss(
    logits: Tensor, labels: Tensor, weights: Tensor | None = None, **kwargs
) -> Tensor:
    """A hinge on the target logit against the strongest negative:
    ``mean_t max(0, m − (z_{t,y} − max_{v≠y} z_{t,v}))``; `contrastive_margin` m defaults to 1.0.

    Uses raw logits (the same as log-probs here: the difference is shift-invariant). With a vocabulary of
    one there is no negative and the term is 0. With weights, each token's term is multiplied by w_t; the
    mean runs over non-ignored targets (count normalizer).
    """
    return _reduce_native(CONTRASTIVE_TERMS, logits, labels, weights, kwargs)
