"""Tinker wire formats <-> engine types: protobuf datums and results, sampling params, checkpoint paths.

Pure conversions, no state and no maths: the Tinker facade (`tinker.py`) calls these at its boundary.
Protobuf layouts follow reference/tinker-wire-protocol.md §3.4-3.5 and §3.8 (SDK 0.38.0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
import zstandard

from eztinker.api import tinker_public_pb2 as pb
from eztinker.engine import Datum, SamplingParams
from eztinker.engine.errors import InvalidInputError

PROTOBUF = "application/x-protobuf"

_NP_DTYPES = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
_CHECKPOINT_KINDS = ("weights", "sampler_weights")
_TINKER_PATH = re.compile(r"^tinker://([^/]+)/([^/]+)/([^/]+)$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# Which LoRA target paths count as attention or MLP, by a component of their module path.
_ATTENTION_PARTS = ("attn", "attention")
_MLP_PARTS = ("mlp", "feed_forward", "ffn")


# --- forward_backward requests -------------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardBackwardCall:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, Any]
    forward_only: bool
    data: list[Datum]


def decode_forward_backward(body: bytes, content_encoding: str | None) -> ForwardBackwardCall:
    """A `ForwardBackwardRequest` body (zstd-compressed if `content_encoding` says so) as engine data."""
    if content_encoding and "zstd" in content_encoding.lower():
        body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
    request = pb.ForwardBackwardRequest()
    try:
        request.ParseFromString(body)
    except Exception as exc:  # the protobuf runtime raises its own DecodeError
        raise InvalidInputError("body", f"not a tinker ForwardBackwardRequest protobuf: {exc}") from None
    config: dict[str, Any] = dict(request.loss_fn_config)
    for key, value in request.loss_fn_config_v2.items():  # v2 wins: it also carries strings
        config[key] = value.text if value.WhichOneof("value") == "text" else value.number
    data = [_datum(d, i) for i, d in enumerate(request.data)]
    return ForwardBackwardCall(
        model_id=request.model_id,
        seq_id=request.seq_id,
        loss_fn=request.loss_fn,
        loss_fn_config=config,
        forward_only=request.forward_only,
        data=data,
    )


def _datum(datum: Any, index: int) -> Datum:
    tokens: list[int] = []
    for chunk in datum.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise InvalidInputError(
                f"data[{index}].model_input", f"{kind} chunks are not supported; send encoded text tokens"
            )
        tokens.extend(np.frombuffer(chunk.encoded_text.tokens, dtype="<i4").tolist())
    inputs = {
        name: decode_tensor(tensor, f"data[{index}].loss_fn_inputs.{name}")
        for name, tensor in datum.loss_fn_inputs.items()
    }
    return Datum(tokens=tokens, loss_inputs=inputs)


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


def encode_sample_response(result: Mapping[str, Any]) -> bytes:
    """A `SampleResponse` from the service's sample result (`sequences`, optional `prompt_logprobs`)."""
    response = pb.SampleResponse()
    for seq in result["sequences"]:
        response.sequences.append(
            pb.SampledSequence(
                stop_reason=pb.STOP_REASON_LENGTH if seq["stop_reason"] == "length" else pb.STOP_REASON_STOP,
                tokens=np.asarray(seq["tokens"], dtype="<i4").tobytes(),
                logprobs=np.asarray(seq["logprobs"], dtype="<f4").tobytes(),
            )
        )
    prompt_logprobs = result.get("prompt_logprobs")
    if prompt_logprobs is not None:
        values = [math.nan if v is None else v for v in prompt_logprobs]
        response.prompt_logprobs = np.asarray(values, dtype="<f4").tobytes()
    return response.SerializeToString()


# --- sampling ----------------------------------------------------------------------------------------


def prompt_tokens(prompt: Mapping[str, Any]) -> list[int]:
    """The token ids of a JSON `ModelInput` (encoded text chunks only)."""
    tokens: list[int] = []
    for i, chunk in enumerate(prompt.get("chunks", [])):
        if chunk.get("type", "encoded_text") != "encoded_text":
            raise InvalidInputError(f"prompt.chunks[{i}]", f"{chunk.get('type')} chunks are not supported")
        tokens.extend(int(t) for t in chunk.get("tokens", []))
    if not tokens:
        raise InvalidInputError("prompt", "the prompt has no tokens")
    return tokens


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


# --- ids, LoRA configs and checkpoint paths -----------------------------------------------------------


def model_id(session_id: str, model_seq_id: int) -> str:
    """The SDK's own format for a training model's id (it derives it client-side for create-via-load)."""
    return f"{session_id}:train:{model_seq_id}"


def sampling_session_id(session_id: str, seq_id: int) -> str:
    return f"{session_id}:sample:{seq_id}"


