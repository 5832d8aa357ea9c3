"""Loss functions: one registry, two families. Pure torch, no HTTP.

Two families
============
**native** — the user's original protocol (EZTinker's own API, `LossFunctionConfig(loss_type=...)`)::

    fn(logits, labels, weights=None, **kwargs) -> Tensor   # a scalar

* `logits` (B, T, V); `labels` (B, T) *aligned with the input ids*: the loss shifts them itself
  (`logits[:, :-1]` predicts `labels[:, 1:]`). `IGNORE_INDEX` (-100) marks padding/ignored positions.
* `weights` (B, T), optional, aligned with `labels`: `weights[:, 1:]` apply to the shifted targets.
* Every other `LossFunctionConfig` field arrives as a keyword argument; a loss accepts `**kwargs` and
  ignores what it does not know.
* Reduction: a **mean**. Each native loss has a `normalizer(labels, weights)` returning the scalar
  denominator of that mean (`default_normalizer`: the number of non-ignored shifted labels). When the
  engine splits a batch into chunks c it combines them as ``Σ_c loss_c · n_c / Σ_c n_c``, which equals the
  one-pass value for every built-in (tested).
* Built-ins: `cross_entropy`, `weighted_cross_entropy`, `focal_loss`, `smooth_l1`, `contrastive_loss`.
  Add more with `register_loss_function(name, fn, normalizer=...)` in the server process.
* **Token-separable form** (`TokenTerms`, long context). Every built-in is a (weighted) mean of a per-token
  term that reads one position's logits and target only. Its spec carries that term, and the engine uses
  it instead of `fn`: it computes the term from hidden states in chunks of positions (hidden → output head
  → term, recomputed in backward), so a pass never holds (B, T, V) logits, and reduces the terms exactly
  as `fn` does (`reduce_token_terms`; equal to `fn(logits, ...)` within float rounding, tested). A
  registered loss gets `fn` with full logits — the contract — unless it is registered with
  ``token_terms=TokenTerms(...)``; a loss that needs the whole sequence (or all of the vocabulary at
  once across positions) must keep full logits, at a memory cost of B·T·V floats.

**token** — Tinker's token-level losses (`forward_backward(data, loss_fn=...)` through the Tinker facade)::

    fn(logprobs, inputs, mask, **config) -> Tensor   # per-datum loss, shape (B,)

* `logprobs` (B, T) — the learner's log-probabilities of `target_tokens` (targets are already shifted:
  `target_tokens[i]` is predicted at position i), or (B, T, K) for top-K `cross_entropy`; with autograd.
* `inputs`: every `loss_fn_input` except `target_tokens`, padded to `logprobs`' shape with zeros.
  **`inputs["logprobs"]` is the sampler's q, not the learner's.**
* `mask` (B, T) bool, True on real positions. Every built-in masks explicitly, so padding contributes
  nothing to the value or the gradient even if a padded input is not zero.
* Reduction: a **sum** over tokens (never a mean), as Tinker documents: "for all objectives we sum the
  token-level losses over the sequence length". The loss of a batch is the sum of its datums' losses, so
  chunks combine by plain addition. Mean-normalised variants (as in skyrl-tx or hatchery) change the
  gradient scale and break `forward_backward_custom`, which relies on ``cross_entropy = -Σ w·lp``.
* Scalar hyper-parameters come from `loss_fn_config`; `LossSpec.resolve_config` merges a spec's
  `config_defaults` and rejects unknown keys (`InvalidInputError(field="loss_fn_config.<key>")`).

Notation below: lp = learner log-prob, q = sampler log-prob (`inputs["logprobs"]`), A = advantages,
r = exp(lp − q), sg = stop-gradient (`detach`), clip(x, lo, hi) = min(max(x, lo), hi).

Sources for the token family (read while writing this module)
-------------------------------------------------------------
* tinker-cookbook `docs/losses.mdx` (commit a2b1b820) and https://tinker-docs.thinkingmachines.ai/losses:
  the cross_entropy / importance_sampling / ppo / cispo / dro formulas and code, the SUM reduction,
  "ε_low and ε_high ... currently fixed to 0.2 in Tinker" with `clip_low_threshold`/`clip_high_threshold`
  overridable in `loss_fn_config` (examples use 0.9/1.1 and 0.8/1.2), DRO's `beta` (example value 0.05,
  no documented default), and the `forward_backward_custom` surrogate (``Σ lp · dC/dlp``).
* https://tinker-docs.thinkingmachines.ai/tinker/losses/cross-entropy: (N, K) targets and weights,
  ``L = −Σ_t Σ_k w_{t,k} log p(x_{t,k})`` (top-K / soft-target distillation).
* https://tinker-docs.thinkingmachines.ai/tinker/losses/gspo: GSPO-token with `sequence_ratio_mask`.
* https://tinker-docs.thinkingmachines.ai/tinker/losses/stable-reinforce: StableReinforce is alpha and
  needs sampling-time "stability info" (`record_stability_info=True`, provenance spans); the objective
  itself is not published, so `stable_reinforce` here is EZTinker's own definition (see its docstring).
* tinker SDK `types/datum.py`: `clip_low_threshold`, `clip_high_threshold` are float per-token loss inputs;
  `TrainingClient.forward_backward_custom` sends `weights = -grad` (see `weights_from_logprob_grads`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from eztinker.engine.errors import InvalidInputError, UnknownLossError
from eztinker.engine.types import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "LossFamily",
    "LossSpec",
    "TokenTerms",
    "default_normalizer",
    "get_loss_function",
    "get_loss_spec",
    "list_losses",
    "reduce_token_terms",
    "register_loss_function",
    "shifted_target_logprobs",
    "unregister_loss_function",
    "weights_from_logprob_grads",
]

LossFamily = Literal["native", "token"]
Normalizer = Callable[[Tensor, Tensor | None], Tensor]
_FAMILIES: tuple[LossFamily, ...] = ("native", "token")
_FAMILY_FIELD = {"native": "loss_type", "token": "loss_fn"}


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


@dataclass(frozen=True)
class LossSpec:
    """A registered loss.

    * `required_inputs` / `optional_inputs` (token family): keys of `Datum.loss_inputs` beyond
      `target_tokens` that must / may be present. The engine validates presence, shape and finiteness.
    * `config_defaults` (token family): the scalar `loss_fn_config` keys the loss reads, with defaults.
    * `normalizer` (native family): ``normalizer(labels, weights)`` → the scalar denominator of the loss's
      mean; None means `default_normalizer`.
    * `supports_topk` (token family): True when (N, K) `target_tokens` are allowed (only `cross_entropy`).
    * `token_terms` (native family): the loss in token-separable form (`TokenTerms`), so the engine can
      compute it in chunks from hidden states; None: the engine calls `fn` on full (B, T, V) logits.
    """

    name: str
    family: LossFamily
    fn: Callable[..., Tensor]
    required_inputs: tuple[str, ...] = ()
    optional_inputs: tuple[str, ...] = ()
    config_defaults: Mapping[str, float] = field(default_factory=dict)
    normalizer: Normalizer | None = None
    supports_topk: bool = False
    token_terms: TokenTerms | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "config_defaults", MappingProxyType(dict(self.config_defaults)))

    @property
    def input_names(self) -> tuple[str, ...]:
        """Every loss input this spec reads (required first)."""
        return self.required_inputs + self.optional_inputs

    def normalize(self, labels: Tensor, weights: Tensor | None = None) -> Tensor:
        """The denominator of a native loss's mean for this batch (see the module docstring)."""
        return (self.normalizer or default_normalizer)(labels, weights)

    def resolve_config(self, config: Mapping[str, float] | None = None) -> dict[str, float]:
        """`config_defaults` overridden by `config`.

        Token family: an unknown key, a non-numeric or non-finite value, or a clip range with
        ``clip_low_threshold > clip_high_threshold`` raises `InvalidInputError(field="loss_fn_config.<key>")`.
        Native family: the config is passed through unchanged (native losses take `**kwargs` and ignore
        what they do not know).
        """
        config = dict(config or {})
        if self.family == "native":
            return {**self.config_defaults, **config}
        resolved = dict(self.config_defaults)
        for key, value in config.items():
            fld = f"loss_fn_config.{key}"
            if key not in self.config_defaults:
                known = ", ".join(sorted(self.config_defaults)) or "none"
                raise InvalidInputError(
                    fld, f"loss_fn {self.name!r} does not take config key {key!r} (it takes: {known})"
                )
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInputError(fld, f"must be a number, got {type(value).__name__} {value!r}")
            if not math.isfinite(value):
                raise InvalidInputError(fld, f"must be finite, got {value!r}")
            resolved[key] = float(value)
        lo, hi = resolved.get("clip_low_threshold"), resolved.get("clip_high_threshold")
        if lo is not None and hi is not None and lo > hi:
            raise InvalidInputError(
                "loss_fn_config.clip_low_threshold",
                f"clip_low_threshold ({lo}) must not exceed clip_high_threshold ({hi})",
            )
        return resolved


