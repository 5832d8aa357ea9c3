"""Tinker wire formats <-> engine types: protobuf datums and results, sampling params, checkpoint paths.

Pure conversions, no state and no maths: the Tinker facade (`tinker.py`) calls these at its boundary.
Protobuf layouts follow reference/tinker-wire-protocol.md §3.4-3.5 and §3.8 (SDK 0.38.0).

This module decodes the training calls (`forward_backward` / `forward`, `optim_step`'s params); beside it:
`tinker_wire_inputs` (model input chunks and tensors), `tinker_wire_sampling` (`asample` bodies),
`tinker_wire_results` (outputs and sample responses) and `tinker_wire_ids` (ids and checkpoint paths).
Everything is importable from here.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import zstandard

from eztinker.api import tinker_public_pb2 as pb
from eztinker.api.tinker_wire_ids import (
    check_name,
    checkpoint_id,
    model_id,
    native_checkpoint_name,
    parse_tinker_path,
    sampling_session_id,
    tinker_path_of,
)
from eztinker.api.tinker_wire_inputs import (
    Chunk,
    _flat,
    _image,
    decode_tensor,
    model_input_chunks,
    prompt_tokens,
    tensor_from_json,
)
from eztinker.api.tinker_wire_results import (
    TOPK_SENTINEL,
    encode_forward_backward_output,
    encode_sample_response,
    forward_backward_output_json,
    sample_response_json,
)
from eztinker.api.tinker_wire_sampling import sample_request, sampling_params, target_prompt_tokens
from eztinker.engine import AdamParams, Datum, DimuonParams
from eztinker.engine.errors import InvalidInputError
from eztinker.engine.optimizers import OptimizerName, check_optimizer_name
from eztinker.engine.types import ImageChunk

__all__ = [
    "MAX_DECOMPRESSED_BYTES",
    "PROTOBUF",
    "TOPK_SENTINEL",
    "Chunk",
    "Expand",
    "ForwardBackwardCall",
    "check_name",
    "checkpoint_id",
    "decode_forward_backward",
    "decode_forward_backward_json",
    "decode_tensor",
    "encode_forward_backward_output",
    "encode_sample_response",
    "expand_images",
    "forward_backward_call",
    "forward_backward_output_json",
    "model_id",
    "model_input_chunks",
    "native_checkpoint_name",
    "optim_params",
    "optimizer_from_config",
    "parse_forward_backward",
    "parse_tinker_path",
    "prompt_tokens",
    "sample_request",
    "sample_response_json",
    "sampling_params",
    "sampling_session_id",
    "target_prompt_tokens",
    "tensor_from_json",
    "tinker_path_of",
]

PROTOBUF = "application/x-protobuf"

# --- forward_backward requests -------------------------------------------------------------------------

Expand = Callable[[list[Chunk], str], tuple[list[int], tuple[ImageChunk, ...]]]
"""(chunks, field) -> (tokens, images): the service's `Sampling.expand_chunks` on the call's base model."""


@dataclass(frozen=True)
class ForwardBackwardCall:
    """A decoded `forward_backward` / `forward`. `chunks[i]` is datum i's model input as chunks when any
    datum holds images (else None); until `expand_images` turns them into placeholder runs, such a datum's
    tokens are its text tokens only (the engine would refuse it, naming the images)."""

    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, Any]
    forward_only: bool
    data: list[Datum]
    chunks: list[list[Chunk]] | None = None


def expand_images(call: ForwardBackwardCall, expand: Expand) -> ForwardBackwardCall:
    """The call with each datum's images in its tokens (as runs of the model's placeholder token) and in
    `Datum.images`: `expand` is the service's, bound to the call's base model. Text-only calls as they are."""
    if call.chunks is None:
        return call
    data = []
    for i, (datum, chunks) in enumerate(zip(call.data, call.chunks, strict=True)):
        if any(isinstance(chunk, ImageChunk) for chunk in chunks):
            tokens, images = expand(chunks, f"data[{i}].model_input.chunks")
            datum = replace(datum, tokens=tokens, images=images)
        data.append(datum)
    return replace(call, data=data, chunks=None)


MAX_DECOMPRESSED_BYTES = 1 << 30  # a zstd body may not expand past this (a small bomb must not fill memory)


def _decompress(body: bytes, limit: int = MAX_DECOMPRESSED_BYTES) -> bytes:
    """zstd-decompress a request body, refusing corrupt data and output beyond `limit` bytes."""
    chunks, size = [], 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)) as reader:
            while chunk := reader.read(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise InvalidInputError("body", f"decompresses to more than {limit} bytes")
                chunks.append(chunk)
    except zstandard.ZstdError as exc:
        raise InvalidInputError("body", f"is not valid zstd data: {exc}") from None
    return b"".join(chunks)


def decode_forward_backward(body: bytes, content_encoding: str | None) -> ForwardBackwardCall:
    """A `ForwardBackwardRequest` body (zstd-compressed if `content_encoding` says so) as engine data."""
    return forward_backward_call(parse_forward_backward(body, content_encoding))


def parse_forward_backward(body: bytes, content_encoding: str | None) -> Any:
    """The `ForwardBackwardRequest` protobuf of a body, its content not yet checked (`forward_backward_call`
    does): a body refused for its content still names the model and `seq_id` whose turn it takes."""
    if content_encoding and "zstd" in content_encoding.lower():
        body = _decompress(body)
    request = pb.ForwardBackwardRequest()
    try:
        request.ParseFromString(body)
    except Exception as exc:  # the protobuf runtime raises its own DecodeError
        raise InvalidInputError("body", f"not a tinker ForwardBackwardRequest protobuf: {exc}") from None
    return request


def forward_backward_call(request: Any) -> ForwardBackwardCall:
    """A parsed `ForwardBackwardRequest` as engine data; `InvalidInputError` names what is refused."""
    config: dict[str, Any] = dict(request.loss_fn_config)
    for key, value in request.loss_fn_config_v2.items():  # v2 wins: it also carries strings
        config[key] = value.text if value.WhichOneof("value") == "text" else value.number
    decoded = [_datum(d, i) for i, d in enumerate(request.data)]
    data = [datum for datum, _ in decoded]
    return ForwardBackwardCall(
        model_id=request.model_id,
        seq_id=request.seq_id,
        loss_fn=request.loss_fn,
        loss_fn_config=config,
        forward_only=request.forward_only,
        data=data,
        chunks=[chunks for _, chunks in decoded] if any(d.images for d in data) else None,
    )


def decode_forward_backward_json(
    body: Mapping[str, Any], *, forward_only: bool = False
) -> ForwardBackwardCall:
    """The JSON body older SDKs (<= 0.24) send to `/forward_backward` (or `/forward`): the same call.

    `{"model_id", "seq_id", "forward_backward_input" | "forward_input": {"data", "loss_fn", "loss_fn_config"}}`,
    each datum `{"model_input": {"chunks": [...]}, "loss_fn_inputs": {name: TensorData JSON}}`.
    """
    call = body.get("forward_backward_input") or body.get("forward_input")
    if not isinstance(call, Mapping):
        raise InvalidInputError(
            "forward_backward_input", "is missing: send the call's data, loss_fn and config"
        )
    data, all_chunks = [], []
    for i, datum in enumerate(call.get("data") or []):
        chunks = model_input_chunks(datum.get("model_input") or {}, field=f"data[{i}].model_input")
        tokens, images = _flat(chunks)
        inputs = {
            name: tensor_from_json(value, f"data[{i}].loss_fn_inputs.{name}")
            for name, value in (datum.get("loss_fn_inputs") or {}).items()
        }
        data.append(Datum(tokens=tokens, loss_inputs=inputs, images=images))
        all_chunks.append(chunks)
    return ForwardBackwardCall(
        model_id=str(body.get("model_id")),
        seq_id=int(body.get("seq_id") or 0),
        loss_fn=str(call.get("loss_fn", "cross_entropy")),
        loss_fn_config=dict(call.get("loss_fn_config") or {}),
        forward_only=forward_only or bool(body.get("forward_only", False)),
        data=data,
        chunks=all_chunks if any(d.images for d in data) else None,
    )


def _datum(datum: Any, index: int) -> tuple[Datum, list[Chunk]]:
    chunks: list[Chunk] = []
    for j, chunk in enumerate(datum.model_input):
        field = f"data[{index}].model_input.chunks[{j}]"
        kind = chunk.WhichOneof("chunk")
        if kind == "encoded_text":
            chunks.append(np.frombuffer(chunk.encoded_text.tokens, dtype="<i4").tolist())
        elif kind == "image":
            image = chunk.image
            if image.HasField("override_dimensions"):
                raise InvalidInputError(
                    f"{field}.override_dimensions", "is not supported: send the image at the size to use"
                )
            expected = image.expected_tokens if image.HasField("expected_tokens") else None
            chunks.append(_image(image.data, image.format, expected, field))
        else:
            raise InvalidInputError(field, f"{kind} chunks are not supported; send text tokens or images")
    inputs = {
        name: decode_tensor(tensor, f"data[{index}].loss_fn_inputs.{name}")
        for name, tensor in datum.loss_fn_inputs.items()
    }
    tokens, images = _flat(chunks)
    return Datum(tokens=tokens, loss_inputs=inputs, images=images), chunks


# --- optimizers --------------------------------------------------------------------------------------------

_ADAM_FIELDS = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")
_DIMUON_FIELDS = ("learning_rate", "beta1", "grad_clip_norm", "damping", "rank_lr_correction_exponent")


def optimizer_from_config(config: Any, field: str = "optimizer_config") -> OptimizerName | None:
    """The optimizer an `OptimizerConfig` (`{"type": "adamw"}`, `{"type": "dimuon", "version": 1}`)
    names; None if absent. An unknown type, version or field is refused (never trained as AdamW)."""
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise InvalidInputError(field, f'must be an object like {{"type": "adamw"}}, got {config!r}')
    name = check_optimizer_name(config.get("type"), f"{field}.type")
    allowed = {"type", "version"} if name == "dimuon" else {"type"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise InvalidInputError(f"{field}.{unknown[0]}", f"is not a setting of the {name} optimizer")
    if name == "dimuon" and config.get("version", 1) != 1:
        raise InvalidInputError(
            f"{field}.version", f"Dimuon version {config['version']!r} is unknown; this server has 1"
        )
    return name


def optim_params(body: Mapping[str, Any]) -> AdamParams | DimuonParams:
    """The step params of an `optim_step` body: `adam_params` (AdamParams) or `optimizer_params`
    (`{"type": "dimuon", ...}`: DimuonParams); `optim_params` is accepted as either, as the SDK's model
    accepts it. Values are range-checked later, against the run's optimizer (`check_step_params`)."""
    given = [key for key in ("adam_params", "optimizer_params", "optim_params") if body.get(key) is not None]
    if len(given) > 1:
        raise InvalidInputError(given[1], f"give one of {given[0]} and {given[1]}, not both")
    if not given:
        return AdamParams()  # SDKs always send one; an older client may send neither
    key = given[0]
    value = body[key]
    if not isinstance(value, Mapping):
        raise InvalidInputError(key, f"must be an object, got {value!r}")
    if key == "adam_params" or (key == "optim_params" and "type" not in value):
        return AdamParams(**_step_numbers(value, key, _ADAM_FIELDS))
    kind = value.get("type")
    if kind != "dimuon":
        raise InvalidInputError(
            f"{key}.type",
            f"unknown optimizer {kind!r}: AdamParams go in adam_params, DimuonParams are type dimuon",
        )
    settings = {k: v for k, v in value.items() if k != "type"}
    if "learning_rate" not in settings:
        raise InvalidInputError(f"{key}.learning_rate", "is required for a Dimuon step")
    return DimuonParams(**_step_numbers(settings, key, _DIMUON_FIELDS))


def _step_numbers(values: Mapping[str, Any], key: str, allowed: Sequence[str]) -> dict[str, float]:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise InvalidInputError(
            f"{key}.{unknown[0]}", f"is not a setting of this optimizer (it has {list(allowed)})"
        )
    out: dict[str, float] = {}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInputError(f"{key}.{name}", f"must be a number, got {value!r}")
        out[name] = float(value)
    return out
