"""The request and answer mapping: engine `SampleRequest`s as `/v1/completions` bodies, and vLLM's answers
(whole or streamed) and errors back as `SampleResult`s and engine errors. Pure: no I/O."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import httpx

from eztinker.backend.vllm.options import VllmUnavailableError
from eztinker.engine.errors import InvalidInputError, NotFoundError
from eztinker.engine.sampler import MAX_NUM_SAMPLES, SampleRequest
from eztinker.engine.types import SampledSequence, SampleResult, TopLogprobs

if TYPE_CHECKING:
    pass


_MIN_TEMPERATURE = 1e-5  # as the engine sampler: below this, sample greedily
_SEED_MASK = 2**62 - 1  # vLLM seeds sample i of a request with seed + i: leave room above


def _vllm_seed(seed: int) -> int:
    """A request seed as vLLM's (SplitMix64, 62 bits): vLLM seeds sample i with seed + i, so nearby seeds
    would share samples (seed 7's second sample = seed 8's first); hashing them apart avoids that."""
    mask = 2**64 - 1
    z = (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & _SEED_MASK


def unsupported(request: SampleRequest, eos_token_ids: Iterable[int] | None = None) -> str | None:
    """Why vLLM cannot serve `request` as the engine would (None: it can). `eos_token_ids`: the base
    model's, for the rule of a grammar's end (unchecked without them)."""
    if request.target_prompt_tokens is not None:
        return "target_prompt_tokens (log-probabilities of chosen ids at prompt positions) has no vLLM counterpart"
    if request.prompt_alt_tokens_k:
        return "prompt_alt_tokens_k (alternative draws at prompt positions) has no vLLM counterpart"
    if getattr(request, "images", ()):
        return "image inputs are sampled by the engine (the vLLM client sends token ids only)"
    if request.params.budget is not None:  # vLLM's thinking_token_budget needs a reasoning parser set
        return "a budget (a thinking budget) is sampled by the engine"
    if request.params.grammar is not None and eos_token_ids is not None:
        return _grammar_end_problem(request, set(eos_token_ids))
    return None


def _grammar_end_problem(request: SampleRequest, eos: set[int]) -> str | None:
    """vLLM's grammar ends a sample on the model's EOS, and only there. The engine's ends it on the
    request's stop tokens (drawn once the grammar is complete), or right after the grammar's last token
    when it has none (`stop=[]`, stop strings only): vLLM would instead draw EOS after EOS until
    max_tokens, or never draw a stop token outside the grammar. Those requests stay on the engine."""
    try:
        _, ids = _stop_items(request, eos)
    except InvalidInputError:
        return None  # refused when the body is built, naming the field
    if set(ids) == eos:
        return None
    return (
        "a grammar whose sample ends on other stop tokens than the model's EOS "
        f"(stop ids {sorted(ids)}, EOS {sorted(eos)}) is sampled by the engine"
    )


def _stop_items(request: SampleRequest, eos: Iterable[int]) -> tuple[list[str], list[int]]:
    """(stop strings, stop token ids) of a request as vLLM takes them: `stop=None` is the EOS ids, and
    `stop_at_eos` adds them to the request's own."""
    eos = sorted(set(eos))
    stop = request.params.stop
    items = [stop] if isinstance(stop, str | int) else list(stop) if stop is not None else None
    if items is None:
        return [], eos
    strings = [s for s in items if isinstance(s, str)]
    ids = [t for t in items if isinstance(t, int) and not isinstance(t, bool)]
    if len(strings) + len(ids) != len(items) or (strings and ids):
        raise InvalidInputError(
            "sampling_params.stop", "must be a string, a list of strings or a list of token ids"
        )
    return strings, sorted(set(ids) | (set(eos) if request.stop_at_eos else set()))


