"""The sampler: batched KV-cache generation over many adapters, exact logprobs, seeds, stops, validation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from eztinker.engine.engine import Engine, EngineConfig
from eztinker.engine.errors import InvalidInputError, NotFoundError
from eztinker.engine.sampler import (
    MAX_NUM_SAMPLES,
    SampleRequest,
    SamplerLimits,
    _inverse_cdf,
    _make_rows,
    _row_groups,
    prompt_logprobs,
    sample_batch,
)
from eztinker.engine.types import AdamParams, Budget, Datum, SampledSequence, SamplingParams
from eztinker.testing import TINY_FAMILIES

EOS = 2  # the tiny tokenizer's <|im_end|>
PROMPT = [17, 250, 31, 402, 77, 600, 5]
PROMPTS = [[40, 41, 42], [300, 12, 700, 13, 14, 15, 16, 9, 88], [500], [61, 62, 63, 64, 65]]


def greedy(max_tokens: int = 10, stop=()) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=list(stop))


def seeded(seed: int, max_tokens: int = 10, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, stop=[], **kwargs)


def eos_data(prompts: Sequence[Sequence[int]]) -> list[Datum]:
    """Teach "after the prompt, say EOS forever": weights only on the completion targets."""
    data = []
    for p in prompts:
        seq = [*p, EOS, EOS, EOS, EOS]
        weights = [0.0] * (len(p) - 1) + [1.0] * 4
        data.append(Datum.from_targets(seq[:-1], seq[1:], weights=weights))
    return data


def train(engine: Engine, run_id: str, data: list[Datum], steps: int, lr: float = 0.05) -> None:
    for _ in range(steps):
        engine.forward_backward(run_id, data, "cross_entropy")
        engine.optim_step(run_id, AdamParams(learning_rate=lr))


def forward_logprobs(engine: Engine, run_id: str, prompt: list[int], completion: list[int]) -> list[float]:
    """Training's log-probabilities of `completion` after `prompt` (token family, shifted targets)."""
    seq = prompt + completion
    out = engine.forward(run_id, [Datum.from_targets(seq[:-1], seq[1:])], "cross_entropy")
    return out.logprobs[0][-len(completion) :].tolist()


def assert_same_sequences(
    a: Sequence[SampledSequence], b: Sequence[SampledSequence], tol: float = 1e-5
) -> None:
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert [s.stop_reason for s in a] == [s.stop_reason for s in b]
    for x, y in zip(a, b, strict=True):
        assert max((abs(p - q) for p, q in zip(x.logprobs, y.logprobs, strict=True)), default=0.0) <= tol


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(device="cpu", dtype=torch.float32))


@pytest.fixture(scope="module")
def model(engine: Engine, tiny_model_dir: Path) -> str:
    name = str(tiny_model_dir)
    engine.base_model(name)
    return name


@pytest.fixture(scope="module")
def eos_run(engine: Engine, model: str) -> str:
    """A run trained (large lr) to answer EOS after PROMPTS: its adapter is far from zero."""
    run_id = engine.create_run(model, {"r": 8, "seed": 1}, run_id="eos-run").run_id
    train(engine, run_id, eos_data(PROMPTS), steps=8)
    return run_id


@pytest.fixture(scope="module")
def fresh_run(engine: Engine, model: str) -> str:
    """An untrained run: B = 0, so it computes exactly the bare base model."""
    return engine.create_run(model, {"r": 4, "seed": 2}, run_id="fresh-run").run_id


# --- logprobs --------------------------------------------------------------------------------------


def test_the_trained_adapter_matters(engine: Engine, model: str, eos_run: str) -> None:
    on_run = engine.sample(PROMPTS[0], greedy(4), run_id=eos_run).sequences[0]
    on_base = engine.sample(PROMPTS[0], greedy(4), base_model=model).sequences[0]
    assert on_run.tokens == [EOS] * 4
    assert on_base.tokens != on_run.tokens


