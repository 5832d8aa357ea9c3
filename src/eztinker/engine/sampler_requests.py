"""What a sampling request is (`SampleRequest`, `SamplerLimits`), the rows it expands into, and how it is
checked before any compute (`eztinker.engine.sampler`): every bad field raises `InvalidInputError` (or
`NotFoundError` for an unknown adapter) naming the field.
"""

from __future__ import annotations

import math
import operator
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch

from eztinker.engine import grammar, vision
from eztinker.engine.errors import EngineError, InvalidInputError, NotFoundError
from eztinker.engine.model import BaseModel
from eztinker.engine.types import Budget, ImageChunk, PromptAltTokens, SamplingParams, TopLogprobs

if TYPE_CHECKING:
    from llguidance import LLMatcher

MAX_NUM_SAMPLES = 256  # per request: more is almost surely a client bug, and one request could hog the GPU
_UNIFORM_BLOCK = 64  # uniforms a row draws at a time: a fixed size keeps its stream batch-independent
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
class _Section:
    """Where a row is in its `Budget`'s section: not open yet, open since token `opened_at`, or closed."""

    budget: Budget
    until_ids: list[int]
    window: int  # trailing tokens to decode when looking for `opens` / `until`
    opened_at: int | None = None
    closed: bool = False


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
    matcher: LLMatcher | None = None  # where the row is in its grammar (constrained decoding)
    grammar_ends: frozenset[int] = frozenset()  # end tokens the grammar allows that the row must not draw
    section: _Section | None = None  # its budget's section (`SamplingParams.budget`)
    forced: list[int] = field(default_factory=list)  # tokens to emit next, drawn or not (a closed budget)
    error: EngineError | None = None  # why the row ended without a result (its request fails, no other)

    def __post_init__(self) -> None:
        section = self.section
        if (
            section is not None
            and section.opened_at == 0
            and section.budget.tokens == 0
            and not section.closed
        ):
            self.forced, section.closed = list(section.until_ids), True  # a budget of 0: closed at once


@dataclass
class _PromptExtras:
    """What a request asked for about its prompt, all from the prefill's logits."""

    logprobs: list[float | None] | None = None
    topk: list[TopLogprobs | None] | None = None
    targets: list[list[float]] | None = None
    alt_tokens: PromptAltTokens | None = None


# --- checking input ------------------------------------------------------------------------------


def _make_rows(base: BaseModel, requests: Sequence[SampleRequest]) -> list[_Row]:
    """Validate every request, then expand it into rows, grouped contiguously by adapter."""
    rows: list[_Row] = []
    for i, request in enumerate(requests):
        where = f"requests[{i}]." if len(requests) > 1 else ""
        prompt, max_new, stops, matcher = _check_request(base, request, where)
        seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
        until_ids = _until_ids(base, request.params.budget)  # tokenized once; each row tracks its own
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
                matcher=None if matcher is None else matcher.deep_copy(),
                grammar_ends=frozenset(base.eos_token_ids) - stops.token_ids if matcher else frozenset(),
                section=_section(request.params.budget, until_ids),
            )
            for j in range(request.num_samples)
        ]
    first_seen = {adapter: k for k, adapter in reversed(list(enumerate(r.adapter for r in rows)))}
    return sorted(rows, key=lambda r: first_seen[r.adapter])  # stable: request order within an adapter


def _until_ids(base: BaseModel, budget: Budget | None) -> list[int]:
    """The tokens a budget forces when its section runs out (none without a budget)."""
    if budget is None:
        return []
    return [int(t) for t in base.tokenizer.encode(budget.until, add_special_tokens=False)]


def _section(budget: Budget | None, until_ids: list[int]) -> _Section | None:
    if budget is None:
        return None
    longest = max(len(budget.until), len(budget.opens or ""))
    return _Section(budget, until_ids, window=longest + 4, opened_at=0 if budget.opens is None else None)


def _check_request(
    base: BaseModel, request: SampleRequest, where: str
) -> tuple[list[int], int, _Stops, LLMatcher | None]:
    """(prompt ids, tokens to sample at most, stop rule, compiled grammar or None) of a valid request;
    raise on a bad one."""
    prompt = _check_prompt(base, request.prompt, f"{where}prompt")
    num_samples = request.num_samples
    if not isinstance(num_samples, int) or not 1 <= num_samples <= MAX_NUM_SAMPLES:
        raise InvalidInputError(f"{where}num_samples", f"{num_samples!r} is not in 1..{MAX_NUM_SAMPLES}")
    _check_adapter(base, request.adapter, f"{where}adapter")
    params = request.params
    _check_sampling_params(params, f"{where}sampling_params", base.vocab_size)
    _check_extras(base, request, len(prompt), where)
    vision.check_images(base, prompt, tuple(request.images), where.rstrip("."), tokens_field="prompt")
    max_new = _max_new_tokens(base, len(prompt), params.max_tokens, where)
    stops = _parse_stop(base, params.stop, f"{where}sampling_params.stop")
    if request.stop_at_eos:
        stops = replace(stops, token_ids=stops.token_ids | frozenset(base.eos_token_ids))
    budget = params.budget
    if budget is not None:
        if not isinstance(budget.tokens, int) or isinstance(budget.tokens, bool) or budget.tokens < 0:
            raise InvalidInputError(
                f"{where}sampling_params.budget.tokens", f"{budget.tokens!r} must be >= 0"
            )
        for name in ("until", "opens"):
            value = getattr(budget, name)
            if not (value is None and name == "opens") and (not isinstance(value, str) or not value):
                raise InvalidInputError(f"{where}sampling_params.budget.{name}", "must be a non-empty string")
    matcher = None
    if params.grammar is not None:
        matcher = grammar.compile_grammar(
            base.tokenizer,
            base.vocab_size,
            base.eos_token_ids,
            params.grammar,
            f"{where}sampling_params.grammar",
        )
    return prompt, max_new, stops, matcher


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


MAX_PENALTY = 2.0  # OpenAI's range for frequency and presence penalties: [-2, 2]
MAX_LOGIT_BIAS = 100.0  # and for a logit bias: [-100, 100]


def _check_sampling_params(params: SamplingParams, where: str, vocab_size: int) -> None:
    temperature, top_p, top_k = params.temperature, params.top_p, params.top_k
    if not isinstance(temperature, int | float) or not math.isfinite(temperature) or temperature < 0:
        raise InvalidInputError(f"{where}.temperature", f"{temperature!r} must be a finite number >= 0")
    if not isinstance(top_p, int | float) or not 0 < top_p <= 1:  # NaN fails the comparison too
        raise InvalidInputError(f"{where}.top_p", f"{top_p!r} must be in (0, 1]")
    if not isinstance(top_k, int) or top_k == 0 or top_k < -1:
        raise InvalidInputError(f"{where}.top_k", f"{top_k!r} must be -1 (no limit) or >= 1")
    if params.seed is not None and not isinstance(params.seed, int):
        raise InvalidInputError(f"{where}.seed", f"{params.seed!r} must be an integer or null")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(params, name)
        if not isinstance(value, int | float) or not -MAX_PENALTY <= value <= MAX_PENALTY:
            raise InvalidInputError(f"{where}.{name}", f"{value!r} must be in [-2, 2]")
    for token, bias in (params.logit_bias or {}).items():
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size:
            raise InvalidInputError(
                f"{where}.logit_bias", f"token id {token!r} is not in the vocabulary (size {vocab_size})"
            )
        if not isinstance(bias, int | float) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise InvalidInputError(
                f"{where}.logit_bias", f"the bias of token {token}, {bias!r}, must be in [-100, 100]"
            )


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
