"""Server-side custom losses: a traced loss graph (the SDK's `create_custom_loss` upload) checked against
an allow-list and evaluated node by node. No HTTP here.

The upload is plain data (tinker SDK 0.38 `types.CustomLossGraph`): ``{"format": 1, "nodes": [{op, name,
target, args, kwargs}]}`` in execution order, arguments encoded as JSON scalars and lists or one-key
objects (``{"ref": node}``, ``{"tuple": [...]}``, ``{"dict": {...}}``, ``{"slice": [a, b, c]}``,
``{"ellipsis": true}``, ``{"float": "inf"}``, ``{"dtype": "float32"}``, ``{"device": "cpu"}``,
``{"layout": ...}``, ``{"memory_format": ...}``).

Safety: nothing the client sends is unpickled, imported or executed as Python. A target is only ever a
key into the tables below; a graph naming anything else is refused (`InvalidInputError`) with the node's
name and target, e.g. ``node 'system' calls os.system, which is not allowed``.

The allow-list
==============
* ``placeholder``: the loss's parameters, in order (``logprobs`` first, then its `loss_fn_inputs`).
* ``call_function``: `ALLOWED_FUNCTIONS` — elementwise and reduction torch functions (``torch.exp``,
  ``torch.log``, ``torch.sum``, ``torch.mean``, ``torch.where``, ``torch.clamp``, ``torch.gather``,
  ``torch.log_softmax``, ``torch.logsumexp``, ...), a few of ``torch.nn.functional``, ``math``'s scalar
  functions, and Python's operators (``operator.add/sub/mul/truediv/neg/pow/getitem/lt/...``); plus
  ``builtins.getattr`` for the attributes in `ALLOWED_ATTRIBUTES` (``shape``, ``ndim``, ``dtype``, ``T``).
* ``call_method``: `ALLOWED_METHODS` on a tensor (``sum``, ``mean``, ``exp``, ``log``, ``clamp``,
  ``detach``, ``reshape``, ``gather``, ...); never an in-place method (a name ending in ``_``), nor one
  that leaves torch (``item``, ``tolist``, ``numpy``), nor ``backward``. ``size``/``dim`` are allowed.
* ``output``: ``(loss, {metric: tensor})``.
* Refused: ``get_attr`` (a captured tensor), ``call_module``, any other op or target, graphs over
  `MAX_NODES` nodes, references to unknown or later nodes. Device arguments are mapped to the device the
  loss runs on; dtypes are limited to floating, integer and bool ones.
* Bounded work: a node whose tensor holds more than ``MAX_ELEMENTS_PER_LOGPROB`` elements per logprob
  (at least ``MIN_ELEMENT_LIMIT``) fails the op, as does a node that runs out of memory or raises; each is a
  user error naming the node, and the run is unchanged.

`LossGraph.evaluate(logprobs, *inputs)` runs it for one datum and returns ``(loss, metrics)``;
`LossGraph.token_loss_fn()` is the token-family loss (``fn(logprobs, inputs, mask) -> (B,)``) that runs it
on each datum's unpadded slice, so autograd flows from the graph's loss to the model.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from eztinker.engine.errors import InvalidInputError
from eztinker.engine.losses.registry import LossSpec

MAX_NODES = 4096
MAX_INPUTS = 16
MAX_ELEMENTS_PER_LOGPROB = 64  # a value of the graph holds at most this many elements per logprob...
MIN_ELEMENT_LIMIT = 1 << 16  # ...or this many, whichever is more (no T x T pairwise tables on long data)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
_FIELD = "graph"

# What a graph may call both as a torch function and as a tensor method (`torch.exp(x)`, `x.exp()`)...
_TORCH_AND_METHODS = [
    "abs",
    "add",
    "all",
    "any",
    "amax",
    "amin",
    "argmax",
    "argmin",
    "clamp",
    "clamp_max",
    "clamp_min",
    "clip",
    "cumsum",
    "detach",
    "div",
    "eq",
    "exp",
    "expm1",
    "flatten",
    "ge",
    "gather",
    "gt",
    "isfinite",
    "isnan",
    "le",
    "log",
    "log1p",
    "log2",
    "log_softmax",
    "logsumexp",
    "lt",
    "masked_fill",
    "max",
    "mean",
    "min",
    "mul",
    "ne",
    "neg",
    "pow",
    "prod",
    "reciprocal",
    "relu",
    "reshape",
    "rsqrt",
    "sigmoid",
    "sign",
    "softmax",
    "sqrt",
    "square",
    "squeeze",
    "std",
    "sub",
    "sum",
    "tanh",
    "transpose",
    "unsqueeze",
    "var",
    "where",
    "logit",
    "nansum",
]
# ...as a torch function only...
_TORCH_FUNCTIONS = [
    *_TORCH_AND_METHODS,
    "log10",
    "logaddexp",
    "logical_and",
    "logical_not",
    "logical_or",
    "maximum",
    "minimum",
    "nan_to_num",
    "ones_like",
    "stack",
    "cat",
    "zeros_like",
    "full_like",
    "exp2",
    "true_divide",
    "nanmean",
    "count_nonzero",
]
# ...and as a tensor method only.
_METHODS_ONLY = [
    "dim",
    "double",
    "expand_as",
    "float",
    "permute",
    "size",
    "t",
    "to",
    "type_as",
    "view",
    "view_as",
    "bool",
    "long",
    "int",
    "contiguous",
    "clone",
]
_FUNCTIONAL = [
    "log_softmax",
    "softmax",
    "logsigmoid",
    "softplus",
    "relu",
    "sigmoid",
    "kl_div",
    "normalize",
    "silu",
    "gelu",
]
_MATH = ["log", "exp", "sqrt", "log1p", "expm1", "pow", "fabs", "tanh"]
_OPERATORS = [
    "add",
    "sub",
    "mul",
    "truediv",
    "floordiv",
    "mod",
    "neg",
    "pos",
    "pow",
    "getitem",
    "lt",
    "le",
    "gt",
    "ge",
    "eq",
    "ne",
    "and_",
    "or_",
    "xor",
    "invert",
    "abs",
    "matmul",
]

ALLOWED_FUNCTIONS: Mapping[str, Callable[..., Any]] = {
    **{f"torch.{n}": getattr(torch, n) for n in _TORCH_FUNCTIONS},
    **{f"torch.nn.functional.{n}": getattr(F, n) for n in _FUNCTIONAL},
    **{f"math.{n}": getattr(math, n) for n in _MATH},
    **{f"operator.{n}": getattr(operator, n) for n in _OPERATORS},
}
"""Every function a graph may call, by the qualified name the SDK sends."""

ALLOWED_METHODS: frozenset[str] = frozenset(_TORCH_AND_METHODS + _METHODS_ONLY)
"""Every tensor method a graph may call (never in-place, never one that leaves torch)."""

ALLOWED_ATTRIBUTES: frozenset[str] = frozenset({"shape", "ndim", "dtype", "T"})
"""The attributes `builtins.getattr` may read."""

_DTYPES = {
    n: getattr(torch, n)
    for n in [
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "float",
        "double",
        "half",
        "int8",
        "int16",
        "int32",
        "int64",
        "long",
        "int",
        "bool",
    ]
}
_NODE_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")


@dataclass(frozen=True)
class _Ref:
    name: str


@dataclass(frozen=True)
class _Node:
    op: str
    name: str
    target: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _Device:
    """A device argument: resolved to the device the loss runs on."""


_DEVICE = _Device()


@dataclass(frozen=True)
class LossGraph:
    """A checked loss graph: its input names in order and its nodes."""

    name: str
    input_names: tuple[str, ...]  # logprobs first
    input_ranks: tuple[int, ...]
    nodes: tuple[_Node, ...]

    @property
    def loss_fn_inputs(self) -> tuple[str, ...]:
        """The `loss_fn_inputs` keys the loss reads (after logprobs)."""
        return self.input_names[1:]

    def evaluate(self, logprobs: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(loss, metrics)`` of one datum: the graph run on `logprobs` and its inputs, with autograd."""
        args = (logprobs, *inputs)
        if len(args) != len(self.input_names):
            raise InvalidInputError(_FIELD, f"loss {self.name!r} takes {len(self.input_names)} inputs")
        device = logprobs.device
        limit = max(MAX_ELEMENTS_PER_LOGPROB * logprobs.numel(), MIN_ELEMENT_LIMIT)
        env: dict[str, Any] = {}
        placeholders = iter(args)
        for node in self.nodes:
            if node.op == "placeholder":
                env[node.name] = next(placeholders)
                continue
            if node.op == "output":
                loss, metrics = _resolve(node.args[0], env, device)
                if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                    shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                    raise InvalidInputError(
                        _FIELD, f"loss {self.name!r} must return a scalar loss, got {shape}"
                    )
                for key, value in metrics.items():
                    if not isinstance(value, torch.Tensor) or value.numel() != 1:
                        shape = (
                            tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                        )
                        raise InvalidInputError(
                            _FIELD, f"metric {key!r} must be a scalar tensor, got {shape}"
                        )
                return loss, dict(metrics)
            call_args = _resolve(node.args, env, device)
            call_kwargs = _resolve(node.kwargs, env, device)
            try:
                if node.op == "call_function":
                    env[node.name] = ALLOWED_FUNCTIONS[node.target](*call_args, **call_kwargs)
                elif node.target == "getattr":  # builtins.getattr, checked at parse time
                    env[node.name] = getattr(call_args[0], call_args[1])
                else:  # call_method, on a tensor only
                    self_arg = call_args[0] if call_args else None
                    if not isinstance(self_arg, torch.Tensor):
                        raise InvalidInputError(
                            _FIELD, f"node {node.name!r} calls method {node.target!r} on a non-tensor"
                        )
                    env[node.name] = getattr(self_arg, node.target)(*call_args[1:], **call_kwargs)
            except InvalidInputError:
                raise
            except torch.OutOfMemoryError:
                raise InvalidInputError(
                    _FIELD, f"node {node.name!r} ({node.target}) ran out of memory"
                ) from None
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                raise InvalidInputError(_FIELD, f"node {node.name!r} ({node.target}) failed: {exc}") from None
            value = env[node.name]
            if isinstance(value, torch.Tensor) and value.numel() > limit:
                raise InvalidInputError(
                    _FIELD,
                    f"node {node.name!r} ({node.target}) makes a tensor of {value.numel()} elements; a custom "
                    f"loss's values may hold at most {limit} (MAX_ELEMENTS_PER_LOGPROB x the logprobs')",
                )
        raise InvalidInputError(_FIELD, f"loss {self.name!r} has no output node")

    def loss_spec(self, name: str) -> LossSpec:
        """The token-family loss this graph computes, labelled `name` (never registered: it travels with
        the op in `TokenLoss.graph`)."""
        return LossSpec(
            name,
            "token",
            self.token_loss_fn(),
            required_inputs=self.loss_fn_inputs,
            supports_topk=self.input_ranks[0] == 2,
        )

    def token_loss_fn(self) -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """The token-family loss ``fn(logprobs (B,T[,K]), inputs, mask (B,T)) -> ((B,), metrics)``: the
        graph on each datum's real positions, the per-datum losses stacked, and each metric the graph
        returns as its (B,) per-datum values (the engine sums them, or means a `:mean` key, over the
        request, as the SDK does when it runs the loss itself)."""

        def fn(
            logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor], mask: torch.Tensor
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            lengths = mask.sum(dim=1).tolist()
            losses: list[torch.Tensor] = []
            metrics: dict[str, list[float]] = {}
            for row, n in enumerate(lengths):
                n = int(n)
                own = [inputs[name][row, :n] for name in self.loss_fn_inputs]
                loss, datum_metrics = self.evaluate(logprobs[row, :n], *own)
                losses.append(loss.to(device=logprobs.device, dtype=logprobs.dtype))
                for key, value in datum_metrics.items():
                    metrics.setdefault(key, [0.0] * len(lengths))[row] = float(value.detach())
            return torch.stack(losses), {key: torch.tensor(values) for key, values in metrics.items()}

        return fn


