"""Engine results in Tinker's wire formats (`eztinker.api.tinker_wire`): `ForwardBackwardOutput` and
`SampleResponse`, as protobuf (SDK >= 0.25) or JSON (older SDKs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from eztinker.api import tinker_public_pb2 as pb
from eztinker.engine.types import SampleResult


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