def completion_body(
    request: SampleRequest,
    *,
    model: str,
    eos_token_ids: Iterable[int],
    max_model_len: int | None = None,
    stream: bool = False,
) -> dict[str, Any]:
    """The `/v1/completions` body for an engine request (prompt as token ids; every sampling field explicit).

    | engine (`SampleRequest` / `SamplingParams`) | vLLM completions                                        |
    |---------------------------------------------|---------------------------------------------------------|
    | prompt (token ids)                          | prompt (token ids: no tokenisation)                     |
    | num_samples                                 | n (greedy: 1, copied: vLLM refuses n > 1 there)         |
    | adapter (sampler id) / None                 | model = the adapter's name / the served base model      |
    | max_tokens (None: to the context's end)     | max_tokens (None: max_model_len - len(prompt))           |
    | temperature (< 1e-5: greedy)                | temperature (0: greedy)                                 |
    | top_p, top_k (-1: no limit)                 | top_p, top_k                                            |
    | seed                                        | seed (hashed: see `_vllm_seed`), unseeded: none         |
    | frequency_penalty, presence_penalty         | frequency_penalty, presence_penalty (output tokens too) |
    | logit_bias {id: bias}                       | logit_bias {"id": bias}                                 |
    | stop None (EOS)                             | stop_token_ids = EOS ids, ignore_eos                    |
    | stop [] (never)                             | stop_token_ids = [], ignore_eos                         |
    | stop ids                                    | stop_token_ids (+ EOS with stop_at_eos), ignore_eos     |
    | stop strings                                | stop, include_stop_str_in_output (+ EOS with stop_at_eos)|
    | (sampled-token logprobs, always)            | logprobs = topk_sample_logprobs (0: sampled token only) |
    | topk_sample_logprobs                        | logprobs = k                                            |
    | prompt_logprobs / topk_prompt_logprobs      | prompt_logprobs = 0 / k                                 |
    | prompt_logprobs_last_n                      | (all positions are scored; the earlier ones dropped)    |
    | grammar (Lark, llguidance's dialect)        | structured_outputs.grammar (`vllm serve` runs guidance; |
    |                                             | the tokens are then scored again: see `rescore_body`)   |
    | (token ids out)                             | return_token_ids, return_tokens_as_token_ids            |

    vLLM's other knobs (min_p, repetition_penalty, min_tokens) are sent as off, and special tokens kept in
    the text (stop strings then match what the engine matches, which decodes with special tokens).
    """
    prompt = _prompt_ids(request.prompt)
    num_samples = request.num_samples
    if not isinstance(num_samples, int) or not 1 <= num_samples <= MAX_NUM_SAMPLES:
        raise InvalidInputError("num_samples", f"{num_samples!r} is not in 1..{MAX_NUM_SAMPLES}")
    params = request.params
    max_tokens = params.max_tokens
    if max_tokens is None and max_model_len is not None:
        max_tokens = max_model_len - len(prompt)
        if max_tokens < 1:
            raise InvalidInputError(
                "prompt", f"has {len(prompt)} tokens: no room left in the context of {max_model_len}"
            )
    elif (
        isinstance(max_tokens, int) and max_model_len is not None and len(prompt) + max_tokens > max_model_len
    ):
        # vLLM would sample to its context's end and call that "length"; the engine refuses: so do we.
        raise InvalidInputError(
            "sampling_params.max_tokens",
            f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) exceeds the vLLM server's context of "
            f"{max_model_len} (its --max-model-len)",
        )
    temperature = float(params.temperature)
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "n": 1 if _greedy_copies(request) else num_samples,
        "max_tokens": max_tokens,
        "temperature": 0.0 if temperature < _MIN_TEMPERATURE else temperature,
        "top_p": float(params.top_p),
        "top_k": int(params.top_k),
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": float(params.presence_penalty),
        "frequency_penalty": float(params.frequency_penalty),
        "min_tokens": 0,
        "ignore_eos": True,  # the EOS rule is ours: sent as stop ids below
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "logprobs": int(request.topk_sample_logprobs),
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
        "stream": stream,
    }
    if params.seed is not None:
        body["seed"] = _vllm_seed(operator.index(params.seed))
    if params.logit_bias:
        body["logit_bias"] = {str(token): float(bias) for token, bias in params.logit_bias.items()}
    if params.grammar is not None:
        body["structured_outputs"] = {"grammar": params.grammar}
    strings, body["stop_token_ids"] = _stop_items(request, eos_token_ids)
    if strings:
        body["stop"] = strings
        body["include_stop_str_in_output"] = True
    if request.topk_prompt_logprobs:
        body["prompt_logprobs"] = int(request.topk_prompt_logprobs)
    elif request.prompt_logprobs:
        body["prompt_logprobs"] = 0
    if stream:
        body["stream_options"] = {"include_usage": False}
    return body


