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
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from transformers import DynamicCache

from eztinker.engine import caches, vision
from eztinker.engine.errors import InvalidInputError, NotFoundError
from eztinker.engine.lora import Segment, _to_device, routed
from eztinker.engine.model import BaseModel
from eztinker.engine.types import (
    ImageChunk,
    PromptAltTokens,
    SampledSequence,
    SampleResult,
    SamplingParams,
    TopLogprobs,
)

MAX_NUM_SAMPLES = 256  # per request: more is almost surely a client bug, and one request could hog the GPU
_UNIFORM_BLOCK = 64  # uniforms a row draws at a time: a fixed size keeps its stream batch-independent
_MIN_TEMPERATURE = 1e-5  # below this, logits / T overflows float32: sample greedily instead
MAX_TOP_K = 1000  # top-k log-probabilities / alternative draws per position: bounds the result's size


TokenCallback = Callable[[int, int, float, "TopLogprobs | None", bool], None]


@dataclass(frozen=True)
class SampleRequest:
    prompt: list[int]
    params: SamplingParams
    num_samples: int = 1
    adapter: str | None = None  # a run id or sampler id whose adapter serves this request; None = bare base
    prompt_logprobs: bool = False
    topk_sample_logprobs: int = 0  # top-k (id, logprob) at every sampled position of every sample
    topk_prompt_logprobs: int = 0  # top-k (id, logprob) at every prompt position after the first
    prompt_logprobs_last_n: int | None = None  # score only the last N prompt positions (None: all)
    # (P-1, K) token ids whose log-probabilities to return at prompt positions 1..P-1; -1 asks nothing
    target_prompt_tokens: torch.Tensor | Sequence[Sequence[int]] | None = None
    prompt_alt_tokens_k: int = 0  # draws per prompt position after the first, at the request's temperature
    stop_at_eos: bool = False  # also stop at the model's EOS when `params.stop` names strings or ids
    # Called on the sampling thread as each token is chosen, for streaming: (sample index, token, logprob,
    # its top-k or None, finished?). It must be quick and must not raise.
    on_token: TokenCallback | None = field(default=None, compare=False)
    # Polled on the sampling thread after each token: once it returns True the request's rows end, cut
    # short (stop reason "length") — e.g. when the client of a stream has hung up. It must be quick.
    cancelled: Callable[[], bool] | None = field(default=None, compare=False)
    # The prompt's images (vision-language models), in order; `prompt` holds each one as a run of image
    # placeholder tokens (`eztinker.engine.vision.expand_chunks`).
    images: Sequence[ImageChunk] = ()

    @property
    def wants_prompt(self) -> bool:
        """Whether the request needs the logits of every prompt position (not only the last one)."""
        return (
            self.prompt_logprobs
            or self.topk_prompt_logprobs > 0
            or self.target_prompt_tokens is not None
            or self.prompt_alt_tokens_k > 0
        )


@dataclass(frozen=True)
class SamplerLimits:
    """How big the running batch may get; rows beyond it wait until finished rows make room.

    The KV cache is sized for the worst case (every row runs to its `max_tokens`). The prefill is one
    forward over every padded prompt of the group, and it keeps logits for every prompt position only
    when some row asked for prompt log-probabilities.
    """

    max_rows: int = 256
    kv_cache_bytes: int | None = None  # None: half the free memory of a CUDA device, else 4 GiB
    prefill_tokens: int = 2**17  # padded prompt tokens B·P in the prefill forward (activation memory)
    logits_elements: int = 2**28  # prefill logits B·P·V when prompt log-probabilities are asked for


@dataclass(frozen=True)
class _Stops:
    """When a row ends early: on one of `token_ids`, or once the completion text contains a string."""

    token_ids: frozenset[int]
    strings: tuple[str, ...] = ()
    window: int = 0  # trailing tokens to decode when looking for a stop string


