"""Checking a native loss config's parameters when it is given, not when the loss first runs.

Every `LossFunctionConfig` field beyond `loss_type` reaches the loss function as a keyword argument
(`eztinker.engine.losses`). A value of the wrong type (`focal_gamma="x"`) would only fail inside the loss,
as a TypeError on every later `forward_backward` of the run; so the config is checked against the loss's
signature when the run is created (or the op names the config), and refused as
`InvalidInputError("loss_config.<field>")`:

- a parameter the loss declares with a default takes that default's type (a float default: any finite
  number; an int default: an integer; a bool, a str: the same), and None where the default is None or
  the annotation says `| None`;
- a name the loss does not declare is refused for the built-in losses (they read nothing else: it is a
  typo), and passed through to a registered loss that takes `**kwargs` (it may read it from there).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

from eztinker.engine.errors import InvalidInputError, UnknownLossError
from eztinker.engine.losses import get_loss_spec
from eztinker.models import LossFunctionConfig

_BUILT_IN_MODULE = "eztinker.engine.losses.native"
_POSITIONAL = 3  # fn(logits, labels, weights) / term(z, y, lp): never config


def check_loss_config(config: LossFunctionConfig, field: str = "loss_config") -> None:
    """Refuse a parameter of `config` its loss cannot take (see the module docstring)."""
    try:
        spec = get_loss_spec(config.loss_type, "native")
    except UnknownLossError:
        return  # the engine refuses the name itself (or knows a loss only its workers' plugins add)
    functions = [spec.fn] + ([spec.token_terms.term] if spec.token_terms is not None else [])
    declared: dict[str, inspect.Parameter] = {}
    takes_any = False
    for fn in functions:
        parameters, var_keyword = _keyword_parameters(fn)
        declared = {**parameters, **declared}
        takes_any = takes_any or var_keyword
    built_in = getattr(spec.fn, "__module__", None) == _BUILT_IN_MODULE
    for name, value in config.params.items():
        parameter = declared.get(name)
        if parameter is None:
            if built_in or not takes_any:
                known = ", ".join(sorted(declared)) or "none"
                raise InvalidInputError(
                    f"{field}.{name}",
                    f"loss {config.loss_type!r} takes no parameter {name!r} (it takes: {known})",
                )
            continue
        _check_value(f"{field}.{name}", parameter, value)


def _keyword_parameters(fn: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool]:
    """`fn`'s parameters a config may set (all but its first three), and whether it takes `**kwargs`."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a callable without a signature: nothing to check against
        return {}, True
    named: dict[str, inspect.Parameter] = {}
    positional = 0
    var_keyword = False
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        elif parameter.kind is not inspect.Parameter.KEYWORD_ONLY and positional < _POSITIONAL:
            positional += 1
        else:
            named[parameter.name] = parameter
    return named, var_keyword


def _check_value(field: str, parameter: inspect.Parameter, value: Any) -> None:
    """`value` must be of the type of `parameter`'s default (see the module docstring)."""
    default = parameter.default
    annotation = parameter.annotation if isinstance(parameter.annotation, str) else repr(parameter.annotation)
    if value is None:
        if default is None or default is inspect.Parameter.empty or "None" in annotation:
            return
        raise InvalidInputError(field, f"must be {_kind(default)}, not null")
    if default is None or default is inspect.Parameter.empty:
        if "float" in annotation or "int" in annotation:
            _check_number(field, value, integer="float" not in annotation)
        return
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InvalidInputError(field, f"must be true or false, got {value!r}")
    elif isinstance(default, int | float):
        _check_number(field, value, integer=isinstance(default, int))
    elif isinstance(default, str) and not isinstance(value, str):
        raise InvalidInputError(field, f"must be a string, got {value!r}")


def _check_number(field: str, value: Any, *, integer: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInputError(field, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidInputError(field, f"must be finite, got {value!r}")
    if integer and not (isinstance(value, int) or value.is_integer()):
        raise InvalidInputError(field, f"must be an integer, got {value!r}")


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int | float):
        return "a number"
    return "a string" if isinstance(default, str) else "a value"