@pytest.mark.parametrize("which", ["eos_run", "fresh_run"])
def test_sampled_logprobs_equal_training_logprobs(engine: Engine, model: str, which: str, request) -> None:
    run_id = request.getfixturevalue(which)
    for seed in range(3):
        seq = engine.sample(PROMPT, seeded(seed, max_tokens=12), run_id=run_id).sequences[0]
        assert len(seq.tokens) == len(seq.logprobs) == 12
        expected = forward_logprobs(engine, run_id, PROMPT, seq.tokens)
        assert all(abs(a - b) < 1e-4 for a, b in zip(seq.logprobs, expected, strict=True))


def test_bare_base_logprobs_equal_training_logprobs_of_a_zero_adapter(
    engine: Engine, model: str, fresh_run: str
) -> None:
    seq = engine.sample(PROMPT, seeded(7, max_tokens=12), base_model=model).sequences[0]
    expected = forward_logprobs(engine, fresh_run, PROMPT, seq.tokens)
    assert all(abs(a - b) < 1e-4 for a, b in zip(seq.logprobs, expected, strict=True))


def test_logprobs_are_unfiltered_temperature_one_logprobs(engine: Engine, model: str, eos_run: str) -> None:
    params = seeded(3, max_tokens=8, top_k=5, top_p=0.9)
    seq = engine.sample(PROMPT, replace(params, temperature=0.7), run_id=eos_run).sequences[0]
    expected = forward_logprobs(engine, eos_run, PROMPT, seq.tokens)
    assert all(abs(a - b) < 1e-4 for a, b in zip(seq.logprobs, expected, strict=True))


def test_prompt_logprobs_come_with_the_sample_and_alone(engine: Engine, model: str, eos_run: str) -> None:
    result = engine.sample(PROMPT, greedy(2), run_id=eos_run, prompt_logprobs=True)
    lps = result.prompt_logprobs
    assert lps is not None and len(lps) == len(PROMPT) and lps[0] is None
    expected = forward_logprobs(engine, eos_run, PROMPT[:1], PROMPT[1:])
    assert all(abs(a - b) < 1e-5 for a, b in zip(lps[1:], expected, strict=True))
    alone = engine.compute_logprobs(PROMPT, run_id=eos_run)
    assert alone[0] is None
    assert all(abs(a - b) < 1e-5 for a, b in zip(lps[1:], alone[1:], strict=True))
    assert engine.sample(PROMPT, greedy(2), run_id=eos_run).prompt_logprobs is None


# --- randomness ------------------------------------------------------------------------------------


def test_a_seed_gives_the_same_samples_on_every_call(engine: Engine, model: str) -> None:
    first = engine.sample(PROMPT, seeded(11), num_samples=3, base_model=model).sequences
    again = engine.sample(PROMPT, seeded(11), num_samples=3, base_model=model).sequences
    assert_same_sequences(first, again, tol=0.0)
    assert len({tuple(s.tokens) for s in first}) == 3  # each sample has its own stream


def test_different_seeds_give_different_samples(engine: Engine, model: str) -> None:
    tokens = {tuple(engine.sample(PROMPT, seeded(s), base_model=model).sequences[0].tokens) for s in range(4)}
    assert len(tokens) == 4


def test_unseeded_requests_draw_fresh_randomness(engine: Engine, model: str) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, stop=[])
    tokens = {tuple(engine.sample(PROMPT, params, base_model=model).sequences[0].tokens) for _ in range(3)}
    assert len(tokens) == 3


def test_a_seeded_request_samples_the_same_batched_or_alone(engine: Engine, model: str, eos_run: str) -> None:
    target = SampleRequest(PROMPT, seeded(5, max_tokens=12), num_samples=2, adapter=eos_run)
    others = [
        SampleRequest(PROMPTS[1], seeded(6, max_tokens=3, top_k=4)),
        SampleRequest(PROMPTS[2], greedy(20)),
        SampleRequest(PROMPTS[3], SamplingParams(max_tokens=15, temperature=0.8, stop=[]), num_samples=3),
    ]
    alone = engine.sample_many(model, [target])[0]
    batched = engine.sample_many(model, [others[0], target, *others[1:]])[1]
    assert_same_sequences(alone.sequences, batched.sequences)


def test_temperature_one_really_samples(engine: Engine, model: str) -> None:
    samples = engine.sample(PROMPT, seeded(0, max_tokens=8), num_samples=8, base_model=model).sequences
    assert len(samples) == 8
    assert len({tuple(s.tokens) for s in samples}) >= 7
    greedy_tokens = engine.sample(PROMPT, greedy(8), base_model=model).sequences[0].tokens
    assert sum(s.tokens == greedy_tokens for s in samples) <= 1