@dataclass
class _Row:
    """One sample of one request, and what has been generated for it so far."""

    request: int
    sample: int
    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    max_new: int
    stops: _Stops
    generator: torch.Generator
    prompt_request: SampleRequest | None  # set on one row per request that asked for prompt extras
    images: tuple[ImageChunk, ...] = ()  # the prompt's images (vision-language models)
    topk: int = 0  # top-k log-probabilities to keep at each sampled position
    on_token: TokenCallback | None = None
    cancelled: Callable[[], bool] | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk_logprobs: list[TopLogprobs] = field(default_factory=list)
    stop_reason: Literal["stop", "length"] | None = None
    extras: _PromptExtras | None = None  # what `prompt_request` asked about the prompt
    uniforms: list[float] = field(default_factory=list)  # the current block of this row's uniform draws


@dataclass
class _PromptExtras:
    """What a request asked for about its prompt, all from the prefill's logits."""

    logprobs: list[float | None] | None = None
    topk: list[TopLogprobs | None] | None = None
    targets: list[list[float]] | None = None
    alt_tokens: PromptAltTokens | None = None


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


# --- checking input ------------------------------------------------------------------------------


def _make_rows(base: BaseModel, requests: Sequence[SampleRequest]) -> list[_Row]:
    """Validate every request, then expand it into rows, grouped contiguously by adapter."""
    rows: list[_Row] = []
    for i, request in enumerate(requests):
        where = f"requests[{i}]." if len(requests) > 1 else ""
        prompt, max_new, stops = _check_request(base, request, where)
        seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
        rows += [
            _Row(
                request=i,
                sample=j,
                prompt=prompt,
                adapter=request.adapter,
                params=request.params,
                max_new=max_new,
                stops=stops,
                generator=torch.Generator().manual_seed(_row_seed(seed, j)),
                prompt_request=request if request.wants_prompt and j == 0 else None,
                topk=request.topk_sample_logprobs,
                on_token=request.on_token,
                cancelled=request.cancelled,
                images=tuple(request.images),
            )
            for j in range(request.num_samples)
        ]
    first_seen = {adapter: k for k, adapter in reversed(list(enumerate(r.adapter for r in rows)))}
    return sorted(rows, key=lambda r: first_seen[r.adapter])  # stable: request order within an adapter


def _check_request(base: BaseModel, request: SampleRequest, where: str) -> tuple[list[int], int, _Stops]:
    """(prompt ids, tokens to sample at most, stop rule) of a valid request; raise on a bad one."""
    prompt = _check_prompt(base, request.prompt, f"{where}prompt")
    num_samples = request.num_samples
    if not isinstance(num_samples, int) or not 1 <= num_samples <= MAX_NUM_SAMPLES:
        raise InvalidInputError(f"{where}num_samples", f"{num_samples!r} is not in 1..{MAX_NUM_SAMPLES}")
    _check_adapter(base, request.adapter, f"{where}adapter")
    params = request.params
    _check_sampling_params(params, f"{where}sampling_params")
    _check_extras(base, request, len(prompt), where)
    vision.check_images(base, prompt, tuple(request.images), where.rstrip("."), tokens_field="prompt")
    max_new = _max_new_tokens(base, len(prompt), params.max_tokens, where)
    stops = _parse_stop(base, params.stop, f"{where}sampling_params.stop")
    if request.stop_at_eos:
        stops = replace(stops, token_ids=stops.token_ids | frozenset(base.eos_token_ids))
    return prompt, max_new, stops


def _check_prompt(base: BaseModel, prompt: Sequence[int], field: str) -> list[int]:
    """The prompt as plain ints; an out-of-vocabulary id would crash the embedding lookup mid-batch."""
    try:
        ids = [operator.index(t) for t in prompt]
    except TypeError as exc:
        raise InvalidInputError(field, "must be a list of integer token ids") from exc
    if not ids:
        raise InvalidInputError(field, "is empty: send at least one token")
    low, high = min(ids), max(ids)
    if low < 0:
        raise InvalidInputError(field, f"token id {low} is negative")
    if high >= base.vocab_size:
        raise InvalidInputError(field, f"token id {high} is out of the vocabulary (size {base.vocab_size})")
    return ids