# ----------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------

_REGISTRY: dict[LossFamily, dict[str, LossSpec]] = {"native": {}, "token": {}}
_LOCK = threading.Lock()


def _add(spec: LossSpec) -> None:
    with _LOCK:
        _REGISTRY[spec.family][spec.name] = spec


def _check_family(family: str) -> LossFamily:
    if family not in _FAMILIES:
        raise ValueError(f"loss family must be one of {_FAMILIES}, got {family!r}")
    return family


def register_loss_function(
    name: str,
    fn: Callable[..., Tensor],
    *,
    normalizer: Normalizer | None = None,
    token_terms: TokenTerms | None = None,
) -> None:
    """Register a native-family loss ``fn(logits, labels, weights=None, **kwargs) -> scalar Tensor``.

    Re-registering a name replaces the previous loss (built-ins included). `normalizer(labels, weights)`
    must return the denominator of `fn`'s mean so that chunked batches combine exactly; the default is
    `default_normalizer` (the number of non-ignored shifted labels). A loss that is not a mean over tokens
    still works on a batch computed in one pass.

    `fn` receives full (B, T, V) logits, so on long sequences it costs B·T·V floats of memory (and their
    gradient). A loss that is a (weighted) mean of per-token terms may also pass `token_terms`
    (`TokenTerms`): the engine then computes it in chunks without full logits, and `fn` must give the
    same value (it is still what a direct call runs).

    Example (the seed spec's)::

        def my_custom_loss(logits, labels, weights=None, *, temperature=1.0, **kwargs):
            shift_logits = logits[:, :-1, :].contiguous() / temperature
            shift_labels = labels[:, 1:].contiguous()
            return F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1),
                                   ignore_index=kwargs.get("ignore_index", -100))

        register_loss_function("temperature_scaled", my_custom_loss)
    """
    if not isinstance(name, str):
        raise TypeError(f"loss name must be a str, got {type(name).__name__}")
    if not name.strip():
        raise ValueError("loss name must be a non-empty string")
    if not callable(fn):
        raise TypeError(f"loss function for {name!r} must be callable, got {type(fn).__name__}")
    if normalizer is not None and not callable(normalizer):
        raise TypeError(f"normalizer for {name!r} must be callable or None, got {type(normalizer).__name__}")
    if token_terms is not None and not isinstance(token_terms, TokenTerms):
        raise TypeError(
            f"token_terms for {name!r} must be a TokenTerms or None, got {type(token_terms).__name__}"
        )
    _add(LossSpec(name=name, family="native", fn=fn, normalizer=normalizer, token_terms=token_terms))


