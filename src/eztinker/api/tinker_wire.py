"""Tinker wire formats <-> engine types: protobuf datums and results, sampling params, checkpoint paths.

Pure conversions, no state and no maths: the Tinker facade (`tinker.py`) calls these at its boundary.
Protobuf layouts follow reference/tinker-wire-protocol.md §3.4-3.5 and §3.8 (SDK 0.38.0).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import zstandard

from eztinker.api import tinker_public_pb2 as pb
from eztinker.engine import AdamParams, Datum, DimuonParams, SamplingParams
from eztinker.engine.errors import InvalidInputError
from eztinker.engine.optimizers import OptimizerName, check_optimizer_name
from eztinker.engine.sampler import SampleRequest
from eztinker.engine.types import ImageChunk, SampleResult

PROTOBUF = "application/x-protobuf"

_NP_DTYPES = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
_CHECKPOINT_KINDS = ("weights", "sampler_weights", "external_weights")
_TINKER_PATH = re.compile(r"^tinker://([^/]+)/([^/]+)/([^/]+)$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# --- forward_backward requests -------------------------------------------------------------------------


Chunk = list[int] | ImageChunk
"""A model input chunk, decoded: a list of token ids, or an image (its bytes and format)."""

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


def _flat(chunks: Sequence[Chunk]) -> tuple[list[int], tuple[ImageChunk, ...]]:
    tokens = [t for chunk in chunks if not isinstance(chunk, ImageChunk) for t in chunk]
    return tokens, tuple(chunk for chunk in chunks if isinstance(chunk, ImageChunk))


def _image(data: bytes, fmt: str, expected_tokens: int | None, field: str) -> ImageChunk:
    """An image chunk; its bytes are checked (decoded, sized) engine-side, by the model's processor."""
    if not data:
        raise InvalidInputError(f"{field}.data", "is empty: send the image file's bytes")
    if expected_tokens is not None and expected_tokens < 0:
        raise InvalidInputError(f"{field}.expected_tokens", f"must be >= 0, got {expected_tokens}")
    return ImageChunk(data=bytes(data), format=str(fmt), expected_tokens=expected_tokens)


_POINTER_REFUSAL = (
    "image_asset_pointer chunks are not served: this server fetches no image by path or URL; "
    "send the image's bytes in an image chunk"
)


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
    if content_encoding and "zstd" in content_encoding.lower():
        body = _decompress(body)
    request = pb.ForwardBackwardRequest()
    try:
        request.ParseFromString(body)
    except Exception as exc:  # the protobuf runtime raises its own DecodeError
        raise InvalidInputError("body", f"not a tinker ForwardBackwardRequest protobuf: {exc}") from None
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


def tensor_from_json(tensor: Any, field: str) -> torch.Tensor:
    """A JSON `TensorData` (`data`, `dtype`, `shape`, optional CSR indices; pad 0) as a torch tensor."""
    if isinstance(tensor, list):  # a bare list: its dtype from its values
        return torch.tensor(tensor)
    if not isinstance(tensor, Mapping) or "data" not in tensor:
        raise InvalidInputError(field, "must be a TensorData object {data, dtype, shape}")
    dtype = {"int64": np.int64, "float32": np.float32}.get(str(tensor.get("dtype", "float32")))
    if dtype is None:
        raise InvalidInputError(field, f"unsupported dtype {tensor.get('dtype')!r} (int64 or float32)")
    values = np.asarray(tensor["data"], dtype=dtype)
    shape = list(tensor.get("shape") or [values.size])
    crow, col = tensor.get("sparse_crow_indices"), tensor.get("sparse_col_indices")
    if crow is not None and col is not None:
        if len(shape) != 2:
            raise InvalidInputError(field, "a sparse tensor needs a 2-D shape")
        dense = np.zeros(shape, dtype=dtype)
        dense[np.repeat(np.arange(shape[0]), np.diff(np.asarray(crow))), np.asarray(col, dtype=np.int64)] = (
            values
        )
        return torch.from_numpy(dense)
    if math.prod(shape) != values.size:
        raise InvalidInputError(field, f"has {values.size} values for shape {shape}")
    return torch.from_numpy(values.reshape(shape))


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