def _check_adapter(base: BaseModel, adapter: str | None, field: str) -> None:
    """An unknown adapter would silently sample from the bare base model: refuse it instead."""
    if adapter is not None and not any(adapter in layer.adapters for layer in base.lora_layers.values()):
        raise NotFoundError(f"{field}: no run or sampler {adapter!r} on base model {base.name!r}")


def _check_sampling_params(params: SamplingParams, where: str) -> None:
    temperature, top_p, top_k = params.temperature, params.top_p, params.top_k
    if not isinstance(temperature, int | float) or not math.isfinite(temperature) or temperature < 0:
        raise InvalidInputError(f"{where}.temperature", f"{temperature!r} must be a finite number >= 0")
    if not isinstance(top_p, int | float) or not 0 < top_p <= 1:  # NaN fails the comparison too
        raise InvalidInputError(f"{where}.top_p", f"{top_p!r} must be in (0, 1]")
    if not isinstance(top_k, int) or top_k == 0 or top_k < -1:
        raise InvalidInputError(f"{where}.top_k", f"{top_k!r} must be -1 (no limit) or >= 1")
    if params.seed is not None and not isinstance(params.seed, int):
        raise InvalidInputError(f"{where}.seed", f"{params.seed!r} must be an integer or null")


def _check_extras(base: BaseModel, request: SampleRequest, prompt_len: int, where: str) -> None:
    """Top-k sizes, `prompt_logprobs_last_n` and `target_prompt_tokens` of a request, checked before compute."""
    for name in ("topk_sample_logprobs", "topk_prompt_logprobs", "prompt_alt_tokens_k"):
        k = getattr(request, name)
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_TOP_K:
            raise InvalidInputError(f"{where}{name}", f"{k!r} must be an integer in 0..{MAX_TOP_K}")
    last_n = request.prompt_logprobs_last_n
    if last_n is not None:
        if not (request.prompt_logprobs or request.topk_prompt_logprobs):
            raise InvalidInputError(
                f"{where}prompt_logprobs_last_n", "applies to prompt logprobs: set prompt_logprobs too"
            )
        if not isinstance(last_n, int) or not 1 <= last_n <= prompt_len - 1:
            raise InvalidInputError(
                f"{where}prompt_logprobs_last_n",
                f"{last_n!r} must be in 1..{prompt_len - 1} (prompt length - 1)",
            )
    if request.target_prompt_tokens is not None:
        _check_targets(base, request.target_prompt_tokens, prompt_len, f"{where}target_prompt_logprobs")


def _check_targets(
    base: BaseModel, targets: torch.Tensor | Sequence[Sequence[int]], prompt_len: int, field: str
) -> None:
    """A (P-1, K) table of token ids, -1 meaning "nothing asked here"."""
    try:
        table = torch.as_tensor(targets, dtype=torch.long)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidInputError(field, f"must be a 2-D table of integer token ids: {exc}") from None
    if table.dim() != 2 or table.shape[0] != prompt_len - 1:
        raise InvalidInputError(field, f"has shape {list(table.shape)}; expected [{prompt_len - 1}, K]")
    if table.numel() and (table.min() < -1 or table.max() >= base.vocab_size):
        raise InvalidInputError(field, f"token ids must be -1 (none) or in [0, {base.vocab_size})")


def _max_new_tokens(base: BaseModel, prompt_len: int, max_tokens: int | None, where: str) -> int:
    """How many tokens a row may sample: `max_tokens`, or (None) up to the end of the model's context."""
    room = base.max_length - prompt_len
    if max_tokens is None:
        if room < 1:
            raise InvalidInputError(
                f"{where}prompt", f"has {prompt_len} tokens: no room left in the context of {base.max_length}"
            )
        return room
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidInputError(f"{where}sampling_params.max_tokens", f"{max_tokens!r} must be >= 1")
    if max_tokens > room:
        raise InvalidInputError(
            f"{where}sampling_params.max_tokens",
            f"prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds the model's context of {base.max_length}",
        )
    return max_tokens