def _greedy_copies(request: SampleRequest) -> bool:
    """Whether the request is greedy with several samples: vLLM refuses n > 1 there, so one is sampled and
    copied (greedy decoding is deterministic: the engine sampler's samples are equal too)."""
    return request.num_samples > 1 and float(request.params.temperature) < _MIN_TEMPERATURE


def _prompt_ids(prompt: Sequence[int]) -> list[int]:
    try:
        ids = [operator.index(t) for t in prompt]
    except TypeError as exc:
        raise InvalidInputError("prompt", "must be a list of integer token ids") from exc
    if not ids:
        raise InvalidInputError("prompt", "is empty: send at least one token")
    if min(ids) < 0:
        raise InvalidInputError("prompt", f"token id {min(ids)} is negative")
    return ids


def _token_id(key: str) -> int:
    """`token_id:123` (return_tokens_as_token_ids) or `123` (prompt logprobs' keys) -> 123."""
    return int(key.rsplit(":", 1)[-1])


def _logprob(value: Any) -> float:
    return -math.inf if value is None else float(value)


def _top_from_legacy(entry: Mapping[str, Any] | None, k: int) -> TopLogprobs:
    """The k most likely of a completions `top_logprobs` entry (it also holds the sampled token)."""
    if not entry:
        return []
    pairs = sorted(((_token_id(key), _logprob(lp)) for key, lp in entry.items()), key=lambda p: -p[1])
    return pairs[:k]


def _prompt_extras(
    request: SampleRequest, entries: Sequence[Mapping[str, Any] | None] | None
) -> tuple[list[float | None] | None, list[TopLogprobs | None] | None]:
    """(prompt_logprobs, topk_prompt_logprobs) as the engine returns them, from vLLM's `prompt_logprobs`."""
    if entries is None or not (request.prompt_logprobs or request.topk_prompt_logprobs):
        return None, None
    prompt = list(request.prompt)
    skipped = len(prompt) - request.prompt_logprobs_last_n if request.prompt_logprobs_last_n else 1
    logprobs: list[float | None] | None = None
    topk: list[TopLogprobs | None] | None = None
    if request.prompt_logprobs:
        logprobs = [None] * len(prompt)
        for i in range(skipped, len(prompt)):
            entry = entries[i] if i < len(entries) else None
            found = (entry or {}).get(str(prompt[i]))
            logprobs[i] = _logprob(found["logprob"]) if found else None
    if request.topk_prompt_logprobs:
        k = request.topk_prompt_logprobs
        topk = [None] * len(prompt)
        for i in range(skipped, len(prompt)):
            entry = entries[i] if i < len(entries) else None
            ranked = sorted(
                (
                    (int(v.get("rank") or k + 1), _token_id(key), _logprob(v.get("logprob")))
                    for key, v in (entry or {}).items()
                ),
                key=lambda t: (t[0], -t[2]),
            )
            topk[i] = [(token, lp) for rank, token, lp in ranked if rank <= k][:k]
    return logprobs, topk


