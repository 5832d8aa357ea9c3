"""The vLLM request mapping where vLLM, left to itself, would answer something else than the engine sampler:
a grammar's end, a context shorter than the request, a grammar sample's log-probabilities. No vLLM needed:
these check the wire translation (`eztinker.backend.vllm.wire`); test_vllm runs the same cases on a real
server."""

from __future__ import annotations

import math

import pytest

from eztinker.backend.vllm import completion_body, unsupported
from eztinker.backend.vllm.wire import (
    _http_error,
    parse_rescored,
    prompt_body,
    rescore_body,
    without_prompt_extras,
)
from eztinker.engine import InvalidInputError, SamplingParams
from eztinker.engine.sampler import SampleRequest

EOS = 2
PROMPT = [5, 6, 7, 8]
GRAMMAR = 'start: "yes" | "no"'


def _request(**kwargs: object) -> SampleRequest:
    params = kwargs.pop("params", SamplingParams(max_tokens=4))
    return SampleRequest(prompt=list(PROMPT), params=params, **kwargs)  # type: ignore[arg-type]


def test_a_grammar_that_ends_without_eos_is_left_to_the_engine() -> None:
    """vLLM's grammar ends a sample on EOS only: with no stop token (`stop=[]`, stop strings alone) it would
    draw EOS after EOS to max_tokens, and it never draws another stop id. Those go to the engine."""

    def reason(stop: object, **kwargs: object) -> str | None:
        params = SamplingParams(max_tokens=20, stop=stop, grammar=GRAMMAR)  # type: ignore[arg-type]
        return unsupported(_request(params=params, **kwargs), [EOS])

    assert reason(None) is None  # at EOS, as vLLM's grammar ends
    assert reason([EOS]) is None
    assert reason(["zz"], stop_at_eos=True) is None
    assert "sampled by the engine" in (reason([]) or "")
    assert "sampled by the engine" in (reason(["zz"]) or "")
    assert "sampled by the engine" in (reason([7]) or "")
    assert "sampled by the engine" in (reason([7], stop_at_eos=True) or "")
    assert unsupported(_request(params=SamplingParams(stop=[])), [EOS]) is None  # no grammar: vLLM's


def test_max_tokens_beyond_the_vllm_context_is_refused_not_cut() -> None:
    """vLLM samples a request whose prompt + max_tokens passes its --max-model-len up to the context's
    end and calls that "length"; the engine refuses such a request, and so does the mapping."""
    request = _request(params=SamplingParams(max_tokens=60))
    with pytest.raises(InvalidInputError, match="max_tokens") as refused:
        completion_body(request, model="m", eos_token_ids=[EOS], max_model_len=62)
    assert refused.value.field == "sampling_params.max_tokens"
    fits = completion_body(request, model="m", eos_token_ids=[EOS], max_model_len=64)
    assert fits["max_tokens"] == 60


def test_a_prompt_longer_than_the_vllm_context_names_the_prompt() -> None:
    payload = {
        "error": {"message": "This model's maximum context length is 64 tokens", "param": "input_tokens"}
    }
    error = _http_error(400, payload, _request())
    assert isinstance(error, InvalidInputError) and error.field == "prompt"


def test_a_grammar_sample_is_scored_again_without_the_grammar() -> None:
    """vLLM reads a constrained sample's log-probabilities after the grammar's mask (renormalized, 0.0 where
    one token is allowed); the model's own come from scoring prompt + tokens as a prompt."""
    request = _request(params=SamplingParams(max_tokens=3, grammar=GRAMMAR), topk_sample_logprobs=2)
    body = rescore_body(request, [40, 41, EOS], model="m", max_model_len=64)
    assert body["prompt"] == [*PROMPT, 40, 41, EOS] and "structured_outputs" not in body
    assert body["prompt_logprobs"] == 2 and body["max_tokens"] == 1 and "logit_bias" not in body

    def entry(token: int, logprob: float) -> dict[str, dict[str, float]]:
        return {
            str(token): {"logprob": logprob, "rank": 3},
            "9": {"logprob": -0.5, "rank": 1},
            "8": {"logprob": -1.0, "rank": 2},
        }

    choice = {
        "prompt_logprobs": [
            None,
            *([entry(6, -2.0)] * 3),
            entry(40, -4.0),
            entry(41, -5.0),
            entry(EOS, -6.0),
        ],
        "token_ids": [9],
    }
    logprobs, topk = parse_rescored(request, [40, 41, EOS], choice)
    assert logprobs == [-4.0, -5.0, -6.0]
    assert topk == [[(9, -0.5), (8, -1.0)]] * 3
    # At the end of the context the last token is forced and read at the one sampled position.
    at_end = rescore_body(request, [40, 41, EOS], model="m", max_model_len=len(PROMPT) + 3)
    assert at_end["prompt"] == [*PROMPT, 40, 41] and at_end["logit_bias"] == {str(EOS): 100.0}
    forced = {
        "prompt_logprobs": choice["prompt_logprobs"][:-1],
        "token_ids": [EOS],
        "logprobs": {"token_logprobs": [-6.0], "top_logprobs": [{"token_id:9": -0.5, "token_id:8": -1.0}]},
    }
    assert parse_rescored(request, [40, 41, EOS], forced) == (logprobs, topk)
    assert all(math.isfinite(lp) for lp in logprobs)


def test_a_streamed_request_reads_its_prompt_logprobs_beside_the_stream() -> None:
    """vLLM refuses `prompt_logprobs` with `stream=True`: the stream goes without them, and a one-token
    request reads them (top-k too)."""
    request = _request(prompt_logprobs=True, topk_prompt_logprobs=3, prompt_logprobs_last_n=2)
    streamed = completion_body(without_prompt_extras(request), model="m", eos_token_ids=[EOS], stream=True)
    assert "prompt_logprobs" not in streamed and streamed["stream"] is True
    alone = prompt_body(request, model="m")
    assert alone["prompt"] == PROMPT and alone["prompt_logprobs"] == 3 and alone["max_tokens"] == 1
    assert prompt_body(_request(prompt_logprobs=True), model="m")["prompt_logprobs"] == 0
