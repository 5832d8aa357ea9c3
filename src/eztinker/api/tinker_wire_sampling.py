"""An `asample` body (sample and compute_logprobs) as the engine's `SampleRequest` (`eztinker.api.tinker_wire`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from eztinker.api.tinker_wire_inputs import _flat, model_input_chunks
from eztinker.engine import SamplingParams
from eztinker.engine.errors import InvalidInputError
from eztinker.engine.sampler import SampleRequest


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
