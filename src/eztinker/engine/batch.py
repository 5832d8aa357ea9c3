"""Checking a batch before any compute, and cutting it into padded chunks under a token budget.

Every problem is reported as an `InvalidInputError` whose field names the datum and the input, e.g.
`data[2].loss_inputs.weights`, before the model runs — so a bad request never touches a run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from eztinker.engine.errors import InvalidInputError
from eztinker.engine.losses import LossSpec
from eztinker.engine.types import IGNORE_INDEX, Datum

# Inputs that hold token ids (int64); every other loss input is float32.
_TOKEN_INPUTS = {"target_tokens", "labels"}


@dataclass(frozen=True)
class CheckedDatum:
    index: int  # position in the request, for results and messages
    tokens: torch.Tensor  # (N,) int64
    inputs: dict[str, torch.Tensor]  # (N,) or (N, K); ids int64, the rest float32


@dataclass(frozen=True)
class Chunk:
    """Datums padded to one (B, T) block. Row b is datum `indices[b]` of the request."""

    indices: list[int]
    input_ids: torch.Tensor  # (B, T) int64, right-padded with 0
    attention_mask: torch.Tensor  # (B, T) int64
    mask: torch.Tensor  # (B, T) bool, True on real positions
    inputs: dict[str, torch.Tensor]  # (B, T) or (B, T, K); labels padded with -100, the rest with 0
    lengths: list[int]


def _as_tensor(value: object, field: str, *, integer: bool) -> torch.Tensor:
    dtype = torch.int64 if integer else torch.float32
    try:
        tensor = value.detach().to("cpu") if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidInputError(field, f"must be a list or tensor of numbers ({exc})") from exc
    if integer and tensor.is_floating_point() and not torch.equal(tensor, tensor.round()):
        raise InvalidInputError(field, "must hold integer token ids")
    return tensor.to(dtype)


def _check_ids(ids: torch.Tensor, field: str, vocab_size: int, *, allow_ignore: bool = False) -> None:
    real = ids[ids != IGNORE_INDEX] if allow_ignore else ids
    if real.numel() == 0:
        return
    low, high = int(real.min()), int(real.max())
    if low < 0:
        hint = " (use -100 to ignore a position)" if allow_ignore else ""
        raise InvalidInputError(field, f"token id {low} is negative{hint}")
    if high >= vocab_size:
        raise InvalidInputError(field, f"token id {high} is out of the vocabulary (size {vocab_size})")


def check_data(
    data: Sequence[Datum], spec: LossSpec, *, vocab_size: int, max_length: int
) -> list[CheckedDatum]:
    """Validate `data` for loss `spec` and convert it to tensors; raise on the first problem found."""
    if not data:
        raise InvalidInputError("data", "is empty: send at least one datum")
    if spec.family == "native":
        id_key, required, optional = "labels", (), ("weights",)
    else:
        id_key, required, optional = "target_tokens", spec.required_inputs, ("weights", *spec.optional_inputs)
    known = {id_key, *required, *optional}
    checked = []
    for i, datum in enumerate(data):
        where = f"data[{i}]"
        tokens = _as_tensor(datum.tokens, f"{where}.tokens", integer=True)
        if tokens.ndim != 1 or tokens.numel() == 0:
            raise InvalidInputError(f"{where}.tokens", "must be a non-empty 1-D list of token ids")
        n = tokens.numel()
        if n > max_length:
            raise InvalidInputError(
                f"{where}.tokens", f"length {n} exceeds the model's context of {max_length} tokens"
            )
        _check_ids(tokens, f"{where}.tokens", vocab_size)
        raw = dict(datum.loss_inputs)
        if spec.family == "native" and id_key not in raw:
            raw[id_key] = tokens  # the seed's default: predict the input itself
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InvalidInputError(
                f"{where}.loss_inputs.{unknown[0]}",
                f"is not an input of loss {spec.name!r}; it takes {sorted(known)}",
            )
        for key in (id_key, *required):
            if key not in raw:
                raise InvalidInputError(
                    f"{where}.loss_inputs.{key}", f"is missing; loss {spec.name!r} needs it"
                )
        inputs = {}
        for key, value in raw.items():
            field = f"{where}.loss_inputs.{key}"
            tensor = _as_tensor(value, field, integer=key in _TOKEN_INPUTS)
            if tensor.ndim not in (1, 2) or tensor.shape[0] != n:
                raise InvalidInputError(
                    field, f"has shape {list(tensor.shape)} but tokens has length {n}; they must match"
                )
            if key in _TOKEN_INPUTS:
                _check_ids(tensor, field, vocab_size, allow_ignore=key == "labels")
            elif not bool(torch.isfinite(tensor).all()):
                raise InvalidInputError(field, "contains NaN or infinity")
            inputs[key] = tensor
        targets = inputs[id_key]
        if targets.ndim == 2 and spec.family == "native":
            raise InvalidInputError(f"{where}.loss_inputs.labels", "must be 1-D (one label per token)")
        for key, tensor in inputs.items():
            if key == id_key:
                continue
            # Per-token inputs are (N,); weights may also match (N, K) top-K targets.
            if tensor.shape != targets.shape and not (tensor.ndim == 1 and key != "weights"):
                raise InvalidInputError(
                    f"{where}.loss_inputs.{key}",
                    f"has shape {list(tensor.shape)} but {id_key} has shape {list(targets.shape)}",
                )
        checked.append(CheckedDatum(index=i, tokens=tokens, inputs=inputs))
    return _same_keys(checked)


def _same_keys(checked: list[CheckedDatum]) -> list[CheckedDatum]:
    """Give every datum the same inputs: missing weights mean 1; another missing input is an error."""
    keys = set().union(*(d.inputs for d in checked))
    for datum in checked:
        for key in sorted(keys - set(datum.inputs)):
            if key != "weights":
                raise InvalidInputError(
                    f"data[{datum.index}].loss_inputs.{key}", "is missing here but given for other datums"
                )
            targets = datum.inputs.get("target_tokens", datum.inputs.get("labels"))
            assert targets is not None
            datum.inputs["weights"] = torch.ones(targets.shape, dtype=torch.float32)
    return checked


def chunk_batch(data: Sequence[CheckedDatum], token_budget: int) -> list[Chunk]:
    """Group datums (longest first, to waste little padding) so each chunk's B·T stays within budget.

    A datum longer than the budget gets a chunk of its own: a sequence is never split.
    """
    order = sorted(data, key=lambda d: d.tokens.numel(), reverse=True)
    groups: list[list[CheckedDatum]] = []
    for datum in order:
        # The first datum of a group is its longest, so the group's padded size is len(group) · that.
        if groups and (len(groups[-1]) + 1) * groups[-1][0].tokens.numel() <= token_budget:
            groups[-1].append(datum)
        else:
            groups.append([datum])
    return [_pad(group) for group in groups]


def _pad(group: list[CheckedDatum]) -> Chunk:
    lengths = [d.tokens.numel() for d in group]
    batch, width = len(group), max(lengths)
    input_ids = torch.zeros(batch, width, dtype=torch.int64)
    mask = torch.zeros(batch, width, dtype=torch.bool)
    inputs: dict[str, torch.Tensor] = {}
    for key, first in group[0].inputs.items():
        fill = IGNORE_INDEX if key == "labels" else 0
        inputs[key] = torch.full((batch, width, *first.shape[1:]), fill, dtype=first.dtype)
    for row, (datum, n) in enumerate(zip(group, lengths, strict=True)):
        input_ids[row, :n] = datum.tokens
        mask[row, :n] = True
        for key, tensor in datum.inputs.items():
            if key not in inputs or inputs[key].shape[2:] != tensor.shape[1:]:
                raise InvalidInputError(
                    f"data[{datum.index}].loss_inputs.{key}",
                    "has a different shape (N vs N×K) from other datums in the batch",
                )
            inputs[key][row, :n] = tensor
    return Chunk(
        indices=[d.index for d in group],
        input_ids=input_ids,
        attention_mask=mask.long(),
        mask=mask,
        inputs=inputs,
        lengths=lengths,
    )


def budget_for(vocab_size: int, token_budget: int, logits_budget: int) -> int:
    """Tokens per chunk: the token budget, lowered so a chunk's (B, T, V) logits fit the logits budget."""
    return max(1, min(token_budget, math.floor(logits_budget / vocab_size)))
