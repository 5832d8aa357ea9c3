"""The token family (Tinker's): losses over the target tokens' log-probabilities and per-token inputs
(cross-entropy, importance sampling, PPO, CISPO, DRO, GSPO, stable REINFORCE)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from eztinker.engine.errors import InvalidInputError

PPO_CLIP_LOW = 0.8  # 1 − ε_low, ε = 0.2 ("currently fixed to 0.2 in Tinker", docs/losses.mdx)
PPO_CLIP_HIGH = 1.2  # 1 + ε_high
DRO_BETA = 0.05  # no documented default; the docs' example passes {"beta": 0.05}
STABLE_REINFORCE_KL_COEFF = 0.0
STABLE_REINFORCE_TRUNCATION_CAP = 2.0  # TIS-style cap (truncated importance sampling, C = 2)

_CLIP_DEFAULTS = {"clip_low_threshold": PPO_CLIP_LOW, "clip_high_threshold": PPO_CLIP_HIGH}
_IS_INPUTS = ("logprobs", "advantages")
_CLIP_INPUTS = ("clip_low_threshold", "clip_high_threshold")
# Tinker's own docs build RL datums with a `weights` key too; the RL objectives do not read it.
_RL_OPTIONAL = ("weights",)


def _real(x: Tensor, mask: Tensor) -> Tensor:
    """x with every padding position set to 0 (so no NaN/inf from padding reaches value or gradient)."""
    return x.masked_fill(~mask, 0)


def _rl_terms(
    logprobs: Tensor, inputs: Mapping[str, Tensor], mask: Tensor, name: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mask, lp, q, A) for an importance-sampling-family loss, every one zero at padding."""
    if logprobs.dim() != 2:
        raise InvalidInputError(
            "loss_fn_inputs.target_tokens", f"{name} takes (N,) targets; only cross_entropy takes (N, K)"
        )
    mask = mask.to(torch.bool)
    lp = _real(logprobs, mask)
    q = _real(inputs["logprobs"].to(lp.dtype), mask)
    adv = _real(inputs["advantages"].to(lp.dtype), mask)
    return mask, lp, q, adv


def _clip_bounds(
    inputs: Mapping[str, Tensor], lp: Tensor, config: Mapping[str, float]
) -> tuple[Tensor | float, Tensor | float]:
    """The PPO thresholds (lo, hi) of `ppo`, `cispo` and `gspo`: per-token tensors named
    `clip_low_threshold` / `clip_high_threshold` in `inputs` take precedence over the config values of
    those names (default 0.8 / 1.2, ε = 0.2)."""

    def threshold(name: str) -> Tensor | float:
        return inputs[name].to(lp.dtype) if name in inputs else config.get(name, _CLIP_DEFAULTS[name])

    return threshold("clip_low_threshold"), threshold("clip_high_threshold")


def _clip(x: Tensor, lo: Tensor | float, hi: Tensor | float) -> Tensor:
    lo_t = torch.as_tensor(lo, dtype=x.dtype, device=x.device)
    hi_t = torch.as_tensor(hi, dtype=x.dtype, device=x.device)
    return torch.minimum(torch.maximum(x, lo_t), hi_t)


def _per_datum(terms: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, terms, torch.zeros_like(terms)).sum(dim=-1)


def _clipped_surrogate(
    ratio: Tensor, adv: Tensor, mask: Tensor, lo: Tensor | float, hi: Tensor | float
) -> Tensor:
    """PPO's clipped objective, negated and summed per datum: ``Σ_t −min(r_t·A_t, clip(r_t, lo, hi)·A_t)``."""
    return _per_datum(-torch.minimum(ratio * adv, _clip(ratio, lo, hi) * adv), mask)


def token_cross_entropy(
    logprobs: Tensor, inputs: Mapping[str, Tensor], mask: Tensor, **config: float
) -> Tensor:
    """``loss_b = Σ_t −w_t · lp_t`` — or ``Σ_t Σ_k −w_{t,k} · lp_{t,k}`` for (N, K) targets.

    `weights` is optional (default 1 on every real position). This is also the `forward_backward_custom`
    surrogate: its gradient is ``d loss / d lp = −w``, so ``w = −dC/dlp`` reproduces any custom loss C's
    gradient (see `weights_from_logprob_grads`).
    """
    mask = mask.to(torch.bool)
    m = mask.unsqueeze(-1).expand_as(logprobs) if logprobs.dim() == mask.dim() + 1 else mask
    lp = _real(logprobs, m)
    if "weights" in inputs:
        w = inputs["weights"].to(lp.dtype)
        if w.dim() == lp.dim() - 1:  # (N,) weights with (N, K) targets: one weight per position
            w = w.unsqueeze(-1).expand_as(lp)
        w = _real(w, m)
    else:
        w = m.to(lp.dtype)
    terms = torch.where(m, -w * lp, torch.zeros_like(lp))
    return terms.reshape(terms.shape[0], -1).sum(dim=-1)


def token_importance_sampling(
    logprobs: Tensor, inputs: Mapping[str, Tensor], mask: Tensor, **config: float
) -> Tensor:
    """REINFORCE with an importance-sampling correction: ``loss_b = Σ_t −r_t · A_t``, r = exp(lp − q).

    Gradient per token: ``d loss / d lp_t = −r_t · A_t``.
    """
    mask, lp, q, adv = _rl_terms(logprobs, inputs, mask, "importance_sampling")
    ratio = torch.exp(lp - q)
    return _per_datum(-ratio * adv, mask)