def unregister_loss_function(name: str) -> None:
    """Remove a native-family loss (raises `UnknownLossError` if there is none by that name)."""
    with _LOCK:
        if name in _REGISTRY["native"]:
            del _REGISTRY["native"][name]
            return
    raise _unknown(name, "native")


def get_loss_function(name: str) -> Callable[..., Tensor]:
    """The native-family loss registered under `name` (raises `UnknownLossError`)."""
    return get_loss_spec(name, "native").fn


def get_loss_spec(name: str, family: LossFamily) -> LossSpec:
    """The spec of loss `name` in `family`.

    Raises `UnknownLossError` (field "loss_type" for native, "loss_fn" for token) that lists the known names.
    """
    fam = _check_family(family)
    spec = _REGISTRY[fam].get(name)
    if spec is None:
        raise _unknown(name, fam)
    return spec


def list_losses(family: LossFamily | None = None) -> list[str]:
    """Sorted loss names of one family, or of both (each name once) when `family` is None."""
    if family is not None:
        return sorted(_REGISTRY[_check_family(family)])
    return sorted(set(_REGISTRY["native"]) | set(_REGISTRY["token"]))


def _unknown(name: object, family: LossFamily) -> UnknownLossError:
    known = ", ".join(sorted(_REGISTRY[family])) or "none"
    if family == "native":
        msg = (
            f"unknown loss {name!r}; known native losses: {known}. To add one, call "
            "eztinker.engine.register_loss_function(name, fn) in the server process "
            "(e.g. from a server plugin module)"
        )
        if isinstance(name, str) and name in _REGISTRY["token"]:
            msg += f". ({name!r} is a Tinker token-level loss: use it through the Tinker API as loss_fn)"
    else:
        msg = f"unknown loss_fn {name!r}; known Tinker losses: {known}"
        if isinstance(name, str) and name in _REGISTRY["native"]:
            msg += f". ({name!r} is a native EZTinker loss: use it through the native API as loss_type)"
    return UnknownLossError(_FAMILY_FIELD[family], msg)


