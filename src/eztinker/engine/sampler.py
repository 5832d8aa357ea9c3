"""Sampling: many requests, on any mix of adapters, in one batched generation with a KV cache.

Every request is expanded into rows (one per sample). Rows are grouped contiguously by adapter so
that one forward pass serves them all through the base model's `Routing` (adapter None is the bare
base). Prompts are left-padded to a common length, with an attention mask and explicit position ids
(cumsum of the mask − 1), so every row sees exactly the positions it would see alone: a request gives
the same tokens and log-probabilities whatever it is batched with, in every model family.

Generation runs in `engine.batcher`'s continuous batcher (this module holds the pieces it steps): a
prefill forward over left-padded prompts fills a `DynamicCache`, then one forward per step feeds each
unfinished row its last token; a finished row is dropped (its cache rows too) and new rows join at any
step. `sample_batch` runs one batcher of its own to completion; the server keeps one per base model.

Why the details are as they are:
- Returned log-probabilities are the model's raw log-softmax at temperature 1, unfiltered, in float32:
  the same numbers `forward` computes for training, which RL's importance ratios depend on.
- Randomness is per row: each row has its own `torch.Generator`, seeded from (request seed, sample
  index), from which it draws one uniform number per step. A token is picked by inverse-CDF sampling
  over that row's filtered probabilities, so a row's choice depends on its own logits and its own
  stream only: a seeded request samples the same tokens alone, batched with others, and on every call.
- Beyond the sampled tokens, a request may ask for top-k log-probabilities at each sampled position,
  and for prompt extras computed from the same prefill: prompt log-probabilities (optionally only
  the last N), top-k at each prompt position, the log-probabilities of chosen ids at each prompt
  position (`target_prompt_tokens`), and k alternative draws per prompt position. The alternatives
  come from their own generator, so asking for them never changes the sampled tokens.
- Memory is bounded by `SamplerLimits`: rows join the running batch only while its worst-case KV cache
  and their prefill fit; the others wait. Rows of one request may start at different steps; that
  changes nothing in their results. (`_row_groups` computes the same bound as static groups.)
- On CUDA the host never waits inside a step but once: each step reads its tokens, their log-probs and
  any top-k back in one copy (`_to_host`); host data goes to the device from pinned memory, queued
  (`_device_tensor`); what the attention mask looks like is known on the host (`_attended_columns`), so
  trimming reads nothing back and an all-ones mask is not passed at all (then SDPA runs its flash kernel
  and transformers skips its own host check of the mask). The one sync left inside a decode forward is
  that check when some row is left-padded.
- No CUDA graphs and no padding of decode batches to a few sizes. The KV cache is a `DynamicCache` that
  grows by one column each step and whose rows are dropped, merged and trimmed as requests come and go,
  so no two steps have the same shapes or addresses: a graph needs a static cache (preallocated rows ×
  the longest context, written in place) and a graph per (rows, length) bucket. Without graphs, eager
  kernels cost the same for any shape, so padding rows to a bucket only adds work (the lesson measured
  on a JAX peer that pads to 8 rows). What graphs would save is kernel-launch time on small models
  (decode of a 0.5B model launches ~30 kernels per layer): worth it together with a static paged cache,
  not before.

The pieces, one module per idea: `sampler_requests` (the request and row types, checking input),
`sampler_tokens` (choosing tokens, log-probabilities, prompt extras, stops and results) and this module
(the entry points, the memory bound of a row group, and the prefill and decode forwards).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from eztinker.engine import caches, vision
from eztinker.engine.errors import InvalidInputError
from eztinker.engine.lora import Segment, _to_device, routed
from eztinker.engine.model import BaseModel
from eztinker.engine.sampler_requests import _UNIFORM_BLOCK as _UNIFORM_BLOCK
from eztinker.engine.sampler_requests import (
    MAX_NUM_SAMPLES,
    MAX_TOP_K,
    SampleRequest,
    SamplerLimits,
    TokenCallback,
    _check_adapter,
    _check_prompt,
    _check_request,
    _Row,
)
from eztinker.engine.sampler_requests import _make_rows as _make_rows
from eztinker.engine.sampler_requests import _PromptExtras as _PromptExtras
from eztinker.engine.sampler_requests import _row_seed as _row_seed
from eztinker.engine.sampler_requests import _Stops as _Stops
from eztinker.engine.sampler_tokens import _choose_tokens as _choose_tokens
from eztinker.engine.sampler_tokens import _collect as _collect
from eztinker.engine.sampler_tokens import _filter_top_k_top_p as _filter_top_k_top_p
from eztinker.engine.sampler_tokens import _hit_stop_string as _hit_stop_string
from eztinker.engine.sampler_tokens import _inverse_cdf as _inverse_cdf
from eztinker.engine.sampler_tokens import _prompt_extras, _prompt_logprobs_from, _temperature
from eztinker.engine.sampler_tokens import _record as _record
from eztinker.engine.sampler_tokens import _token_logprobs as _token_logprobs
from eztinker.engine.sampler_tokens import _top_logprobs as _top_logprobs
from eztinker.engine.sampler_tokens import _top_logprobs_device as _top_logprobs_device
from eztinker.engine.sampler_tokens import _top_pairs as _top_pairs
from eztinker.engine.types import SampleResult

# `import _x as _x` above: the pieces the continuous batcher (`engine.batcher`) steps, by their names here.
__all__ = [
    "MAX_NUM_SAMPLES",
    "MAX_TOP_K",
    "SampleRequest",
    "SamplerLimits",
    "TokenCallback",
    "check_requests",
    "prompt_logprobs",
    "sample_batch",
]


# --- public API ----------------------------------------------------------------------------------


def sample_batch(
    base: BaseModel, requests: list[SampleRequest], limits: SamplerLimits | None = None
) -> list[SampleResult]:
    """Sample every request (× its `num_samples`) on a continuous batcher of its own; results in request order.

    All input is checked before any compute (`InvalidInputError` names the field). Runs under the base
    model's lock, so no training step changes an adapter half-way through a generation. Rows beyond
    `limits` wait and join the running batch as earlier rows finish.
    """
    from eztinker.engine.batcher import run_to_completion  # the batcher builds on this module

    return run_to_completion(base, requests, limits)


def check_requests(base: BaseModel, requests: Sequence[SampleRequest]) -> None:
    """Raise `InvalidInputError` / `NotFoundError` now, before any compute, if a request is bad."""
    for i, request in enumerate(requests):
        _check_request(base, request, f"requests[{i}]." if len(requests) > 1 else "")


def prompt_logprobs(base: BaseModel, tokens: list[int], adapter: str | None) -> list[float | None]:
    """log p(tokens[i] | tokens[:i]) for every position, with one forward; None at position 0."""
    ids = _check_prompt(base, tokens, "tokens")
    if len(ids) > base.max_length:
        raise InvalidInputError(
            "tokens", f"length {len(ids)} exceeds the model's context of {base.max_length}"
        )
    input_ids_1T = torch.tensor([ids], device=base.device)
    with base.lock, torch.inference_mode():
        _check_adapter(base, adapter, "adapter")
        with routed(base.routing, [Segment(adapter, 0, 1)]):
            logits_TV = base.model(input_ids=input_ids_1T, use_cache=False).logits[0]
    return _prompt_logprobs_from(logits_TV[:-1], ids)


# --- row groups ----------------------------------------------------------------------------------


def _row_groups(base: BaseModel, rows: list[_Row], limits: SamplerLimits) -> list[list[_Row]]:
    """Consecutive runs of rows whose worst-case memory fits `limits` (at least one row each)."""
    kv_tokens = _kv_cache_bytes(base, limits) // _kv_bytes_per_token(base)
    groups: list[list[_Row]] = []
    for row in rows:
        if groups and _fits(base, [*groups[-1], row], limits, kv_tokens):
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def _fits(base: BaseModel, rows: list[_Row], limits: SamplerLimits, kv_tokens: int) -> bool:
    """Whether one generation of `rows` stays within `limits` even if every row runs to `max_new`."""
    n = len(rows)
    longest_prompt = max(len(r.prompt) for r in rows)
    longest_total = max(len(r.prompt) + r.max_new for r in rows) + _state_tokens_per_row(base)
    if n > limits.max_rows or n * longest_total > kv_tokens or n * longest_prompt > limits.prefill_tokens:
        return False
    if not any(r.prompt_request is not None for r in rows):
        return True  # the prefill keeps the last position's logits only
    return n * longest_prompt * base.vocab_size <= limits.logits_elements


def _kv_cache_bytes(base: BaseModel, limits: SamplerLimits) -> int:
    if limits.kv_cache_bytes is not None:
        return limits.kv_cache_bytes
    if base.device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(base.device)
        return free // 2
    return 4 * 2**30


def _kv_bytes_per_token(base: BaseModel) -> int:
    """Bytes of KV cache per token and row, from the model config (keys + values of every attention layer;
    a hybrid model's linear-attention layers keep none)."""
    config = base.model.config.get_text_config()
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1)
    kinds = getattr(config, "layer_types", None)
    if isinstance(kinds, list | tuple) and kinds:
        layers = max(1, sum(1 for kind in kinds if "attention" in str(kind) and "linear" not in str(kind)))
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", heads)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return 2 * layers * kv_heads * head_dim * base.dtype.itemsize