def _stop_reason(finish: str | None) -> Literal["stop", "length"]:
    if finish in ("stop", "length"):
        return finish  # type: ignore[return-value]
    if finish == "abort":
        raise VllmUnavailableError("vLLM aborted the request (it is shutting down or restarting)")
    raise VllmUnavailableError(f"vLLM ended a sample with finish_reason {finish!r}")


def parse_choices(request: SampleRequest, choices: Sequence[Mapping[str, Any]]) -> SampleResult:
    """The engine's `SampleResult` from the `choices` of a (non-streamed) completions answer."""
    ordered = sorted(choices, key=lambda c: int(c.get("index", 0)))
    if _greedy_copies(request) and len(ordered) == 1:
        ordered = ordered * request.num_samples
    if len(ordered) != request.num_samples:
        raise VllmUnavailableError(f"vLLM returned {len(ordered)} samples for n={request.num_samples}")
    k = request.topk_sample_logprobs
    sequences = []
    for choice in ordered:
        tokens = [int(t) for t in choice.get("token_ids") or []]
        logprobs_obj = choice.get("logprobs") or {}
        token_logprobs = [_logprob(lp) for lp in logprobs_obj.get("token_logprobs") or []]
        if len(token_logprobs) != len(tokens):
            raise VllmUnavailableError(
                f"vLLM returned {len(token_logprobs)} log-probabilities for {len(tokens)} tokens"
            )
        topk = [_top_from_legacy(e, k) for e in logprobs_obj.get("top_logprobs") or []] if k else None
        sequences.append(
            SampledSequence(
                tokens=tokens,
                logprobs=token_logprobs,
                stop_reason=_stop_reason(choice.get("finish_reason")),
                topk_logprobs=topk,
            )
        )
    prompt_logprobs, topk_prompt = _prompt_extras(
        request, ordered[0].get("prompt_logprobs") if ordered else None
    )
    return SampleResult(
        sequences=sequences, prompt_logprobs=prompt_logprobs, topk_prompt_logprobs=topk_prompt
    )


def without_prompt_extras(request: SampleRequest) -> SampleRequest:
    """`request` without its prompt log-probabilities: vLLM refuses `prompt_logprobs` on a streamed
    request, so a streamed one reads them with `prompt_body`, beside the stream."""
    return replace(request, prompt_logprobs=False, topk_prompt_logprobs=0, prompt_logprobs_last_n=None)


def prompt_body(request: SampleRequest, *, model: str) -> dict[str, Any]:
    """The body that reads a request's prompt log-probabilities (and top-k) alone: one token, greedy."""
    return {
        "model": model,
        "prompt": _prompt_ids(request.prompt),
        "max_tokens": 1,
        "temperature": 0.0,
        "ignore_eos": True,
        "stop_token_ids": [],
        "skip_special_tokens": False,
        "logprobs": 0,
        "prompt_logprobs": int(request.topk_prompt_logprobs),
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
        "stream": False,
    }


def rescore_body(
    request: SampleRequest, tokens: Sequence[int], *, model: str, max_model_len: int | None = None
) -> dict[str, Any]:
    """The body that scores a grammar sample's `tokens` with the model's own log-probabilities.

    vLLM masks the logits with the grammar before it reads log-probabilities, so a constrained sample's
    come back renormalized over what the grammar allows (0.0 where it allows one token), not the model's,
    which the engine reports and training computes. So the sample is scored again, unconstrained: its
    tokens as prompt log-probabilities (and top-k) of prompt + tokens. At the end of the context, where
    vLLM would refuse that prompt, the last token is forced instead (+100 logit bias, which raw
    log-probabilities do not see) and read from the one sampled position.
    """
    full = [*_prompt_ids(request.prompt), *(int(t) for t in tokens)]
    room = max_model_len is None or len(full) < max_model_len
    k = int(request.topk_sample_logprobs)
    body: dict[str, Any] = {
        "model": model,
        "prompt": full if room else full[:-1],
        "max_tokens": 1,
        "temperature": 0.0,
        "ignore_eos": True,
        "stop_token_ids": [],
        "skip_special_tokens": False,
        "logprobs": k,
        "prompt_logprobs": k,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
        "stream": False,
    }
    if not room:
        body["logit_bias"] = {str(full[-1]): 100.0}
    return body