def test_num_samples_gives_that_many_sequences(engine: Engine, model: str) -> None:
    result = engine.sample(PROMPT, seeded(1, max_tokens=4), num_samples=5, base_model=model)
    assert len(result.sequences) == 5
    assert all(len(s.tokens) == 4 and s.stop_reason == "length" for s in result.sequences)


# --- greedy and filtering ---------------------------------------------------------------------------


def argmax_continuation(engine: Engine, model: str, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by hand: a full forward of the whole sequence at every step, no cache."""
    base = engine.base_model(model)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(base.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_is_deterministic_and_equals_step_by_step_argmax(engine: Engine, model: str) -> None:
    seqs = engine.sample(PROMPT, greedy(12), num_samples=3, base_model=model).sequences
    expected = argmax_continuation(engine, model, PROMPT, 12)
    assert all(s.tokens == expected for s in seqs)
    assert engine.sample(PROMPT, greedy(12), base_model=model).sequences[0].tokens == expected


@pytest.mark.parametrize("filters", [{"top_k": 1}, {"top_p": 1e-6}])
def test_a_filter_that_keeps_one_token_is_greedy(engine: Engine, model: str, filters: dict) -> None:
    seq = engine.sample(PROMPT, seeded(4, max_tokens=8, **filters), base_model=model).sequences[0]
    assert seq.tokens == argmax_continuation(engine, model, PROMPT, 8)


def test_top_k_samples_only_among_the_k_most_likely(engine: Engine, model: str) -> None:
    base = engine.base_model(model)
    for seq in engine.sample(
        PROMPT, seeded(8, max_tokens=6, top_k=3), num_samples=4, base_model=model
    ).sequences:
        ids = PROMPT + seq.tokens
        with torch.no_grad():
            logits_TV = base.model(input_ids=torch.tensor([ids])).logits[0]
        top3_TK = logits_TV[len(PROMPT) - 1 : -1].topk(3).indices
        assert all(tok in top3_TK[t].tolist() for t, tok in enumerate(seq.tokens))


def penalized_argmax_continuation(
    engine: Engine, model: str, prompt: list[int], steps: int, params: SamplingParams
) -> list[int]:
    """Greedy decoding by hand with OpenAI's logit bias and penalties over the generated tokens:
    logit[j] + bias[j] - frequency · count[j] - presence · (count[j] > 0), full forward each step."""
    base = engine.base_model(model)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits_V = base.model(input_ids=torch.tensor([ids])).logits[0, -1].clone()
            for token, bias in (params.logit_bias or {}).items():
                logits_V[token] += bias
            generated = ids[len(prompt) :]
            for token in set(generated):
                count = generated.count(token)
                logits_V[token] -= params.frequency_penalty * count + params.presence_penalty
            ids.append(int(logits_V.argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize(
    "shaping",
    [
        {"presence_penalty": 2.0},
        {"frequency_penalty": 1.5},
        {"frequency_penalty": 0.7, "presence_penalty": -0.2},
        {"logit_bias": {40: 5.0, 41: -100.0}},
    ],
)
def test_penalties_and_logit_bias_shape_greedy_choices_as_openai_defines(
    engine: Engine, model: str, shaping: dict
) -> None:
    params = replace(greedy(16), **shaping)
    expected = penalized_argmax_continuation(engine, model, PROMPT, 16, params)
    assert expected != argmax_continuation(engine, model, PROMPT, 16)  # the shaping changes the choice
    got = engine.sample(PROMPT, params, num_samples=2, base_model=model).sequences
    assert [s.tokens for s in got] == [expected, expected]
    # batched beside a row without shaping, each row keeps its own rule
    plain, shaped = sample_batch(
        engine.base_model(model), [SampleRequest(PROMPT, greedy(16)), SampleRequest(PROMPT, params)]
    )
    assert plain.sequences[0].tokens == argmax_continuation(engine, model, PROMPT, 16)
    assert shaped.sequences[0].tokens == expected


def test_shaped_samples_report_the_models_own_logprobs(engine: Engine, model: str) -> None:
    """A bias changes which token is drawn; its log-probability is still the model's (as training's)."""
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=3, stop=[], logit_bias={40: 100.0})
    seq = engine.sample(PROMPT, params, base_model=model).sequences[0]
    assert seq.tokens == [40] * 6
    run_id = engine.create_run(model, {"r": 2, "seed": 0}, run_id="shaping-zero").run_id
    assert seq.logprobs == pytest.approx(forward_logprobs(engine, run_id, PROMPT, seq.tokens), abs=1e-5)


def test_inverse_cdf_follows_u_and_never_picks_an_impossible_token() -> None:
    probs_BV = torch.tensor([[0.5, 0.0, 0.25, 0.25]] * 5)
    u_B = torch.tensor([1e-9, 0.5, 0.5000001, 0.75, 1.0], dtype=torch.float64)
    assert _inverse_cdf(probs_BV, u_B).tolist() == [0, 0, 2, 2, 3]


# --- stops -----------------------------------------------------------------------------------------


def first_new_token_index(tokens: list[int], start: int = 2) -> int:
    return next(k for k in range(start, len(tokens)) if tokens[k] not in tokens[:k])


# Seeded sampling consumes one uniform per step whatever the stop rule, so a stopped sample is a prefix
# of the same sample without stops (greedy decoding of a random tiny model just repeats one token).
NO_STOP = seeded(21, max_tokens=24)


def test_stop_token_ids_end_the_sample_including_the_stop_token(engine: Engine, model: str) -> None:
    full = engine.sample(PROMPT, NO_STOP, base_model=model).sequences[0]
    assert full.stop_reason == "length" and len(full.tokens) == 24
    k = first_new_token_index(full.tokens)
    seq = engine.sample(PROMPT, replace(NO_STOP, stop=[full.tokens[k], 1023]), base_model=model).sequences[0]
    assert seq.tokens == full.tokens[: k + 1]
    assert seq.logprobs == full.logprobs[: k + 1]
    assert seq.stop_reason == "stop"


def test_a_stop_on_the_last_allowed_token_is_a_stop(engine: Engine, model: str) -> None:
    full = engine.sample(PROMPT, NO_STOP, base_model=model).sequences[0]
    k = first_new_token_index(full.tokens)
    params = replace(NO_STOP, max_tokens=k + 1, stop=[full.tokens[k]])
    seq = engine.sample(PROMPT, params, base_model=model).sequences[0]
    assert len(seq.tokens) == k + 1 and seq.stop_reason == "stop"


def first_stop(tokenizer, tokens: list[int], strings: list[str]) -> int:
    """Index of the token whose decoding first makes the completion text contain a stop string."""
    return next(
        k
        for k in range(len(tokens))
        if any(s in tokenizer.decode(tokens[: k + 1], skip_special_tokens=False) for s in strings)
    )


def clean_substring(text: str, start: int, n: int) -> str:
    """The first n-character piece of `text` from `start` on with no undecodable byte in it."""
    return next(text[i : i + n] for i in range(start, len(text) - n) if "\ufffd" not in text[i : i + n])


def test_stop_strings_end_at_the_first_stop_including_its_token(engine: Engine, model: str) -> None:
    tokenizer = engine.base_model(model).tokenizer
    full = engine.sample(PROMPT, NO_STOP, base_model=model).sequences[0]
    text = tokenizer.decode(full.tokens, skip_special_tokens=False)
    early = clean_substring(text, len(text) // 4, 4)  # likely spans two tokens
    late = clean_substring(text, len(text) * 3 // 4, 3)
    assert first_stop(tokenizer, full.tokens, [early]) < first_stop(tokenizer, full.tokens, [late])
    for stop in ([late, early], early, [late]):
        k = first_stop(tokenizer, full.tokens, [stop] if isinstance(stop, str) else stop)
        seq = engine.sample(PROMPT, replace(NO_STOP, stop=stop), base_model=model).sequences[0]
        assert seq.tokens == full.tokens[: k + 1], (stop, k)
        assert seq.stop_reason == "stop"
        assert any(s in tokenizer.decode(seq.tokens) for s in ([stop] if isinstance(stop, str) else stop))


def test_default_stop_is_eos_and_an_empty_stop_list_runs_through_it(engine: Engine, eos_run: str) -> None:
    default = engine.sample(PROMPTS[1], SamplingParams(max_tokens=10, temperature=0.0), run_id=eos_run)
    assert default.sequences[0].tokens[-1] == EOS
    assert default.sequences[0].stop_reason == "stop" and len(default.sequences[0].tokens) < 10
    never = engine.sample(PROMPTS[1], greedy(10, stop=[]), run_id=eos_run).sequences[0]
    assert len(never.tokens) == 10 and never.stop_reason == "length"
    assert never.tokens[: len(default.sequences[0].tokens)] == default.sequences[0].tokens


def test_max_tokens_none_samples_up_to_the_context(engine: Engine, model: str) -> None:
    base = engine.base_model(model)
    prompt = [(7 * i) % 1000 + 3 for i in range(base.max_length - 5)]
    seq = engine.sample(prompt, SamplingParams(max_tokens=None, stop=[], seed=0), base_model=model).sequences[
        0
    ]
    assert len(seq.tokens) == 5 and seq.stop_reason == "length"


# --- batching ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_prompts_of_different_lengths_batched_equal_each_alone(tiny_model_dirs, family: str) -> None:
    engine = Engine(EngineConfig(device="cpu", dtype=torch.float32))
    name = str(tiny_model_dirs[family])
    run_id = engine.create_run(name, {"r": 4, "seed": 0}).run_id
    train(engine, run_id, eos_data(PROMPTS[:2]), steps=2, lr=0.02)  # a non-zero adapter on some rows
    requests = [
        SampleRequest(
            p, seeded(i, max_tokens=6 + 2 * i) if i % 2 else greedy(9), adapter=a, prompt_logprobs=True
        )
        for i, p in enumerate(PROMPTS)
        for a in (None, run_id)
    ]
    batched = engine.sample_many(name, requests)
    base = engine.base_model(name)
    for request, together in zip(requests, batched, strict=True):
        alone = sample_batch(base, [request])[0]
        assert_same_sequences(alone.sequences, together.sequences)
        assert alone.prompt_logprobs is not None and together.prompt_logprobs is not None
        assert together.prompt_logprobs[0] is None
        assert (
            max(
                (abs(a - b) for a, b in zip(alone.prompt_logprobs[1:], together.prompt_logprobs[1:])),
                default=0.0,
            )
            < 1e-5
        )


def test_requests_on_two_runs_in_one_call_equal_each_alone(engine: Engine, model: str, eos_run: str) -> None:
    other = engine.create_run(model, {"r": 16, "seed": 3}, run_id="other-run").run_id
    train(engine, other, eos_data([PROMPT]), steps=3, lr=0.01)
    requests = [
        SampleRequest(PROMPTS[1], seeded(1), num_samples=2, adapter=eos_run),
        SampleRequest(PROMPT, seeded(2), num_samples=2, adapter=other),
        SampleRequest(PROMPTS[3], greedy(), adapter=None),
        SampleRequest(PROMPTS[0], greedy(), adapter=other),
    ]
    together = engine.sample_many(model, requests)
    for request, result in zip(requests, together, strict=True):
        alone = engine.sample(
            request.prompt,
            request.params,
            num_samples=request.num_samples,
            **({"run_id": request.adapter} if request.adapter else {"base_model": model}),
        )
        assert_same_sequences(alone.sequences, result.sequences)


def test_row_groups_give_the_same_results_as_one_batch(engine: Engine, model: str, eos_run: str) -> None:
    base = engine.base_model(model)
    requests = [
        SampleRequest(p, seeded(i), num_samples=2, adapter=eos_run if i % 2 else None, prompt_logprobs=True)
        for i, p in enumerate(PROMPTS)
    ]
    one = sample_batch(base, requests)
    for limits in (
        SamplerLimits(max_rows=3),
        SamplerLimits(logits_elements=1),
        SamplerLimits(kv_cache_bytes=1),
        SamplerLimits(prefill_tokens=10),
    ):
        assert len(_row_groups(base, _make_rows(base, requests), limits)) > 1
        split = sample_batch(base, requests, limits)
        for a, b in zip(one, split, strict=True):
            assert_same_sequences(a.sequences, b.sequences)
            assert a.prompt_logprobs is not None and b.prompt_logprobs is not None
            assert (
                max((abs(x - y) for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:])), default=0.0)
                < 1e-5
            )


def test_a_sampler_snapshot_never_changes_while_its_run_trains_on(engine: Engine, model: str) -> None:
    run_id = engine.create_run(model, {"r": 8, "seed": 4}).run_id
    train(engine, run_id, eos_data([PROMPT]), steps=2, lr=0.01)
    sampler_id = engine.save_sampler(run_id).sampler_id
    snap_before = engine.sample(PROMPTS[1], greedy(8), sampler_id=sampler_id).sequences
    live_before = engine.sample(PROMPTS[1], greedy(8), run_id=run_id).sequences
    assert_same_sequences(snap_before, live_before, tol=0.0)
    train(engine, run_id, eos_data([PROMPTS[1]]), steps=3, lr=0.05)
    snap_after = engine.sample(PROMPTS[1], greedy(8), sampler_id=sampler_id).sequences
    live_after = engine.sample(PROMPTS[1], greedy(8), run_id=run_id).sequences
    assert_same_sequences(snap_before, snap_after, tol=0.0)
    assert live_after[0].tokens != live_before[0].tokens
    assert live_after[0].tokens[0] == EOS


# --- bad input ---------------------------------------------------------------------------------------

BAD_REQUESTS = [
    ({"prompt": []}, "prompt"),
    ({"prompt": [5, -1]}, "prompt"),
    ({"prompt": [5, 1024]}, "prompt"),
    ({"prompt": [5, "x"]}, "prompt"),
    ({"num_samples": 0}, "num_samples"),
    ({"num_samples": MAX_NUM_SAMPLES + 1}, "num_samples"),
    ({"params": SamplingParams(temperature=-0.1)}, "sampling_params.temperature"),
    ({"params": SamplingParams(temperature=float("nan"))}, "sampling_params.temperature"),
    ({"params": SamplingParams(temperature=float("inf"))}, "sampling_params.temperature"),
    ({"params": SamplingParams(top_p=0.0)}, "sampling_params.top_p"),
    ({"params": SamplingParams(top_p=1.5)}, "sampling_params.top_p"),
    ({"params": SamplingParams(top_p=float("nan"))}, "sampling_params.top_p"),
    ({"params": SamplingParams(top_k=0)}, "sampling_params.top_k"),
    ({"params": SamplingParams(top_k=-2)}, "sampling_params.top_k"),
    ({"params": SamplingParams(max_tokens=0)}, "sampling_params.max_tokens"),
    ({"params": SamplingParams(max_tokens=512)}, "sampling_params.max_tokens"),
    ({"prompt": [5] * 512, "params": SamplingParams(max_tokens=None)}, "prompt"),
    ({"params": SamplingParams(stop=["a", 3])}, "sampling_params.stop"),
    ({"params": SamplingParams(stop=[""])}, "sampling_params.stop"),
    ({"params": SamplingParams(stop=[-1])}, "sampling_params.stop"),
    ({"params": SamplingParams(seed="7")}, "sampling_params.seed"),  # type: ignore[arg-type]
    ({"params": SamplingParams(frequency_penalty=2.5)}, "sampling_params.frequency_penalty"),
    ({"params": SamplingParams(presence_penalty=float("nan"))}, "sampling_params.presence_penalty"),
    ({"params": SamplingParams(logit_bias={1024: 1.0})}, "sampling_params.logit_bias"),
    ({"params": SamplingParams(logit_bias={-1: 1.0})}, "sampling_params.logit_bias"),
    ({"params": SamplingParams(logit_bias={5: 101.0})}, "sampling_params.logit_bias"),
]


@pytest.mark.parametrize(("change", "field"), BAD_REQUESTS)
def test_bad_input_names_its_field(engine: Engine, model: str, change: dict, field: str) -> None:
    base = engine.base_model(model)
    good = SampleRequest(PROMPT, SamplingParams(max_tokens=4))
    bad = replace(good, **change)
    with pytest.raises(InvalidInputError) as alone:
        sample_batch(base, [bad])
    assert alone.value.field == field
    with pytest.raises(InvalidInputError) as batched:
        sample_batch(base, [good, bad])
    assert batched.value.field == f"requests[1].{field}"


def test_an_unknown_adapter_is_refused_not_served_by_the_base(engine: Engine, model: str) -> None:
    base = engine.base_model(model)
    with pytest.raises(NotFoundError):
        sample_batch(base, [SampleRequest(PROMPT, SamplingParams(), adapter="no-such-run")])
    with pytest.raises(NotFoundError):
        prompt_logprobs(base, PROMPT, "no-such-run")


def test_prompt_logprobs_checks_its_tokens(engine: Engine, model: str) -> None:
    base = engine.base_model(model)
    for tokens in ([], [5, 5000], [5] * (base.max_length + 1)):
        with pytest.raises(InvalidInputError) as error:
            prompt_logprobs(base, tokens, None)
        assert error.value.field == "tokens"
    assert prompt_logprobs(base, [5], None) == [None]


def test_no_requests_give_no_results(engine: Engine, model: str) -> None:
    assert sample_batch(engine.base_model(model), []) == []


# --- budgets (a reasoning model's thinking budget) ---------------------------------------------------------


def test_a_budget_forces_its_closing_text_after_so_many_tokens(engine: Engine, model: str) -> None:
    """Greedy is unchanged up to the budget; then the closing text's tokens come, drawn or not, with the
    model's own log-probabilities; then sampling goes on."""
    base = engine.base_model(model)
    until = "</think>"
    until_ids = base.tokenizer.encode(until, add_special_tokens=False)
    free = sample_batch(base, [SampleRequest(PROMPT, greedy(20))])[0].sequences[0]
    budget = replace(greedy(20), budget=Budget(5, until))
    (capped,) = sample_batch(base, [SampleRequest(PROMPT, budget)])[0].sequences
    assert capped.tokens[:5] == free.tokens[:5]
    assert capped.tokens[5 : 5 + len(until_ids)] == until_ids and len(capped.tokens) == 20
    own = prompt_logprobs(base, PROMPT + capped.tokens, None)[len(PROMPT) :]
    assert max(abs(a - b) for a, b in zip(own, capped.logprobs, strict=True)) < 1e-4