def _resolve(value: Any, env: dict[str, Any], device: torch.device) -> Any:
    if isinstance(value, _Ref):
        return env[value.name]
    if isinstance(value, _Device):
        return device
    if isinstance(value, list):
        return [_resolve(v, env, device) for v in value]
    if isinstance(value, tuple):
        return tuple(_resolve(v, env, device) for v in value)
    if isinstance(value, dict):
        return {k: _resolve(v, env, device) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(*(_resolve(v, env, device) for v in (value.start, value.stop, value.step)))
    return value


def parse_loss_graph(name: str, inputs: Sequence[Mapping[str, Any]], graph: Mapping[str, Any]) -> LossGraph:
    """Check an uploaded graph against the allow-list; `InvalidInputError` names the first bad node."""
    if not isinstance(name, str) or not name or len(name) > 256:
        raise InvalidInputError("name", "must be a non-empty string of at most 256 characters")
    input_names, input_ranks = _parse_inputs(inputs)
    if not isinstance(graph, Mapping) or graph.get("format") != 1:
        raise InvalidInputError(_FIELD, "must be an object with format 1")
    raw_nodes = graph.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise InvalidInputError(f"{_FIELD}.nodes", "must be a non-empty list")
    if len(raw_nodes) > MAX_NODES:
        raise InvalidInputError(f"{_FIELD}.nodes", f"has {len(raw_nodes)} nodes; at most {MAX_NODES}")
    seen: set[str] = set()
    nodes: list[_Node] = []
    placeholders: list[str] = []
    for i, raw in enumerate(raw_nodes):
        node = _parse_node(i, raw, seen)
        if nodes and nodes[-1].op == "output":
            raise InvalidInputError(_FIELD, f"node {node.name!r} follows the output node")
        if node.op == "placeholder":
            placeholders.append(node.target)
        nodes.append(node)
        seen.add(node.name)
    if nodes[-1].op != "output":
        raise InvalidInputError(_FIELD, "the last node must be the output node")
    if tuple(placeholders) != input_names:
        raise InvalidInputError(
            _FIELD, f"the graph's parameters {placeholders} are not the declared inputs {list(input_names)}"
        )
    _check_output(nodes[-1])
    return LossGraph(name, input_names, input_ranks, tuple(nodes))


def _parse_inputs(inputs: Sequence[Mapping[str, Any]]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if not isinstance(inputs, list) or not inputs or len(inputs) > MAX_INPUTS:
        raise InvalidInputError("inputs", f"must list 1 to {MAX_INPUTS} inputs, logprobs first")
    names, ranks = [], []
    for item in inputs:
        name = item.get("name") if isinstance(item, Mapping) else None
        rank = item.get("rank") if isinstance(item, Mapping) else None
        if not isinstance(name, str) or not _INPUT_NAME.fullmatch(name) or rank not in (0, 1, 2):
            raise InvalidInputError(
                "inputs", f"bad input {item!r}: needs a lowercase name and rank 0, 1 or 2"
            )
        names.append(name)
        ranks.append(rank)
    if names[0] != "logprobs" or ranks[0] not in (1, 2):
        raise InvalidInputError("inputs", "the first input must be logprobs, of rank 1 or 2")
    if len(set(names)) != len(names):
        raise InvalidInputError("inputs", "input names must be distinct")
    if 0 in ranks[1:]:
        bad = names[ranks.index(0, 1)]
        raise InvalidInputError(
            "inputs", f"input {bad!r} has rank 0; server-side losses take per-token inputs ([T] or [T, K])"
        )
    if "target_tokens" in names[1:]:
        raise InvalidInputError("inputs", "target_tokens is not an input of a custom loss")
    return tuple(names), tuple(ranks)


def _parse_node(i: int, raw: Any, seen: set[str]) -> _Node:
    if not isinstance(raw, Mapping):
        raise InvalidInputError(f"{_FIELD}.nodes[{i}]", "must be an object")
    op, name, target = raw.get("op"), raw.get("name"), raw.get("target")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInputError(f"{_FIELD}.nodes[{i}]", f"has a bad name {name!r}")
    if name in seen:
        raise InvalidInputError(_FIELD, f"node name {name!r} is used twice")
    if op not in _NODE_OPS or not isinstance(target, str):
        raise InvalidInputError(_FIELD, f"node {name!r} has an unknown op {op!r}")
    args, kwargs = raw.get("args", []), raw.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, Mapping):
        raise InvalidInputError(_FIELD, f"node {name!r}: args must be a list and kwargs an object")
    decoded_args = tuple(_decode_arg(name, a, seen) for a in args)
    decoded_kwargs = {str(k): _decode_arg(name, v, seen) for k, v in kwargs.items()}
    if op == "get_attr":
        raise InvalidInputError(
            _FIELD,
            f"node {name!r} reads attribute {target!r} (get_attr), which is not allowed: a custom "
            "loss may only read logprobs and its loss_fn_inputs",
        )
    if op == "call_module":
        raise InvalidInputError(_FIELD, f"node {name!r} calls module {target!r}, which is not allowed")
    if op == "call_function":
        if target == "builtins.getattr":
            attr = decoded_args[1] if len(decoded_args) == 2 else None
            if attr not in ALLOWED_ATTRIBUTES:
                raise InvalidInputError(
                    _FIELD, f"node {name!r} reads attribute {attr!r}, which is not allowed"
                )
            target = "getattr"
            op = "call_method_getattr"
        elif target not in ALLOWED_FUNCTIONS:
            raise InvalidInputError(_FIELD, f"node {name!r} calls {target}, which is not allowed")
    if op == "call_method" and target not in ALLOWED_METHODS:
        raise InvalidInputError(_FIELD, f"node {name!r} calls method {target!r}, which is not allowed")
    if op == "call_method_getattr":
        op = "call_method"
    if op == "placeholder" and target != name and not _INPUT_NAME.fullmatch(target):
        raise InvalidInputError(_FIELD, f"node {name!r} has a bad parameter name {target!r}")
    if op == "output" and len(decoded_args) != 1:
        raise InvalidInputError(_FIELD, f"output node {name!r} must have one argument")
    return _Node(op, name, target, decoded_args, decoded_kwargs)


def _decode_arg(node: str, arg: Any, seen: set[str]) -> Any:
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    if isinstance(arg, list):
        return [_decode_arg(node, a, seen) for a in arg]
    if isinstance(arg, Mapping) and len(arg) == 1:
        ((kind, value),) = arg.items()
        if kind == "ref":
            if value not in seen:
                raise InvalidInputError(
                    _FIELD, f"node {node!r} refers to {value!r}, which is not an earlier node"
                )
            return _Ref(value)
        if kind == "tuple" and isinstance(value, list):
            return tuple(_decode_arg(node, a, seen) for a in value)
        if kind == "dict" and isinstance(value, Mapping):
            return {str(k): _decode_arg(node, v, seen) for k, v in value.items()}
        if kind == "slice" and isinstance(value, list) and len(value) == 3:
            return slice(*(_decode_arg(node, a, seen) for a in value))
        if kind == "ellipsis" and value is True:
            return Ellipsis
        if kind == "float" and value in ("inf", "-inf", "nan"):
            return float(value)
        if kind == "dtype" and value in _DTYPES:
            return _DTYPES[value]
        if kind == "device" and isinstance(value, str):
            return _DEVICE
        if kind == "layout" and value == "strided":
            return torch.strided
        if kind == "memory_format" and value in ("contiguous_format", "preserve_format"):
            return getattr(torch, value)
    raise InvalidInputError(_FIELD, f"node {node!r} has an argument {arg!r} that is not allowed")


def _check_output(node: _Node) -> None:
    out = node.args[0]
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], _Ref)):
        raise InvalidInputError(_FIELD, "the output must be (loss, metrics) with a tensor loss")
    if not isinstance(out[1], dict):
        raise InvalidInputError(_FIELD, "the output's metrics must be a dict")
    for key, value in out[1].items():
        if not _METRIC_KEY.fullmatch(key) or not isinstance(value, _Ref):
            raise InvalidInputError(
                _FIELD, f"metric {key!r} must be named custom/<name>:sum|mean and be a tensor"
            )
