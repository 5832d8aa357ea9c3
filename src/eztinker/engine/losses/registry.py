"""What a loss is (`LossSpec`, and a native loss's per-token terms `TokenTerms`) and the registry of
losses by family and name."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, cast

from torch import Tensor

from eztinker.engine.errors import InvalidInputError, UnknownLossError
from eztinker.engine.losses.native import TokenTerms, default_normalizer

LossFamily = Literal["native", "token"]
Normalizer = Callable[[Tensor, Tensor | None], Tensor]
_FAMILIES: tuple[LossFamily, ...] = ("native", "token")
_FAMILY_FIELD = {"native": "loss_type", "token": "loss_fn"}


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

    A token-family `fn` returns the per-datum losses (B,), or ``((B,) losses, {key: (B,) values})`` when
    the loss reports metrics of its own (an uploaded custom loss does).
    """

    name: str
    family: LossFamily
    fn: Callable[..., Tensor | tuple[Tensor, Mapping[str, Tensor]]]
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
    return cast(Callable[..., Tensor], get_loss_spec(name, "native").fn)  # native losses return a scalar


def get_loss_spec(name: str, family: LossFamily) -> LossSpec:
    """The spec of loss `name` in `family`.

    Raises `UnknownLossError` (field "loss_type" for native, "loss_fn" for token) that lists the known names.
    """
    fam = _check_family(family)
    spec = _REGISTRY[fam].get(name)
    if spec is None:
        raise _unknown(name, fam)
    return spec


# Losses one key uploaded (`eztinker.service.custom_loss`) are registered under this prefix. Only their owner
# reaches them, through their handle, so they are never listed nor named in an unknown-loss message.
PRIVATE_PREFIX = "custom/"


def _listed(names: Iterable[str]) -> list[str]:
    return sorted(name for name in names if not name.startswith(PRIVATE_PREFIX))


def list_losses(family: LossFamily | None = None) -> list[str]:
    """Sorted loss names of one family, or of both (each name once) when `family` is None; uploaded
    per-key losses are not listed."""
    if family is not None:
        return _listed(_REGISTRY[_check_family(family)])
    return _listed(set(_REGISTRY["native"]) | set(_REGISTRY["token"]))


def _unknown(name: object, family: LossFamily) -> UnknownLossError:
    known = ", ".join(_listed(_REGISTRY[family])) or "none"
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