def decode_tensor(tensor: Any, field: str) -> torch.Tensor:
    """A proto `Tensor` (dense or CSR, float32/int64/int32/bfloat16) as a torch tensor of its shape."""
    shape = list(tensor.shape)
    if tensor.dtype == pb.DTYPE_BFLOAT16:
        raw = np.frombuffer(_tensor_values(tensor), dtype="<u2").astype(np.uint32) << 16
        values = raw.view(np.float32)
    elif tensor.dtype in _NP_DTYPES:
        values = np.frombuffer(
            _tensor_values(tensor), dtype=np.dtype(_NP_DTYPES[tensor.dtype]).newbyteorder("<")
        )
    else:
        raise InvalidInputError(field, f"unsupported tensor dtype {tensor.dtype}")
    if tensor.dtype == pb.DTYPE_INT32:
        values = values.astype(np.int64)
    if tensor.WhichOneof("encoding") == "sparse_csr":
        if len(shape) != 2:
            raise InvalidInputError(field, "a sparse tensor needs a 2-D shape")
        csr = tensor.sparse_csr
        crow = np.frombuffer(csr.crow_indices, dtype="<i8")
        col = np.frombuffer(csr.col_indices, dtype="<i8")
        dense = np.zeros(shape, dtype=values.dtype)
        rows = np.repeat(np.arange(shape[0]), np.diff(crow))
        dense[rows, col] = values
        return torch.from_numpy(dense)
    if not shape:
        shape = [values.size]
    if math.prod(shape) != values.size:
        raise InvalidInputError(field, f"has {values.size} values for shape {shape}")
    return torch.from_numpy(values.copy().reshape(shape))


def _tensor_values(tensor: Any) -> bytes:
    return tensor.sparse_csr.values if tensor.WhichOneof("encoding") == "sparse_csr" else tensor.dense


# --- results -----------------------------------------------------------------------------------------


def encode_forward_backward_output(logprobs: Sequence[Any], metrics: Mapping[str, float]) -> bytes:
    """A `ForwardBackwardOutput`: one ArrayRecord with every datum's `logprobs`, plus the metrics."""
    arrays = [np.asarray(lp, dtype=np.float32) for lp in logprobs]
    offsets = np.zeros(len(arrays) + 1, dtype="<i8")
    offsets[1:] = np.cumsum([a.nbytes for a in arrays])
    trailing = list(arrays[0].shape[1:]) if arrays else []
    record = pb.ArrayRecord(type_tag="ArrayRecord", num_datums=len(arrays))
    record.fields["logprobs"].CopyFrom(
        pb.BatchedTensor(
            data=b"".join(a.astype("<f4").tobytes() for a in arrays),
            offsets=offsets.tobytes(),
            dtype=pb.DTYPE_FLOAT32,
            trailing_shape=trailing,
        )
    )
    output = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=[record])
    for key, value in metrics.items():
        if key.count(":") == 1:  # the SDK only merges `name:reduction` keys
            output.metrics[key] = float(value)
    return output.SerializeToString()


def encode_sample_response(result: SampleResult, echo: Mapping[str, Any]) -> bytes:
    """A `SampleResponse` from the engine's result: sequences (with top-k), and the prompt extras.

    `echo["target_layout"]`, when present, is the CSR layout (`crow`, `col`) the request's
    `target_prompt_logprobs` came in: the answer uses the same layout, as the SDK documents.
    """
    response = pb.SampleResponse()
    for seq in result.sequences:
        sequence = pb.SampledSequence(
            stop_reason=pb.STOP_REASON_LENGTH if seq.stop_reason == "length" else pb.STOP_REASON_STOP,
            tokens=np.asarray(seq.tokens, dtype="<i4").tobytes(),
            logprobs=np.asarray(seq.logprobs, dtype="<f4").tobytes(),
        )
        if seq.topk_logprobs is not None:
            sequence.topk_sampled_logprobs.CopyFrom(_topk(seq.topk_logprobs))
        response.sequences.append(sequence)
    if result.prompt_logprobs is not None:
        values = [math.nan if v is None else v for v in result.prompt_logprobs]
        response.prompt_logprobs = np.asarray(values, dtype="<f4").tobytes()
    if result.topk_prompt_logprobs is not None:
        response.topk_prompt_logprobs.CopyFrom(_topk(result.topk_prompt_logprobs))
    if result.target_prompt_logprobs is not None:
        targets = _target_tensor(result.target_prompt_logprobs, echo.get("target_layout"))
        response.target_prompt_logprobs.CopyFrom(targets)
    alt = result.prompt_alt_tokens
    if alt is not None:
        k = len(alt.tokens[0]) if alt.tokens else int(echo.get("prompt_alt_tokens_k", 0))
        shape = [len(alt.tokens), k]
        response.prompt_alt_tokens.tokens.CopyFrom(_dense(alt.tokens, np.int64, pb.DTYPE_INT64, shape))
        response.prompt_alt_tokens.logprobs.CopyFrom(
            _dense(alt.logprobs, np.float32, pb.DTYPE_FLOAT32, shape)
        )
    return response.SerializeToString()