def lora_target_modules(default_targets: Sequence[str], *, attn: bool, mlp: bool) -> list[str] | None:
    """target_modules for Tinker's train_attn/train_mlp flags, from the model's default LoRA layer paths.

    None (the family default) when both are on; otherwise the `<parent>.<layer>` suffixes of the chosen half.
    """
    if attn and mlp:
        return None
    if not (attn or mlp):
        raise InvalidInputError("lora_config", "train_attn and train_mlp are both false: nothing to train")
    wanted = _ATTENTION_PARTS if attn else _MLP_PARTS
    suffixes = sorted(
        {
            ".".join(path.split(".")[-2:])
            for path in default_targets
            if any(part in wanted for part in path.split(".")[-2].lower().split("_"))
            or path.split(".")[-2].lower() in wanted
        }
    )
    if not suffixes:
        which = "attention" if attn else "MLP"
        raise InvalidInputError("lora_config", f"this model has no {which} layers LoRA can target")
    return suffixes


def tinker_path(run_id: str, kind: str, name: str) -> str:
    return f"tinker://{run_id}/{kind}/{name}"


def check_name(name: str) -> str:
    if not _SAFE_NAME.match(name):
        raise InvalidInputError("path", f"checkpoint name {name!r} must match {_SAFE_NAME.pattern}")
    return name


def native_checkpoint_name(kind: str, name: str) -> str:
    """The native checkpoint name of `tinker://<run>/<kind>/<name>`: weights keep their name."""
    return name if kind == "weights" else f"{kind}.{name}"


def parse_tinker_path(path: str) -> tuple[str, str, str]:
    """(run id, native checkpoint name, kind) of `tinker://<run>/<weights|sampler_weights>/<name>`."""
    match = _TINKER_PATH.match(path)
    if match is None or match.group(2) not in _CHECKPOINT_KINDS:
        raise InvalidInputError("path", f"{path!r} is not tinker://<run>/<weights|sampler_weights>/<name>")
    run_id, kind, name = match.groups()
    return run_id, native_checkpoint_name(kind, name), kind


# --- REST (RestClient): checkpoints and training runs as the SDK's models ---------------------------------

_CHECKPOINT_TYPES = {"weights": "training", "sampler_weights": "sampler"}
_SAMPLER_PREFIX = "sampler_weights."


def parse_checkpoint_id(run_id: str, checkpoint_id: str) -> tuple[str, str]:
    """(native checkpoint name, tinker path) of a REST `checkpoint_id` such as `weights/ckpt-1`."""
    path = f"tinker://{run_id}/{checkpoint_id}"
    _, name, _ = parse_tinker_path(path)
    return name, path


def checkpoint_id(native_name: str) -> str:
    """The REST `checkpoint_id` (`<kind>/<name>`) of a native checkpoint name."""
    if native_name.startswith(_SAMPLER_PREFIX):
        return f"sampler_weights/{native_name.removeprefix(_SAMPLER_PREFIX)}"
    return f"weights/{native_name}"


def iso_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat()


def rest_checkpoint(
    run_id: str, native_name: str, created_at: float, size_bytes: int, meta: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A `types.Checkpoint`; `meta` holds what REST set on it (`public`, `expires_at` in Unix seconds)."""
    ckpt_id = checkpoint_id(native_name)
    meta = meta or {}
    expires_at = meta.get("expires_at")
    return {
        "checkpoint_id": ckpt_id,
        "checkpoint_type": _CHECKPOINT_TYPES[ckpt_id.split("/", 1)[0]],
        "time": iso_time(created_at),
        "tinker_path": f"tinker://{run_id}/{ckpt_id}",
        "size_bytes": size_bytes,
        "public": bool(meta.get("public", False)),
        "expires_at": None if expires_at is None else iso_time(expires_at),
    }


def rest_training_run(
    run_id: str,
    base_model: str,
    owner: str | None,
    lora_rank: int,
    last_request_time: float,
    checkpoints: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A `types.TrainingRun`; `checkpoints` are `rest_checkpoint`s of the run, oldest first."""

    def last(kind: str) -> Mapping[str, Any] | None:
        return next((c for c in reversed(checkpoints) if c["checkpoint_type"] == kind), None)

    return {
        "training_run_id": run_id,
        "base_model": base_model,
        "model_owner": owner or "local",
        "is_lora": True,
        "corrupted": False,
        "lora_rank": lora_rank,
        "last_request_time": iso_time(last_request_time),
        "last_checkpoint": last("training"),
        "last_sampler_checkpoint": last("sampler"),
    }


def cursor(offset: int, limit: int, total: int) -> dict[str, int]:
    return {"offset": offset, "limit": limit, "total_count": total}