def parse_rescored(
    request: SampleRequest, tokens: Sequence[int], choice: Mapping[str, Any]
) -> tuple[list[float], list[TopLogprobs] | None]:
    """(log-probabilities, top-k or None) of `tokens` from the answer to `rescore_body`."""
    prompt = [*request.prompt, *tokens]
    scored = choice.get("prompt_logprobs") or []
    covered = min(len(tokens), max(0, len(scored) - len(request.prompt)))
    k = request.topk_sample_logprobs
    logprobs: list[float | None] = []
    topk: list[TopLogprobs | None] = []
    if covered:
        asked = SampleRequest(
            prompt=prompt[: len(request.prompt) + covered],
            params=request.params,
            prompt_logprobs=True,
            topk_prompt_logprobs=k,
            prompt_logprobs_last_n=covered,
        )
        found, found_topk = _prompt_extras(asked, scored)
        logprobs = list(found or [])[-covered:]
        topk = list(found_topk or [None] * len(prompt))[-covered:]
    if covered < len(tokens):  # the forced last token, read at the sampled position
        forced = [int(t) for t in choice.get("token_ids") or []]
        sampled = (choice.get("logprobs") or {}).get("token_logprobs") or []
        if covered != len(tokens) - 1 or forced[:1] != [int(tokens[-1])] or not sampled:
            raise VllmUnavailableError("vLLM did not score the grammar sample's tokens; retry the request")
        logprobs.append(_logprob(sampled[0]))
        tops = (choice.get("logprobs") or {}).get("top_logprobs") or [None]
        topk.append(_top_from_legacy(tops[0], k))
    if len(logprobs) != len(tokens) or any(lp is None for lp in logprobs):
        raise VllmUnavailableError("vLLM did not score the grammar sample's tokens; retry the request")
    checked = [float(lp) for lp in logprobs if lp is not None]
    return checked, ([t or [] for t in topk] if k else None)