def test_a_budget_counts_from_where_its_section_opens_and_ends_when_the_text_closes_it(
    engine: Engine, model: str
) -> None:
    base = engine.base_model(model)
    free = sample_batch(base, [SampleRequest(PROMPT, greedy(20))])[0].sequences[0]
    opens = base.tokenizer.decode(free.tokens[2:4])  # text the model writes by its 4th token
    until_ids = base.tokenizer.encode("END", add_special_tokens=False)
    (opened,) = sample_batch(
        base, [SampleRequest(PROMPT, replace(greedy(20), budget=Budget(3, "END", opens)))]
    )[0].sequences
    at = next(k for k in range(1, 20) if opens in base.tokenizer.decode(free.tokens[:k]))  # it opens there
    assert opened.tokens[: at + 3] == free.tokens[: at + 3]
    assert opened.tokens[at + 3 : at + 3 + len(until_ids)] == until_ids
    closes = base.tokenizer.decode(free.tokens[1:3])  # the section is closed by the text itself
    (closed,) = sample_batch(base, [SampleRequest(PROMPT, replace(greedy(20), budget=Budget(5, closes)))])[
        0
    ].sequences
    assert closed.tokens == free.tokens
    (none,) = sample_batch(base, [SampleRequest(PROMPT, replace(greedy(20), budget=Budget(0, "END")))])[
        0
    ].sequences
    assert none.tokens[: len(until_ids)] == until_ids  # a budget of 0 closes the section at once
    never = replace(greedy(20), budget=Budget(2, "END", opens="never written"))
    assert sample_batch(base, [SampleRequest(PROMPT, never)])[0].sequences[0].tokens == free.tokens


@pytest.mark.parametrize(
    ("budget", "field"),
    [(Budget(-1, "x"), "sampling_params.budget.tokens"), (Budget(3, ""), "sampling_params.budget.until")],
)
def test_a_bad_budget_is_refused_naming_its_field(engine: Engine, model: str, budget, field: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        sample_batch(engine.base_model(model), [SampleRequest(PROMPT, replace(greedy(4), budget=budget))])
    assert caught.value.field == field