# ----------------------------------------------------------------------------------------------------
# Native family
# ----------------------------------------------------------------------------------------------------


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


def native_focal_loss(
    logits: Tensor,
    labels: Tensor,
    weights: Tensor | None = None,
    *,
    focal_alpha: float | None = 0.25,
    focal_gamma: float | None = 2.0,
    **kwargs,
) -> Tensor:
    """Focal loss (Lin et al., 2017): ``mean_t α · (1 − p_t)^γ · (−log p_t)``, p_t = p(y_t).

    `focal_alpha` α defaults to 0.25 and `focal_gamma` γ to 2.0 (None means the default). With weights,
    each token's term is multiplied by w_t; the mean runs over non-ignored targets (count normalizer).
    """
    config = {"focal_alpha": focal_alpha, "focal_gamma": focal_gamma}
    return _reduce_native(FOCAL_TERMS, logits, labels, weights, config)


def _huber(x: Tensor, beta: float) -> Tensor:
    """PyTorch's smooth_l1: 0.5·x²/β if |x| < β else |x| − 0.5·β (plain |x| when β = 0)."""
    return F.smooth_l1_loss(x, torch.zeros_like(x), reduction="none", beta=beta)


def native_smooth_l1(
    logits: Tensor,
    labels: Tensor,
    weights: Tensor | None = None,
    *,
    smooth_l1_beta: float | None = 1.0,
    **kwargs,
) -> Tensor:
    """``mean_t Σ_v huber_β(softmax(z_t)_v − onehot(y_t)_v)`` with PyTorch's smooth_l1 definition
    (``0.5·x²/β`` if ``|x| < β`` else ``|x| − 0.5·β``); `smooth_l1_beta` β defaults to 1.0.

    Computed without a one-hot tensor: ``Σ_v huber(p_v) − huber(p_y) + huber(p_y − 1)``. With weights,
    each token's term is multiplied by w_t; the mean runs over non-ignored targets (count normalizer).
    """
    return _reduce_native(SMOOTH_L1_TERMS, logits, labels, weights, {"smooth_l1_beta": smooth_l1_beta})


def native_contrastive_loss(
    logits: Tensor,
    labels: Tensor,
    weights: Tensor | None = None,
    *,
    contrastive_margin: float | None = 1.0,
    **kwargs,
) -> Tensor:
    """A hinge on the target logit against the strongest negative:
    ``mean_t max(0, m − (z_{t,y} − max_{v≠y} z_{t,v}))``; `contrastive_margin` m defaults to 1.0.

    Uses raw logits (the same as log-probs here: the difference is shift-invariant). With a vocabulary of
    one there is no negative and the term is 0. With weights, each token's term is multiplied by w_t; the
    mean runs over non-ignored targets (count normalizer).
    """
    config = {"contrastive_margin": contrastive_margin}
    return _reduce_native(CONTRASTIVE_TERMS, logits, labels, weights, config)


# ----------------------------------------------------------------------------------------------------
# Token family (Tinker)
# ----------------------------------------------------------------------------------------------------

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
    inputs: Mapping[str, Tensor], lp: Tensor, low: float, high: float
) -> tuple[Tensor | float, Tensor | float]:
    """Per-token threshold tensors from `inputs` take precedence over the scalar config values."""
    lo: Tensor | float = inputs["clip_low_threshold"].to(lp.dtype) if "clip_low_threshold" in inputs else low
    hi: Tensor | float = (
        inputs["clip_high_threshold"].to(lp.dtype) if "clip_high_threshold" in inputs else high
    )
    return lo, hi


def _clip(x: Tensor, lo: Tensor | float, hi: Tensor | float) -> Tensor:
    lo_t = torch.as_tensor(lo, dtype=x.dtype, device=x.device)
    hi_t = torch.as_tensor(hi, dtype=x.dtype, device=x.device)
    return torch.minimum(torch.maximum(x, lo_t), hi_t)


def _per_datum(terms: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, terms, torch.zeros_like(terms)).sum(dim=-1)


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


