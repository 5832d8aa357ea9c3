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
            chunks.append(_token_ids(chunk.get("tokens", []), f"{where}.tokens"))
        elif kind == "image":
            chunks.append(_json_image(chunk, where))
        elif kind == "image_asset_pointer":
            raise InvalidInputError(where, _POINTER_REFUSAL)
        else:
            raise InvalidInputError(where, f"{kind} chunks are not supported; send text tokens or images")
    if not any(chunk for chunk in chunks):
        raise InvalidInputError(field, "has no tokens")
    return chunks


def _token_ids(tokens: Any, where: str) -> list[int]:
    """A JSON token list: integers only (a float, a string or a nested list is refused, not truncated)."""
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and -(2**63) <= t < 2**63 for t in tokens
    ):
        raise InvalidInputError(where, "must be a list of token ids (integers)")
    return tokens


def tensor_shape(shape: Any, field: str) -> list[int]:
    """A JSON `TensorData`'s `shape`: a list of non-negative integers."""
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInputError(field, f"shape must be a list of non-negative integers, got {shape!r}")
    return shape


def json_values(data: Any, dtype: type, field: str) -> np.ndarray:
    """A JSON `TensorData`'s `data` as a flat array of `dtype` (values that are not numbers of that kind
    are refused, naming the field)."""
    if not isinstance(data, list):
        raise InvalidInputError(field, "data must be a list of numbers")
    try:
        return np.asarray(data, dtype=dtype).reshape(-1) if data else np.zeros(0, dtype=dtype)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInputError(
            field, f"data must be a flat list of {np.dtype(dtype).name} numbers"
        ) from None


MAX_DENSE_ELEMENTS = (
    2**25
)  # a sparse tensor made dense: ~32M values at most (top-k targets of long sequences)


def csr_to_dense(shape: list[int], crow: Any, col: Any, values: np.ndarray, field: str) -> np.ndarray:
    """A 2-D CSR tensor (`crow` row offsets, `col` column of each value) as a dense array, its layout
    checked first and its dense size bounded, so no layout makes the server index out of bounds or
    allocate without end."""
    if len(shape) != 2:
        raise InvalidInputError(field, "a sparse tensor needs a 2-D shape")
    if math.prod(shape) > MAX_DENSE_ELEMENTS:
        raise InvalidInputError(field, f"shape {shape} is too large (at most {MAX_DENSE_ELEMENTS} values)")
    try:
        crow_a, col_a = (
            np.asarray(crow, dtype=np.int64).reshape(-1),
            np.asarray(col, dtype=np.int64).reshape(-1),
        )
    except (ValueError, TypeError, OverflowError):
        raise InvalidInputError(
            field, "sparse_crow_indices / sparse_col_indices must be lists of integers"
        ) from None
    valid = (
        crow_a.size == shape[0] + 1
        and col_a.size == values.size
        and crow_a[0] == 0
        and crow_a[-1] == values.size
        and bool(np.all(np.diff(crow_a) >= 0))
        and bool(np.all((col_a >= 0) & (col_a < shape[1])))
    )
    if not valid:
        raise InvalidInputError(field, "sparse_crow_indices / sparse_col_indices are not a valid CSR layout")
    dense = np.zeros(shape, dtype=values.dtype)
    dense[np.repeat(np.arange(shape[0]), np.diff(crow_a)), col_a] = values
    return dense


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
    values = json_values(tensor["data"], dtype, field)
    shape = tensor_shape(tensor.get("shape") or [values.size], field)
    crow, col = tensor.get("sparse_crow_indices"), tensor.get("sparse_col_indices")
    if crow is not None and col is not None:
        return torch.from_numpy(csr_to_dense(shape, crow, col, values, field))
    if math.prod(shape) != values.size:
        raise InvalidInputError(field, f"has {values.size} values for shape {shape}")
    return torch.from_numpy(values.reshape(shape))


def decode_tensor(tensor: Any, field: str) -> torch.Tensor:
    """A proto `Tensor` (dense or CSR, float32/int64/int32/bfloat16) as a torch tensor of its shape."""
    shape = list(tensor.shape)
    try:
        if tensor.dtype == pb.DTYPE_BFLOAT16:
            raw = np.frombuffer(_tensor_values(tensor), dtype="<u2").astype(np.uint32) << 16
            values = raw.view(np.float32)
        elif tensor.dtype in _NP_DTYPES:
            values = np.frombuffer(
                _tensor_values(tensor), dtype=np.dtype(_NP_DTYPES[tensor.dtype]).newbyteorder("<")
            )
        else:
            raise InvalidInputError(field, f"unsupported tensor dtype {tensor.dtype}")
    except ValueError:  # bytes that are not a whole number of values
        raise InvalidInputError(field, "its bytes are not a whole number of values of its dtype") from None
    if tensor.dtype == pb.DTYPE_INT32:
        values = values.astype(np.int64)
    if tensor.WhichOneof("encoding") == "sparse_csr":
        csr = tensor.sparse_csr
        crow, col = _int64s(csr.crow_indices, field), _int64s(csr.col_indices, field)
        return torch.from_numpy(csr_to_dense(shape, crow, col, values, field))
    if not shape:
        shape = [values.size]
    if math.prod(shape) != values.size:
        raise InvalidInputError(field, f"has {values.size} values for shape {shape}")
    return torch.from_numpy(values.copy().reshape(shape))


def _int64s(raw: bytes, field: str) -> np.ndarray:
    if len(raw) % 8:
        raise InvalidInputError(field, "sparse indices must be little-endian int64s")
    return np.frombuffer(raw, dtype="<i8")


def _tensor_values(tensor: Any) -> bytes:
    return tensor.sparse_csr.values if tensor.WhichOneof("encoding") == "sparse_csr" else tensor.dense