def forward_backward_output_json(logprobs: Sequence[Any], metrics: Mapping[str, float]) -> dict[str, Any]:
    """The JSON `ForwardBackwardOutput` of SDKs <= 0.24 (they do not ask for protobuf)."""
    outputs = []
    for lp in logprobs:
        array = np.asarray(lp, dtype=np.float32)
        outputs.append(
            {"logprobs": {"data": array.ravel().tolist(), "dtype": "float32", "shape": list(array.shape)}}
        )
    return {
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": outputs,
        "metrics": {k: float(v) for k, v in metrics.items() if k.count(":") == 1},
    }


def sample_response_json(result: SampleResult) -> dict[str, Any]:
    """The JSON `SampleResponse` of SDKs that do not ask for protobuf (sequences and prompt log-probs)."""
    return {
        "type": "sample",
        "sequences": [
            {"tokens": s.tokens, "logprobs": s.logprobs, "stop_reason": s.stop_reason}
            for s in result.sequences
        ],
        "prompt_logprobs": result.prompt_logprobs,
        "topk_prompt_logprobs": result.topk_prompt_logprobs,
    }


TOPK_SENTINEL = (0, -99999.0)  # the SDK's empty cell; a row of sentinels reads as None


def _topk(rows: Sequence[Sequence[Sequence[float]] | None]) -> Any:
    """A dense N x K `TopkLogprobs` (int32 ids, float32 logprobs), sentinel-padded, from per-row pairs."""
    k = max((len(r) for r in rows if r is not None), default=0)
    ids = np.full((len(rows), k), TOPK_SENTINEL[0], dtype="<i4")
    logprobs = np.full((len(rows), k), TOPK_SENTINEL[1], dtype="<f4")
    for i, row in enumerate(rows):
        for j, (token, logprob) in enumerate(row or ()):
            ids[i, j], logprobs[i, j] = int(token), logprob
    return pb.TopkLogprobs(token_ids=ids.tobytes(), logprobs=logprobs.tobytes(), k=k, length=len(rows))


def _dense(values: Any, np_dtype: Any, dtype: pb.DType, shape: list[int]) -> Any:
    array = np.asarray(values, dtype=np.dtype(np_dtype).newbyteorder("<")).reshape(shape)
    return pb.Tensor(dense=array.tobytes(), dtype=dtype, shape=shape)


def _target_tensor(logprobs: Sequence[Sequence[float]], layout: Mapping[str, Any] | None) -> Any:
    """The float32 answer to `target_prompt_logprobs`: the request's shape, dense or in its CSR layout."""
    dense = np.asarray(logprobs, dtype="<f4")
    shape = list(layout["shape"]) if layout else list(dense.shape)
    dense = dense.reshape(shape)
    if not layout or "crow" not in layout:
        return pb.Tensor(dense=dense.tobytes(), dtype=pb.DTYPE_FLOAT32, shape=shape)
    crow = np.asarray(layout["crow"], dtype="<i8")
    col = np.asarray(layout["col"], dtype="<i8")
    values = dense[np.repeat(np.arange(shape[0]), np.diff(crow)), col].astype("<f4")
    csr = pb.SparseCsr(values=values.tobytes(), crow_indices=crow.tobytes(), col_indices=col.tobytes())
    return pb.Tensor(sparse_csr=csr, dtype=pb.DTYPE_FLOAT32, shape=shape)


# --- sampling ----------------------------------------------------------------------------------------


