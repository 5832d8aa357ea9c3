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

The package: `registry` (`LossSpec` and the registry), `native` (the native family and `TokenTerms`),
`token` (the token family); the built-ins are registered here, on import.
"""

from __future__ import annotations

from eztinker.engine.losses.native import (
    CONTRASTIVE_TERMS,
    CROSS_ENTROPY_TERMS,
    FOCAL_TERMS,
    SMOOTH_L1_TERMS,
    WEIGHTED_CROSS_ENTROPY_TERMS,
    TokenTerms,
    _weight_sum_normalizer,
    default_normalizer,
    native_contrastive_loss,
    native_cross_entropy,
    native_focal_loss,
    native_smooth_l1,
    native_weighted_cross_entropy,
    reduce_token_terms,
    shifted_target_logprobs,
)
from eztinker.engine.losses.registry import (
    LossFamily,
    LossSpec,
    _add,
    get_loss_function,
    get_loss_spec,
    list_losses,
    register_loss_function,
    unregister_loss_function,
)
from eztinker.engine.losses.token import (
    _CLIP_DEFAULTS,
    _CLIP_INPUTS,
    _IS_INPUTS,
    _RL_OPTIONAL,
    DRO_BETA,
    STABLE_REINFORCE_KL_COEFF,
    STABLE_REINFORCE_TRUNCATION_CAP,
    token_cispo,
    token_cross_entropy,
    token_dro,
    token_gspo,
    token_importance_sampling,
    token_ppo,
    token_stable_reinforce,
    weights_from_logprob_grads,
)
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