def _parse_stop(base: BaseModel, stop: object, field: str) -> _Stops:
    """None: the model's EOS; []: never stop early; ints: stop token ids; str(s): stop strings."""
    if stop is None:
        return _Stops(frozenset(base.eos_token_ids))
    items = [stop] if isinstance(stop, str | int) else stop
    if not isinstance(items, Sequence):
        raise InvalidInputError(field, "must be a string, a list of strings or a list of token ids")
    strings = [s for s in items if isinstance(s, str)]
    ids = [t for t in items if isinstance(t, int) and not isinstance(t, bool)]
    if len(strings) + len(ids) != len(items):
        raise InvalidInputError(field, "must be a string, a list of strings or a list of token ids")
    if strings and ids:
        raise InvalidInputError(field, "mixes strings and token ids; use one kind")
    if any(not s for s in strings):
        raise InvalidInputError(field, "contains an empty string, which would stop at once")
    if ids and not (min(ids) >= 0 and max(ids) < base.vocab_size):
        raise InvalidInputError(field, f"token ids must be in [0, {base.vocab_size})")
    if not strings:
        return _Stops(frozenset(ids))
    # Every token decodes to at least one byte, so a stop string of n bytes lies in the last n tokens;
    # the margin covers a multi-byte character cut at the start of the window.
    window = 2 * max(len(s.encode("utf-8")) for s in strings) + 8
    return _Stops(frozenset(), tuple(strings), window)