def model_input_chunks(prompt: Mapping[str, Any], *, field: str = "prompt") -> list[Chunk]:
    """The chunks of a JSON `ModelInput`: `encoded_text` token lists and `image` chunks (base64 `data`,
    `format`, `expected_tokens`). `image_asset_pointer` and other chunks are refused, naming the chunk."""
    chunks: list[Chunk] = []
    raw = prompt.get("chunks", []) if isinstance(prompt, Mapping) else None
    if not isinstance(raw, list):
        raise InvalidInputError(f"{field}.chunks", "must be a list of chunks")
    for i, chunk in enumerate(raw):
        where = f"{field}.chunks[{i}]"
        if not isinstance(chunk, Mapping):
            raise InvalidInputError(where, "must be a chunk object")
        kind = chunk.get("type", "encoded_text")
        if kind == "encoded_text":
            chunks.append([int(t) for t in chunk.get("tokens", [])])
        elif kind == "image":
            chunks.append(_json_image(chunk, where))
        elif kind == "image_asset_pointer":
            raise InvalidInputError(where, _POINTER_REFUSAL)
        else:
            raise InvalidInputError(where, f"{kind} chunks are not supported; send text tokens or images")
    if not any(chunk for chunk in chunks):
        raise InvalidInputError(field, "has no tokens")
    return chunks


def _json_image(chunk: Mapping[str, Any], where: str) -> ImageChunk:
    data = chunk.get("data")
    if not isinstance(data, str):
        raise InvalidInputError(f"{where}.data", "must be the image file's bytes, base64-encoded")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError(f"{where}.data", "is not valid base64") from None
    expected = chunk.get("expected_tokens")
    if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int)):
        raise InvalidInputError(f"{where}.expected_tokens", f"must be an integer, got {expected!r}")
    return _image(raw, str(chunk.get("format", "")), expected, where)


def prompt_tokens(prompt: Mapping[str, Any], *, field: str = "prompt") -> list[int]:
    """The token ids of a JSON `ModelInput` of encoded text chunks (an image chunk is refused here)."""
    chunks = model_input_chunks(prompt, field=field)
    for i, chunk in enumerate(chunks):
        if isinstance(chunk, ImageChunk):
            raise InvalidInputError(f"{field}.chunks[{i}]", "image chunks are not accepted here")
    return _flat(chunks)[0]


def sample_request(body: Mapping[str, Any]) -> tuple[SampleRequest, dict[str, Any]]:
    """An `asample` body as the engine's request (its adapter is set by the service, from the sampling
    session), and what encoding its answer needs (`target_layout`, `prompt_alt_tokens_k`)."""
    echo: dict[str, Any] = {}
    targets = None
    if body.get("target_prompt_logprobs") is not None:
        targets, echo["target_layout"] = target_prompt_tokens(body["target_prompt_logprobs"])
    last_n = body.get("prompt_logprobs_last_n")
    chunks = model_input_chunks(body.get("prompt") or {})
    prompt, images = _flat(chunks)
    if images:  # the service expands them on the sampling session's base model (`Sampling.sample`)
        echo["prompt_chunks"] = chunks
    request = SampleRequest(
        prompt=prompt,
        images=images,
        params=sampling_params(body.get("sampling_params") or {}),
        num_samples=int(body.get("num_samples", 1)),
        prompt_logprobs=bool(body.get("prompt_logprobs") or False),
        topk_sample_logprobs=int(body.get("topk_sample_logprobs") or 0),
        topk_prompt_logprobs=int(body.get("topk_prompt_logprobs") or 0),
        prompt_logprobs_last_n=None if last_n is None else int(last_n),
        target_prompt_tokens=targets,
        prompt_alt_tokens_k=int(body.get("prompt_alt_tokens_k") or 0),
    )
    if request.prompt_alt_tokens_k:
        echo["prompt_alt_tokens_k"] = request.prompt_alt_tokens_k
    return request, echo


def sampling_params(params: Mapping[str, Any]) -> SamplingParams:
    """JSON `SamplingParams`: stop null keeps EOS stopping, [] disables every stop (as in the engine)."""
    stop = params.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    return SamplingParams(
        max_tokens=params.get("max_tokens"),
        temperature=float(params.get("temperature", 1.0)),
        top_p=float(params.get("top_p", 1.0)),
        top_k=int(params.get("top_k", -1)),
        stop=stop,
        seed=params.get("seed"),
    )


