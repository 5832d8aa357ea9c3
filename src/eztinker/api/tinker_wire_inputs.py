"""Tinker's model inputs and tensors, decoded (`eztinker.api.tinker_wire`): `ModelInput` chunks (token
lists and images, protobuf or JSON) and `TensorData` (dense or sparse CSR, protobuf or JSON).
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from eztinker.api import tinker_public_pb2 as pb
from eztinker.engine.errors import InvalidInputError
from eztinker.engine.types import ImageChunk

_NP_DTYPES = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}

Chunk = list[int] | ImageChunk
"""A model input chunk, decoded: a list of token ids, or an image (its bytes and format)."""


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