@dataclass
class _StreamSample:
    """One sample of a streamed request: what arrived so far, and the token held back for `on_token`."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk: list[TopLogprobs] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish: str | None = None
    held: tuple[int, float, TopLogprobs | None] | None = None


class _StreamState:
    """Assembles a streamed completion and fires the request's `on_token` as tokens arrive.

    `on_token`'s last argument says whether the token is its sample's last; vLLM may say so in a later
    chunk than the token's, so each sample's newest token is held until the next one (or the finish) comes.
    """

    def __init__(self, request: SampleRequest, on_text: Callable[[int, str], None] | None = None) -> None:
        self.request = request
        self.samples = [_StreamSample() for _ in range(request.num_samples)]
        self.prompt_entries: list[Mapping[str, Any] | None] | None = None
        self.on_text = on_text

    def feed(self, chunk: Mapping[str, Any]) -> None:
        if "error" in chunk:
            raise _http_error(int(chunk["error"].get("code") or 500), chunk, self.request)
        k = self.request.topk_sample_logprobs
        choices: list[dict[str, Any]] = list(chunk.get("choices") or [])
        if _greedy_copies(self.request):  # one greedy sample, sent as every one (see `_greedy_copies`)
            choices = [
                {**c, "index": i}
                for c in choices
                if int(c.get("index", 0)) == 0
                for i in range(len(self.samples))
            ]
        for choice in choices:
            index = int(choice.get("index", 0))
            if not 0 <= index < len(self.samples):
                continue
            sample = self.samples[index]
            if choice.get("prompt_logprobs") is not None and self.prompt_entries is None:
                self.prompt_entries = choice["prompt_logprobs"]
            tokens = [int(t) for t in choice.get("token_ids") or []]
            logprobs_obj = choice.get("logprobs") or {}
            token_logprobs = [_logprob(lp) for lp in logprobs_obj.get("token_logprobs") or []]
            tops = logprobs_obj.get("top_logprobs") or []
            for j, token in enumerate(tokens):
                logprob = token_logprobs[j] if j < len(token_logprobs) else math.nan
                top = _top_from_legacy(tops[j] if j < len(tops) else None, k) if k else None
                sample.tokens.append(token)
                sample.logprobs.append(logprob)
                if top is not None:
                    sample.topk.append(top)
                self._emit(index, sample, final=False)
                sample.held = (token, logprob, top)
            if choice.get("text") and self.on_text is not None:
                self.on_text(index, choice["text"])
            if choice.get("text"):
                sample.text.append(choice["text"])
            if choice.get("finish_reason") is not None:
                sample.finish = choice["finish_reason"]
                self._emit(index, sample, final=True)

    def _emit(self, index: int, sample: _StreamSample, *, final: bool) -> None:
        if sample.held is not None and self.request.on_token is not None:
            token, logprob, top = sample.held
            self.request.on_token(index, token, logprob, top, final)
        sample.held = None

    def cut_short(self) -> None:
        """The client hung up: every unfinished sample ends here, stop reason "length"."""
        for index, sample in enumerate(self.samples):
            if sample.finish is None:
                sample.finish = "length"
                self._emit(index, sample, final=True)

    def result(self) -> SampleResult:
        for sample in self.samples:
            if sample.finish is None:
                raise VllmUnavailableError("the vLLM stream ended before every sample finished")
        k = self.request.topk_sample_logprobs
        sequences = [
            SampledSequence(
                tokens=s.tokens,
                logprobs=s.logprobs,
                stop_reason=_stop_reason(s.finish),
                topk_logprobs=s.topk if k else None,
            )
            for s in self.samples
        ]
        prompt_logprobs, topk_prompt = _prompt_extras(self.request, self.prompt_entries)
        return SampleResult(
            sequences=sequences, prompt_logprobs=prompt_logprobs, topk_prompt_logprobs=topk_prompt
        )


_FIELDS = {  # vLLM's `param` names -> the engine request's
    "prompt": "prompt",
    "input_tokens": "prompt",  # a prompt longer than --max-model-len
    "n": "num_samples",
    "max_tokens": "sampling_params.max_tokens",
    "temperature": "sampling_params.temperature",
    "top_p": "sampling_params.top_p",
    "top_k": "sampling_params.top_k",
    "seed": "sampling_params.seed",
    "frequency_penalty": "sampling_params.frequency_penalty",
    "presence_penalty": "sampling_params.presence_penalty",
    "logit_bias": "sampling_params.logit_bias",
    "structured_outputs": "sampling_params.grammar",
    "stop": "sampling_params.stop",
    "stop_token_ids": "sampling_params.stop",
    "logprobs": "topk_sample_logprobs",
    "prompt_logprobs": "topk_prompt_logprobs",
}


class _AdapterMissingError(Exception):
    """vLLM does not know the adapter the request named (evicted, or lost in a restart): load it again."""


def _http_error(status: int, payload: Any, request: SampleRequest | None) -> Exception:
    error = payload.get("error") if isinstance(payload, Mapping) else None
    message = (error.get("message") if isinstance(error, Mapping) else None) or str(payload)[:500]
    if status == 404 and request is not None and request.adapter is not None:
        return _AdapterMissingError(message)
    if status in (400, 422):
        param = error.get("param") if isinstance(error, Mapping) else None
        return InvalidInputError(
            _FIELDS.get(str(param), str(param or "request")), f"vLLM refused it: {message}"
        )
    if status == 404:
        return NotFoundError(f"vLLM: {message}")
    return VllmUnavailableError(f"vLLM answered {status}: {message}")


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return {"error": {"message": response.text[:500]}}
