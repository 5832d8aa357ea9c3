"""An `asample` body (sample and compute_logprobs) as the engine's `SampleRequest` (`eztinker.api.tinker_wire`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from eztinker.api.tinker_wire_inputs import (
    _flat,
    csr_to_dense,
    json_values,
    model_input_chunks,
    tensor_shape,
)
from eztinker.engine import SamplingParams
from eztinker.engine.errors import InvalidInputError
from eztinker.engine.sampler import SampleRequest
from eztinker.engine.sampler_requests import MAX_TOP_K


def sample_request(body: Mapping[str, Any]) -> tuple[SampleRequest, dict[str, Any]]:
    """An `asample` body as the engine's request (its adapter is set by the service, from the sampling
    session), and what encoding its answer needs (`target_layout`, `prompt_alt_tokens_k`)."""
    echo: dict[str, Any] = {}
    targets = None
    last_n = body.get("prompt_logprobs_last_n")
    chunks = model_input_chunks(body.get("prompt") or {})
    prompt, images = _flat(chunks)
    if body.get("target_prompt_logprobs") is not None:  # rows: one per prompt position after the first
        rows = None if images else len(prompt) - 1  # (images: known once expanded; the engine checks)
        targets, echo["target_layout"] = target_prompt_tokens(body["target_prompt_logprobs"], rows)
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


def target_prompt_tokens(tensor: Any, rows: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The JSON `TensorData` of `target_prompt_logprobs` as a dense (P-1, K) id table (-1: nothing asked),
    and its layout (shape, plus CSR indices if it came sparse) so the answer can use the same one. `rows`:
    P-1 when it is known here (a prompt without images); K is at most `MAX_TOP_K`."""
    field = "target_prompt_logprobs"
    if not isinstance(tensor, Mapping):
        raise InvalidInputError(field, "must be a TensorData object {data, dtype, shape}")
    shape = tensor_shape(tensor.get("shape"), field)
    if len(shape) != 2:
        raise InvalidInputError(field, f"needs a 2-D shape [len(prompt) - 1, K], got {shape!r}")
    if rows is not None and shape[0] != rows:
        raise InvalidInputError(
            field, f"has {shape[0]} rows; the prompt has {rows} positions after its first"
        )
    if shape[1] > MAX_TOP_K:
        raise InvalidInputError(field, f"asks for {shape[1]} tokens per position; at most {MAX_TOP_K}")
    if tensor.get("dtype", "int64") != "int64":
        raise InvalidInputError(field, "must be an int64 tensor of token ids")
    data = json_values(tensor.get("data") or [], np.int64, field)
    crow, col = tensor.get("sparse_crow_indices"), tensor.get("sparse_col_indices")
    if crow is None and col is None:
        if data.size != shape[0] * shape[1]:
            raise InvalidInputError(field, f"has {data.size} values for shape {shape}")
        return torch.from_numpy(data.reshape(shape)), {"shape": list(shape)}
    filled = csr_to_dense(shape, crow or [], col or [], data + 1, field) - 1  # -1 where nothing is asked
    crow_list = np.asarray(crow or [], dtype=np.int64).tolist()
    col_list = np.asarray(col or [], dtype=np.int64).tolist()
    return torch.from_numpy(filled), {"crow": crow_list, "col": col_list, "shape": list(shape)}