def target_prompt_tokens(tensor: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The JSON `TensorData` of `target_prompt_logprobs` as a dense (P-1, K) id table (-1: nothing asked),
    and its layout (shape, plus CSR indices if it came sparse) so the answer can use the same one."""
    field = "target_prompt_logprobs"
    shape = tensor.get("shape")
    if not isinstance(shape, list) or len(shape) != 2:
        raise InvalidInputError(field, f"needs a 2-D shape [len(prompt) - 1, K], got {shape!r}")
    if tensor.get("dtype", "int64") != "int64":
        raise InvalidInputError(field, "must be an int64 tensor of token ids")
    data = np.asarray(tensor.get("data") or [], dtype=np.int64)
    crow, col = tensor.get("sparse_crow_indices"), tensor.get("sparse_col_indices")
    if crow is None and col is None:
        if data.size != shape[0] * shape[1]:
            raise InvalidInputError(field, f"has {data.size} values for shape {shape}")
        return torch.from_numpy(data.reshape(shape)), {"shape": list(shape)}
    crow_a, col_a = np.asarray(crow or [], dtype=np.int64), np.asarray(col or [], dtype=np.int64)
    valid = (
        crow_a.size == shape[0] + 1
        and col_a.size == data.size
        and (
            crow_a.size == 0 or (crow_a[0] == 0 and crow_a[-1] == data.size and np.all(np.diff(crow_a) >= 0))
        )
        and np.all((col_a >= 0) & (col_a < shape[1]))
    )
    if not valid:
        raise InvalidInputError(field, "sparse_crow_indices / sparse_col_indices are not a valid CSR layout")
    dense = np.full(shape, -1, dtype=np.int64)
    dense[np.repeat(np.arange(shape[0]), np.diff(crow_a)), col_a] = data
    return torch.from_numpy(dense), {"crow": crow_a.tolist(), "col": col_a.tolist(), "shape": list(shape)}


# --- ids and checkpoint paths -----------------------------------------------------------------


def model_id(session_id: str, model_seq_id: int) -> str:
    """The SDK's own format for a training model's id (it derives it client-side for create-via-load)."""
    return f"{session_id}:train:{model_seq_id}"


def sampling_session_id(session_id: str, seq_id: int) -> str:
    return f"{session_id}:sample:{seq_id}"


def check_name(name: str) -> str:
    if not _SAFE_NAME.match(name):
        raise InvalidInputError("path", f"checkpoint name {name!r} must match {_SAFE_NAME.pattern}")
    return name


def native_checkpoint_name(kind: str, name: str) -> str:
    """The native checkpoint name of `tinker://<run>/<kind>/<name>`: weights keep their name."""
    return name if kind == "weights" else f"{kind}.{name}"


def parse_tinker_path(path: str) -> tuple[str, str, str]:
    """(run id, native checkpoint name, kind) of `tinker://<run>/<weights|sampler_weights|external_weights>/<name>`."""
    match = _TINKER_PATH.match(path)
    if match is None or match.group(2) not in _CHECKPOINT_KINDS:
        raise InvalidInputError(
            "path", f"{path!r} is not tinker://<run>/<{'|'.join(_CHECKPOINT_KINDS)}>/<name>"
        )
    run_id, kind, name = match.groups()
    return run_id, native_checkpoint_name(kind, name), kind


# --- checkpoint ids -----------------------------------------------------------------------------------

_KIND_PREFIXES = ("sampler_weights.", "external_weights.")


def checkpoint_id(native_name: str) -> str:
    """The REST `checkpoint_id` (`<kind>/<name>`) of a native checkpoint name."""
    for prefix in _KIND_PREFIXES:
        if native_name.startswith(prefix):
            return f"{prefix[:-1]}/{native_name.removeprefix(prefix)}"
    return f"weights/{native_name}"


def tinker_path_of(run_id: str, native_name: str) -> str:
    """`tinker://<run>/<kind>/<name>` of a native checkpoint."""
    return f"tinker://{run_id}/{checkpoint_id(native_name)}"


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