def token_ppo(
    logprobs: Tensor,
    inputs: Mapping[str, Tensor],
    mask: Tensor,
    *,
    clip_low_threshold: float = PPO_CLIP_LOW,
    clip_high_threshold: float = PPO_CLIP_HIGH,
    **config: float,
) -> Tensor:
    """PPO-clip, token-wise: ``loss_b = Σ_t −min(r_t·A_t, clip(r_t, lo, hi)·A_t)``.

    lo/hi are `clip_low_threshold` (0.8) and `clip_high_threshold` (1.2), i.e. ε = 0.2 as documented;
    per-token tensors of those names in `inputs` take precedence over the config values.
    """
    mask, lp, q, adv = _rl_terms(logprobs, inputs, mask, "ppo")
    lo, hi = _clip_bounds(inputs, lp, clip_low_threshold, clip_high_threshold)
    ratio = torch.exp(lp - q)
    objective = torch.minimum(ratio * adv, _clip(ratio, lo, hi) * adv)
    return _per_datum(-objective, mask)


def token_cispo(
    logprobs: Tensor,
    inputs: Mapping[str, Tensor],
    mask: Tensor,
    *,
    clip_low_threshold: float = PPO_CLIP_LOW,
    clip_high_threshold: float = PPO_CLIP_HIGH,
    **config: float,
) -> Tensor:
    """CISPO (MiniMax-M1): ``loss_b = Σ_t −sg(clip(r_t, lo, hi)) · lp_t · A_t``.

    Same thresholds as `ppo` (config or per-token inputs). Gradient per token: ``−clip(r_t, lo, hi)·A_t``.
    """
    mask, lp, q, adv = _rl_terms(logprobs, inputs, mask, "cispo")
    lo, hi = _clip_bounds(inputs, lp, clip_low_threshold, clip_high_threshold)
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


def token_gspo(
    logprobs: Tensor,
    inputs: Mapping[str, Tensor],
    mask: Tensor,
    *,
    clip_low_threshold: float = PPO_CLIP_LOW,
    clip_high_threshold: float = PPO_CLIP_HIGH,
    **config: float,
) -> Tensor:
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
    lo, hi = _clip_bounds(inputs, lp, clip_low_threshold, clip_high_threshold)
    objective = torch.minimum(ratio * adv, _clip(ratio, lo, hi) * adv)
    return _per_datum(-objective, mask)


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


# ----------------------------------------------------------------------------------------------------
# Built-ins
# ----------------------------------------------------------------------------------------------------

for _name, _fn, _norm, _terms in (
    ("cross_entropy", native_cross_entropy, None, CROSS_ENTROPY_TERMS),
    (
        "weighted_cross_entropy",
        native_weighted_cross_entropy,
        _weight_sum_normalizer,
        WEIGHTED_CROSS_ENTROPY_TERMS,
    ),
    ("focal_loss", native_focal_loss, None, FOCAL_TERMS),
    ("smooth_l1", native_smooth_l1, None, SMOOTH_L1_TERMS),
    ("contrastive_loss", native_contrastive_loss, None, CONTRASTIVE_TERMS),
):
    register_loss_function(_name, _fn, normalizer=_norm, token_terms=_terms)

_add(
    LossSpec("cross_entropy", "token", token_cross_entropy, optional_inputs=("weights",), supports_topk=True)
)
_add(LossSpec("importance_sampling", "token", token_importance_sampling, _IS_INPUTS, _RL_OPTIONAL))
_add(LossSpec("ppo", "token", token_ppo, _IS_INPUTS, _CLIP_INPUTS + _RL_OPTIONAL, _CLIP_DEFAULTS))
_add(LossSpec("cispo", "token", token_cispo, _IS_INPUTS, _CLIP_INPUTS + _RL_OPTIONAL, _CLIP_DEFAULTS))
_add(LossSpec("dro", "token", token_dro, _IS_INPUTS, _RL_OPTIONAL, {"beta": DRO_BETA}))
_add(
    LossSpec(
        "gspo",
        "token",
        token_gspo,
        _IS_INPUTS,
        ("sequence_ratio_mask", *_CLIP_INPUTS, *_RL_OPTIONAL),
        _CLIP_DEFAULTS,
    )
)
_add(
    LossSpec(
        "stable_reinforce",
        "token",
        token_stable_reinforce,
        _IS_INPUTS,
        _RL_OPTIONAL,
        {"kl_coeff": STABLE_REINFORCE_KL_COEFF, "truncation_cap": STABLE_REINFORCE_TRUNCATION_CAP},
    )
)