def _state_tokens_per_row(base: BaseModel) -> int:
    """A row's linear-attention states (convolution + recurrent, every such layer), in KV-token equivalents:
    a fixed cost per row that the KV budget counts like that many more tokens."""
    config = base.model.config.get_text_config()
    kinds = getattr(config, "layer_types", None) or []
    linear = sum(1 for kind in kinds if str(kind) == "linear_attention")
    if not linear:
        return 0
    dk, dv = getattr(config, "linear_key_head_dim", 0), getattr(config, "linear_value_head_dim", 0)
    nk, nv = getattr(config, "linear_num_key_heads", 0), getattr(config, "linear_num_value_heads", 0)
    kernel = getattr(config, "linear_conv_kernel_dim", 4)
    conv = (2 * nk * dk + nv * dv) * kernel * base.dtype.itemsize
    recurrent = nv * dk * dv * 4  # kept in float32
    return -(-linear * (conv + recurrent) // _kv_bytes_per_token(base))


# --- generation ----------------------------------------------------------------------------------


@dataclass
class _Batch:
    """The unfinished rows of a group, and their per-row state, aligned on the batch dimension."""

    rows: list[_Row]
    cache: DynamicCache
    attention_mask: torch.Tensor  # (B, L): 0 on left padding, 1 on prompt and sampled tokens
    next_position: torch.Tensor  # (B,): the position id of each row's next token
    temperature: torch.Tensor  # (B,): 0 where the row samples greedily
    top_k: torch.Tensor  # (B,): -1 for no limit
    top_p: torch.Tensor  # (B,)

    def keep(self, keep_B: torch.Tensor, kept_rows: list[_Row]) -> None:
        """Drop finished rows, KV cache included, so they neither change nor cost compute."""
        self.rows = kept_rows
        caches.select_rows(self.cache, keep_B)
        for name in ("attention_mask", "next_position", "temperature", "top_k", "top_p"):
            setattr(self, name, getattr(self, name)[keep_B])

    @property
    def segments(self) -> list[Segment]:
        return _segments([r.adapter for r in self.rows])


def _prefill(base: BaseModel, rows: list[_Row]) -> tuple[_Batch, torch.Tensor]:
    """One forward over the left-padded prompts: the filled cache and each row's next-token logits."""
    lengths = [len(r.prompt) for r in rows]
    P = max(lengths)
    pad = base.tokenizer.pad_token_id or 0
    input_ids_BP = torch.full((len(rows), P), pad, dtype=torch.long)
    attention_mask_BP = torch.zeros((len(rows), P), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids_BP[b, P - lengths[b] :] = torch.tensor(row.prompt)
        attention_mask_BP[b, P - lengths[b] :] = 1
    position_ids_BP = (attention_mask_BP.cumsum(-1) - 1).clamp(min=0)
    full_logits = any(r.prompt_request is not None for r in rows)
    cache = DynamicCache(config=base.model.config)
    device = base.device
    input_ids, attention_mask = _to_device(input_ids_BP, device), _to_device(attention_mask_BP, device)
    images = vision.model_inputs(base, [r.images for r in rows], input_ids)
    position_ids = _to_device(position_ids_BP, device)
    next_position_B = _device_tensor(lengths, torch.long, device)
    if images:  # multimodal RoPE: an image's tokens share positions, so text continues past its length
        position_ids, next_position_B = vision.rope_positions(base, input_ids, attention_mask, images)
    with routed(base.routing, _segments([r.adapter for r in rows])):
        logits_BTV = _forward(
            base,
            input_ids=input_ids,
            attention_mask=_padding_mask(rows, attention_mask, pending=0),
            position_ids=position_ids,
            past_key_values=cache,
            keep_all_logits=full_logits,
            **images,
        )
    for b, row in enumerate(rows):
        if row.prompt_request is not None:
            row.extras = _prompt_extras(logits_BTV[b, P - lengths[b] : P - 1], row.prompt_request)
    batch = _Batch(
        rows=list(rows),
        cache=cache,
        attention_mask=attention_mask,
        next_position=next_position_B.to(device),
        temperature=_device_tensor([_temperature(r.params) for r in rows], torch.float32, device),
        top_k=_device_tensor([r.params.top_k for r in rows], torch.long, device),
        top_p=_device_tensor([float(r.params.top_p) for r in rows], torch.float32, device),
    )
    return batch, logits_BTV[:, -1].float()


def _decode_step(base: BaseModel, batch: _Batch, tokens_B: torch.Tensor) -> torch.Tensor:
    """Feed each unfinished row its last token; return the next-token logits (B, V) in float32."""
    ones_B1 = torch.ones_like(batch.attention_mask[:, :1])
    batch.attention_mask = torch.cat([batch.attention_mask, ones_B1], dim=1)
    with routed(base.routing, batch.segments):
        logits_B1V = _forward(
            base,
            input_ids=tokens_B[:, None],
            attention_mask=_padding_mask(batch.rows, batch.attention_mask, pending=1),
            position_ids=batch.next_position[:, None],
            past_key_values=batch.cache,
            keep_all_logits=False,
        )
    batch.next_position = batch.next_position + 1
    return logits_B1V[:, -1].float()


def _attended_columns(row: _Row, pending: int) -> int:
    """How many cache columns row `row` attends to (its prompt and the tokens fed so far), known on the
    host: every row's attention mask is 0s (left padding) then 1s, one column per prompt token and fed
    token. `pending`: its last sampled token is fed in the forward under way (1) or not yet (0)."""
    return len(row.prompt) + max(len(row.tokens) - 1 + pending, 0)


def _padding_mask(rows: Sequence[_Row], attention_mask: torch.Tensor, pending: int) -> torch.Tensor | None:
    """The attention mask to pass, or None when no row has left padding (a prompt of the longest length,
    rows that joined together): then SDPA gets no mask, takes its flash kernel on CUDA (which accepts
    none), and transformers skips reading the mask back to the host to find out that it is all ones (a
    sync per forward). Rows with images always pass it (their multimodal positions come from it)."""
    width = attention_mask.shape[1]
    if any(r.images for r in rows) or any(_attended_columns(r, pending) != width for r in rows):
        return attention_mask
    return None


def _device_tensor(data: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.tensor(data)` on `device`, queued behind the device's work instead of waiting for it."""
    return _to_device(torch.tensor(data, dtype=dtype), device)


def _to_host(*tensors: torch.Tensor) -> list[list[float]]:
    """The values of (device) tensors as flat Python lists, read back in one copy: each `.tolist()` of a
    CUDA tensor is a sync of its own. Everything travels as float64 (exact for token ids and float32)."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).tolist()
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()])
        start += t.numel()
    return out


def _forward(base: BaseModel, *, keep_all_logits: bool, **inputs: object) -> torch.Tensor:
    """The model's logits (B, T, V), or (B, 1, V) for the last position only where the model can skip the rest."""
    kwargs: dict[str, object] = {"use_cache": True, **inputs}
    if not keep_all_logits and _accepts_logits_to_keep(type(base.model)):
        kwargs["logits_to_keep"] = 1
    return base.model(**kwargs).logits


@functools.cache
def _accepts_logits_to_keep(model_class: type[torch.nn.Module]) -> bool:
    """Whether the model can compute the last position's logits only (most families, transformers ≥ 4.50)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def _segments(adapters: list[str | None]) -> list[Segment]:
    """Contiguous runs of rows with the same adapter, covering the whole batch."""
    segments: list[Segment] = []
    for b, adapter in enumerate(adapters):
        if segments and segments[-1].adapter == adapter:
            segments[-1].stop = b + 1
        else:
            segments.append(Segment(adapter, b, b + 1))
    return segments