def token_ppo(logprobs: Tensor, inputs: Mapping[str, Tensor], mask: Tensor, **config: float) -> Tensor:
    """PPO-clip, token-wise: ``loss_b = Σ_t −min(r_t·A_t, clip(r_t, lo, hi)·A_t)``.

    lo/hi are `clip_low_threshold` (0.8) and `clip_high_threshold` (1.2), i.e. ε = 0.2 as documented;
    per-token tensors of those names in `inputs` take precedence over the config values.
    """
    mask, lp, q, adv = _rl_terms(logprobs, inputs, mask, "ppo")
    lo, hi = _clip_bounds(inputs, lp, config)
    return _clipped_surrogate(torch.exp(lp - q), adv, mask, lo, hi)


def token_cispo(logprobs: Tensor, inputs: Mapping[str, Tensor], mask: Tensor, **config: float) -> Tensor:
    """CISPO (MiniMax-M1): ``loss_b = Σ_t −sg(clip(r_t, lo, hi)) · lp_t · A_t``.

    Same thresholds as `ppo` (config or per-token inputs). Gradient per token: ``−clip(r_t, lo, hi)·A_t``.
    """
    mask, lp, q, adv = _rl_terms(logprobs, inputs, mask, "cispo")
    lo, hi = _clip_bounds(inputs, lp, config)
    coeff = _clip(torch.exp(lp - q), lo, hi).detach()
    return _per_datum(-coeff * lp * adv, mask)


def token_dro(
    logprobs: Tensor, inputs: Mapping[str, Tensor], mask: Tensor, *, beta: float = DRO_BETA, **config: float
) -> Tensor:
    """Direct Reward Optimization: ``loss_b = Σ_t −(lp_t·A_t − ½·β·(lp_t − q_t)²)``.

    `beta` β: Tinker documents no default (its example passes 0.05); EZTinker uses 0.05.
    Gradient per token: ``−A_t + β·(lp_t − q_t)``.
    """
    mask, lp, q, adv = _rl_terms(logprobs, inputs, mask, "dro")
    objective = lp * adv - 0.5 * beta * (lp - q) ** 2
    return _per_datum(-objective, mask)


def token_gspo(logprobs: Tensor, inputs: Mapping[str, Tensor], mask: Tensor, **config: float) -> Tensor:
    """GSPO-token (Zheng et al., 2025), as tinker-docs' GSPO page defines it.

    * M = real positions where `sequence_ratio_mask` ≠ 0 (default: every real position); |M| = 0 gives
      a log-ratio of 0.
    * Sequence ratio ``s = exp(mean_{t∈M} (lp_t − q_t))`` (the geometric mean of token ratios).
    * Each token carries s's value with its own log-prob's gradient:
      ``s_t = sg(s) · exp(lp_t − sg(lp_t))`` (value s, ``d s_t / d lp_t = s``).
    * ``loss_b = Σ_t −min(s_t·A_t, clip(s_t, lo, hi)·A_t)`` over every real position, with the PPO
      thresholds (config or per-token inputs; defaults 0.8/1.2 — the GSPO paper itself used much tighter
      ranges, 3e-4/4e-4, so pass them explicitly to reproduce it).
    """
    mask, lp, q, adv = _rl_terms(logprobs, inputs, mask, "gspo")
    in_ratio = mask
    if "sequence_ratio_mask" in inputs:
        in_ratio = mask & (inputs["sequence_ratio_mask"] != 0)
    count = in_ratio.sum(dim=-1).clamp_min(1).to(lp.dtype)
    log_ratio = torch.where(in_ratio, lp.detach() - q, torch.zeros_like(lp)).sum(dim=-1) / count
    ratio = torch.exp(log_ratio.unsqueeze(-1) + lp - lp.detach())
    lo, hi = _clip_bounds(inputs, lp, config)
    return _clipped_surrogate(ratio, adv, mask, lo, hi)


def token_stable_reinforce(
    logprobs: Tensor,
    inputs: Mapping[str, Tensor],
    mask: Tensor,
    *,
    kl_coeff: float = STABLE_REINFORCE_KL_COEFF,
    truncation_cap: float = STABLE_REINFORCE_TRUNCATION_CAP,
    **config: float,
) -> Tensor:
    """**EZTinker's definition** of `stable_reinforce` — not Tinker's, whose objective is unpublished.

    Tinker's StableReinforce (alpha) relies on sampling-time "stability info" (`record_stability_info=True`
    plus provenance spans naming `sequence_id`s) that is not public; EZTinker ignores provenance spans and
    implements truncated-importance-sampling REINFORCE with an optional quadratic trust term:

        ``loss_b = Σ_t −sg(min(r_t, c)) · lp_t · A_t + kl_coeff · Σ_t ½ (lp_t − q_t)²``

    with c = `truncation_cap` (default 2.0, the cap used by truncated importance sampling, TIS) and
    `kl_coeff` (default 0.0). Gradient per token: ``−min(r_t, c)·A_t + kl_coeff·(lp_t − q_t)`` — the IS
    gradient with the ratio truncated, so stale or numerically mismatched samples cannot blow it up.
    """
    mask, lp, q, adv = _rl_terms(logprobs, inputs, mask, "stable_reinforce")
    coeff = torch.clamp(torch.exp(lp - q), max=truncation_cap).detach()
    terms = -coeff * lp * adv + kl_coeff * 0.5 * (lp - q) ** 2
    return _per_datum(terms, mask)


def weights_from_logprob_grads(grads: Tensor) -> Tensor:
    """`cross_entropy` weights that reproduce a custom loss's gradient: ``w = −dC/dlp``.

    Tinker's `forward_backward_custom` computes C on the client from the logprobs of a forward pass and
    sends ``weights = −dC/dlp`` with `cross_entropy`. Because ``d/dlp Σ −w·lp = −w``, the server's
    backward then produces exactly ``dC/dθ``. Works for any shape ((N,), (N, K), batched).
    """
    return -grads