def _row_seed(seed: int, sample: int) -> int:
    """A 63-bit seed for sample `sample` of a request seeded `seed` (SplitMix64: nearby inputs decorrelate)."""
    mask = 2**64 - 1
    z = (seed * 0x9E3779B97F4A7C15 + (sample + 1) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1


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


def _temperature(params: SamplingParams) -> float:
    return 0.0 if params.temperature < _MIN_TEMPERATURE else float(params.temperature)


# --- choosing tokens -----------------------------------------------------------------------------


def _choose_tokens(logits_BV: torch.Tensor, batch: _Batch, u_B: torch.Tensor) -> torch.Tensor:
    """Each row's next token: argmax where temperature is 0, else a draw from its filtered distribution."""
    greedy_B = logits_BV.argmax(dim=-1)
    if all(_temperature(r.params) == 0 for r in batch.rows):
        return greedy_B
    is_greedy_B = batch.temperature == 0
    scaled_BV = logits_BV / torch.where(is_greedy_B, 1.0, batch.temperature)[:, None]
    if any(r.params.top_k > 0 or r.params.top_p < 1 for r in batch.rows):
        scaled_BV = _filter_top_k_top_p(scaled_BV, batch.top_k, batch.top_p)
    sampled_B = _inverse_cdf(torch.softmax(scaled_BV, dim=-1), u_B)
    return torch.where(is_greedy_B, greedy_B, sampled_B)


def _filter_top_k_top_p(
    scaled_BV: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor
) -> torch.Tensor:
    """Set to -inf every token outside a row's top k, then outside its top-p nucleus (vLLM's order).

    A row with top_k = -1 and top_p = 1 keeps every token, so its result does not depend on whether
    other rows in the batch filter.
    """
    V = scaled_BV.shape[-1]
    sorted_BV, order_BV = scaled_BV.sort(dim=-1, descending=True, stable=True)
    k_B = torch.where(top_k_B < 0, V, top_k_B)
    drop_BV = torch.arange(V, device=scaled_BV.device)[None, :] >= k_B[:, None]
    probs_BV = torch.softmax(sorted_BV.masked_fill(drop_BV, -math.inf), dim=-1)
    mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV
    drop_BV |= (mass_before_BV >= top_p_B[:, None]) & (top_p_B < 1)[:, None]
    drop_vocab_BV = torch.zeros_like(drop_BV).scatter(-1, order_BV, drop_BV)
    return scaled_BV.masked_fill(drop_vocab_BV, -math.inf)


def _inverse_cdf(probs_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """The token where each row's cumulative probability first reaches u·total (u in (0, 1])."""
    cdf_BV = probs_BV.double().cumsum(dim=-1)
    target_B1 = (u_B * cdf_BV[:, -1])[:, None]
    tokens_B = torch.searchsorted(cdf_BV, target_B1).squeeze(-1).clamp(max=probs_BV.shape[-1] - 1)
    # A parallel scan may round so that a zero-probability token ties its predecessor: never pick one.
    impossible_B = probs_BV.gather(-1, tokens_B[:, None]).squeeze(-1) <= 0
    return torch.where(impossible_B, probs_BV.argmax(dim=-1), tokens_B)


def _token_logprobs(logits_BV: torch.Tensor, tokens_B: torch.Tensor) -> torch.Tensor:
    """log-softmax of the raw logits at the chosen tokens, in float32 (training's formula, not the sampler's)."""
    picked_B = logits_BV.gather(-1, tokens_B[:, None]).squeeze(-1)
    return picked_B - torch.logsumexp(logits_BV, dim=-1)


def _top_logprobs(logits_NV: torch.Tensor, k: int) -> list[TopLogprobs]:
    """The k most likely (token id, log-probability) pairs of each row, from raw logits (temperature 1)."""
    ids_Nk, values_Nk = _top_logprobs_device(logits_NV, k)
    return [
        list(zip(ids, values, strict=True))
        for ids, values in zip(ids_Nk.tolist(), values_Nk.tolist(), strict=True)
    ]


def _top_logprobs_device(logits_NV: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, log-probabilities), each (N, min(k, V)), of each row's k most likely tokens, on the device."""
    logprobs_NV = logits_NV.float().log_softmax(dim=-1)
    values_Nk, ids_Nk = logprobs_NV.topk(min(k, logprobs_NV.shape[-1]), dim=-1)
    return ids_Nk, values_Nk


def _top_pairs(ids: list[float], values: list[float], rows: int) -> list[TopLogprobs]:
    """`_top_logprobs`' lists from the flat host copies of `_top_logprobs_device`'s two tensors."""
    k = len(ids) // rows if rows else 0
    return [
        [(int(i), v) for i, v in zip(ids[b * k : (b + 1) * k], values[b * k : (b + 1) * k], strict=True)]
        for b in range(rows)
    ]


def _prompt_extras(logits_TV: torch.Tensor, request: SampleRequest) -> _PromptExtras:
    """A request's prompt extras from the logits at prompt positions 0..n-2 (each predicts the next token)."""
    prompt = request.prompt
    logits_TV = logits_TV.float()
    skipped = len(prompt) - request.prompt_logprobs_last_n if request.prompt_logprobs_last_n else 1
    extras = _PromptExtras()
    if request.prompt_logprobs:
        scored = _prompt_logprobs_from(logits_TV, list(prompt))
        extras.logprobs = [None] * skipped + scored[skipped:]
    if request.topk_prompt_logprobs:
        top = _top_logprobs(logits_TV[skipped - 1 :], request.topk_prompt_logprobs) if len(prompt) > 1 else []
        extras.topk = [None] * skipped + list(top)
    if request.target_prompt_tokens is not None:
        extras.targets = _target_logprobs(logits_TV, request.target_prompt_tokens)
    if request.prompt_alt_tokens_k:
        extras.alt_tokens = _alt_tokens(logits_TV, request)
    return extras


def _target_logprobs(
    logits_TV: torch.Tensor, targets: torch.Tensor | Sequence[Sequence[int]]
) -> list[list[float]]:
    """log p(targets[i][j]) at prompt position i+1 (from the logits at i); 0.0 where the id is -1."""
    if logits_TV.shape[0] == 0:
        return []
    targets_TK = torch.as_tensor(targets, dtype=torch.long, device=logits_TV.device).reshape(
        logits_TV.shape[0], -1
    )
    logprobs_TV = logits_TV.log_softmax(dim=-1)
    picked_TK = logprobs_TV.gather(-1, targets_TK.clamp(min=0))
    return picked_TK.masked_fill(targets_TK < 0, 0.0).tolist()


def _alt_tokens(logits_TV: torch.Tensor, request: SampleRequest) -> PromptAltTokens:
    """k draws per prompt position at the request's temperature, top-k and top-p, from a generator of their own."""
    k, params = request.prompt_alt_tokens_k, request.params
    T = logits_TV.shape[0]
    if T == 0:
        return PromptAltTokens(tokens=[], logprobs=[])
    temperature = _temperature(params)
    if temperature == 0:
        tokens_Tk = logits_TV.argmax(dim=-1, keepdim=True).expand(T, k)
    else:
        scaled_TV = logits_TV / temperature
        if params.top_k > 0 or params.top_p < 1:
            top_k_T = torch.full((T,), params.top_k, device=logits_TV.device)
            top_p_T = torch.full((T,), float(params.top_p), device=logits_TV.device)
            scaled_TV = _filter_top_k_top_p(scaled_TV, top_k_T, top_p_T)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator = torch.Generator().manual_seed(_row_seed(seed, -1))  # apart from every sample's stream
        u_Tk = 1.0 - torch.rand(T, k, generator=generator, dtype=torch.float64)
        cdf_TV = torch.softmax(scaled_TV, dim=-1).double().cumsum(dim=-1)
        target_Tk = u_Tk.to(logits_TV.device) * cdf_TV[:, -1:]
        tokens_Tk = torch.searchsorted(cdf_TV, target_Tk).clamp(max=logits_TV.shape[-1] - 1)
    logprobs_Tk = logits_TV.log_softmax(dim=-1).gather(-1, tokens_Tk)
    return PromptAltTokens(tokens=tokens_Tk.tolist(), logprobs=logprobs_Tk.tolist())


def _prompt_logprobs_from(logits_TV: torch.Tensor, prompt: list[int]) -> list[float | None]:
    """[None, log p(prompt[1]), ...] from the logits at prompt positions 0..n-2."""
    logits_TV = logits_TV.float()
    targets_T = torch.tensor(prompt[1:], device=logits_TV.device)
    return [None, *_token_logprobs(logits_TV, targets_T).tolist()]


# --- stopping and results ------------------------------------------------------------------------


def _record(
    base: BaseModel,
    rows: list[_Row],
    tokens: list[int],
    logprobs: list[float],
    topk: list[TopLogprobs] | None = None,
) -> list[bool]:
    """Append each row's new token; return which rows are now finished (and set their stop reason)."""
    done = []
    for b, (row, token, logprob) in enumerate(zip(rows, tokens, logprobs, strict=True)):
        row.tokens.append(token)
        row.logprobs.append(logprob)
        if row.topk and topk is not None:
            row.topk_logprobs.append(topk[b][: row.topk])
        if token in row.stops.token_ids or _hit_stop_string(base, row):
            row.stop_reason = "stop"
        elif len(row.tokens) >= row.max_new or (row.cancelled is not None and row.cancelled()):
            row.stop_reason = "length"
        done.append(row.stop_reason is not None)
        if row.on_token is not None:
            top = row.topk_logprobs[-1] if row.topk and topk is not None else None
            row.on_token(row.sample, token, logprob, top, row.stop_reason is not None)
    return done


def _hit_stop_string(base: BaseModel, row: _Row) -> bool:
    """Whether the completion text now contains a stop string (checked after every token: the first wins)."""
    if not row.stops.strings:
        return False
    text = base.tokenizer.decode(row.tokens[-row.stops.window :], skip_special_tokens=False)
    return any(s in text for s in row.stops.strings)


def _collect(num_requests: int, rows: list[_Row]) -> list[SampleResult]:
    """Regroup rows into one result per request, samples in index order."""
    by_request: list[list[_Row]] = [[] for _ in range(num_requests)]
    for row in sorted(rows, key=lambda r: (r.request, r.sample)):
        by_request[row.request].append(row)
    return [_result(request_rows) for request_rows in by_request]


def _result(rows: list[_Row]) -> SampleResult:
    prompt = rows[0].extras or _PromptExtras()
    return SampleResult(
        sequences=[
            SampledSequence(
                tokens=r.tokens,
                logprobs=r.logprobs,
                stop_reason=r.stop_reason or "length",
                topk_logprobs=r.topk_logprobs if r.topk else None,
            )
            for r in rows
        ],
        prompt_logprobs=prompt.logprobs,
        topk_prompt_logprobs=prompt.topk,
        target_prompt_logprobs=prompt.targets,
        prompt_alt_tokens=prompt.alt_tokens,
    )
