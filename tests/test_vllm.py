"""vLLM as the sampling backend (`eztinker.backend.vllm`).

The first part checks the request/answer mapping with no vLLM at all. The rest starts one real vLLM server
(the CPU build, from `.venv-vllm`, which `scripts/vllm_env.sh` builds; or `EZTINKER_VLLM_PYTHON`) on a tiny
Qwen2 for the whole module, and skips when there is no such environment. vLLM's CPU attention needs a head
size of at least 32, so the model here is the tiny Qwen2 at hidden size 128 (4 heads of 32), not the
conftest's 64. Starting vLLM costs about a minute on two cores; the kill test at the end costs another.

Tolerance: sampler log-probabilities (vLLM, float32 on CPU) equal the trainer's (`Engine.forward`) on the
same tokens and weights to within LOGPROB_TOLERANCE = 1e-3 (measured: ~1e-6), and the cookbook's math_rl flow
on vLLM keeps `optim/kl_sample_train_v1` within it at every step (measured: ~1e-8).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import eztinker
from eztinker.backend.vllm import (
    VllmBackend,
    VllmOptions,
    VllmPool,
    VllmSampler,
    VllmServer,
    VllmUnavailableError,
    _StreamState,
    _vllm_seed,
    adapter_problem,
    completion_body,
    find_vllm_python,
    parse_choices,
    probe_vllm_python,
    unsupported,
    vllm_lora_rank,
    write_snapshot,
)
from eztinker.engine import AdamParams, Datum, Engine, InvalidInputError, SamplingParams
from eztinker.engine.sampler import SampleRequest
from eztinker.service import Service
from eztinker.settings import Settings
from eztinker.testing import make_tiny_model

LOGPROB_TOLERANCE = 1e-3  # sampler (vLLM) vs trainer log-probabilities, float32 on CPU
EOS = 2  # the tiny tokenizer's <|im_end|>
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]


def _request(**kwargs: Any) -> SampleRequest:
    params = kwargs.pop("params", SamplingParams(max_tokens=4))
    return SampleRequest(prompt=kwargs.pop("prompt", list(PROMPT)), params=params, **kwargs)


# --- the mapping, without vLLM ------------------------------------------------------------------------


def test_body_maps_every_sampling_field() -> None:
    request = _request(
        params=SamplingParams(max_tokens=7, temperature=0.7, top_p=0.9, top_k=20, seed=3, stop=None),
        num_samples=3,
        topk_sample_logprobs=5,
        topk_prompt_logprobs=2,
        prompt_logprobs=True,
    )
    body = completion_body(request, model="base", eos_token_ids=[EOS])
    assert body["prompt"] == PROMPT and body["model"] == "base" and body["n"] == 3
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["top_k"]) == (7, 0.7, 0.9, 20)
    assert body["seed"] == _vllm_seed(3) != _vllm_seed(4)
    assert body["stop_token_ids"] == [EOS] and body["ignore_eos"] is True  # stop=None: at EOS, by our rule
    assert body["logprobs"] == 5 and body["prompt_logprobs"] == 2
    assert body["return_token_ids"] and body["return_tokens_as_token_ids"]
    assert body["repetition_penalty"] == 1.0 and body["min_p"] == 0.0 and not body["skip_special_tokens"]
    assert body["frequency_penalty"] == body["presence_penalty"] == 0.0 and "logit_bias" not in body
    assert "stop" not in body
    shaped = SamplingParams(frequency_penalty=0.5, presence_penalty=-1.0, logit_bias={40: 3.0, 7: -100})
    shaped_body = completion_body(_request(params=shaped), model="base", eos_token_ids=[EOS])
    assert (shaped_body["frequency_penalty"], shaped_body["presence_penalty"]) == (0.5, -1.0)
    assert shaped_body["logit_bias"] == {"40": 3.0, "7": -100.0}  # OpenAI's shape: ids as strings
    assert "structured_outputs" not in body
    constrained = completion_body(
        _request(params=SamplingParams(grammar='start: "a"')), model="b", eos_token_ids=[EOS]
    )
    assert constrained["structured_outputs"] == {"grammar": 'start: "a"'}  # vLLM runs llguidance on it too


def test_body_stop_rules_and_defaults() -> None:
    never = completion_body(_request(params=SamplingParams(stop=[])), model="m", eos_token_ids=[EOS])
    assert never["stop_token_ids"] == [] and never["ignore_eos"] is True
    ids = completion_body(_request(params=SamplingParams(stop=[7, 9])), model="m", eos_token_ids=[EOS])
    assert ids["stop_token_ids"] == [7, 9]
    ids_eos = completion_body(
        _request(params=SamplingParams(stop=[7]), stop_at_eos=True), model="m", eos_token_ids=[EOS]
    )
    assert ids_eos["stop_token_ids"] == [EOS, 7]
    strings = completion_body(_request(params=SamplingParams(stop="ab")), model="m", eos_token_ids=[EOS])
    assert (
        strings["stop"] == ["ab"]
        and strings["include_stop_str_in_output"]
        and strings["stop_token_ids"] == []
    )
    greedy = completion_body(
        _request(params=SamplingParams(temperature=1e-7, max_tokens=None)),
        model="m",
        eos_token_ids=[EOS],
        max_model_len=100,
    )
    assert greedy["temperature"] == 0.0 and greedy["max_tokens"] == 100 - len(PROMPT)
    assert "seed" not in greedy and "prompt_logprobs" not in greedy and greedy["logprobs"] == 0
    only_prompt = completion_body(_request(prompt_logprobs=True), model="m", eos_token_ids=[EOS])
    assert only_prompt["prompt_logprobs"] == 0
    with pytest.raises(InvalidInputError, match="mixes|list of token ids"):
        completion_body(_request(params=SamplingParams(stop=["a", 3])), model="m", eos_token_ids=[EOS])
    with pytest.raises(InvalidInputError, match="num_samples"):
        completion_body(_request(num_samples=0), model="m", eos_token_ids=[EOS])
    with pytest.raises(InvalidInputError, match="no room"):
        completion_body(
            _request(params=SamplingParams(max_tokens=None)), model="m", eos_token_ids=[EOS], max_model_len=8
        )


def test_parse_choices_tokens_logprobs_topk_and_prompt_extras() -> None:
    request = _request(
        prompt=[5, 6, 7, 8],
        num_samples=2,
        topk_sample_logprobs=1,
        topk_prompt_logprobs=1,
        prompt_logprobs=True,
        prompt_logprobs_last_n=2,
    )
    prompt_entries = [
        None,
        {"6": {"logprob": -3.0, "rank": 9}, "1": {"logprob": -1.0, "rank": 1}},
        {"7": {"logprob": -2.0, "rank": 1}},
        {"8": {"logprob": -4.0, "rank": 3}, "4": {"logprob": -0.5, "rank": 1}},
    ]
    choices = [
        {
            "index": 1,
            "token_ids": [3],
            "finish_reason": "stop",
            "logprobs": {"token_logprobs": [-0.1], "top_logprobs": [{"token_id:3": -0.1}]},
            "prompt_logprobs": prompt_entries,
        },
        {
            "index": 0,
            "token_ids": [9, 10],
            "finish_reason": "length",
            "logprobs": {
                "token_logprobs": [-5.0, -0.2],
                # the sampled token is in the dict as well as the top-k: the top 1 is kept
                "top_logprobs": [{"token_id:9": -5.0, "token_id:4": -0.3}, {"token_id:10": -0.2}],
            },
            "prompt_logprobs": prompt_entries,
        },
    ]
    result = parse_choices(request, choices)
    first, second = result.sequences
    assert (first.tokens, first.logprobs, first.stop_reason) == ([9, 10], [-5.0, -0.2], "length")
    assert first.topk_logprobs == [[(4, -0.3)], [(10, -0.2)]]
    assert (second.tokens, second.stop_reason) == ([3], "stop")
    assert result.prompt_logprobs == [None, None, -2.0, -4.0]  # last_n=2: only the last two scored
    assert result.topk_prompt_logprobs == [None, None, [(7, -2.0)], [(4, -0.5)]]
    with pytest.raises(VllmUnavailableError, match="2 samples"):
        parse_choices(_request(num_samples=3), choices)


def test_stream_state_holds_the_last_token_until_the_finish() -> None:
    seen: list[tuple[Any, ...]] = []
    texts: list[tuple[int, str]] = []
    request = _request(num_samples=2, on_token=lambda *a: seen.append(a))
    state = _StreamState(request, on_text=lambda i, t: texts.append((i, t)))

    def chunk(index: int, tokens: list[int], finish: str | None = None, text: str = "x") -> dict[str, Any]:
        lps = [-1.0 * t for t in tokens]
        return {
            "choices": [
                {
                    "index": index,
                    "text": text,
                    "token_ids": tokens,
                    "finish_reason": finish,
                    "logprobs": {"token_logprobs": lps, "top_logprobs": [{} for _ in tokens]},
                }
            ]
        }

    state.feed(chunk(0, [1, 2]))
    state.feed(chunk(1, [3]))
    state.feed(chunk(0, [4]))
    state.feed(chunk(0, [], "length", text=""))  # the finish may come in a chunk of its own
    state.feed(chunk(1, [5], "stop"))
    assert seen == [
        (0, 1, -1.0, None, False),
        (0, 2, -2.0, None, False),
        (0, 4, -4.0, None, True),
        (1, 3, -3.0, None, False),
        (1, 5, -5.0, None, True),
    ]
    assert texts == [(0, "x"), (1, "x"), (0, "x"), (1, "x")]
    result = state.result()
    assert [s.tokens for s in result.sequences] == [[1, 2, 4], [3, 5]]
    assert [s.stop_reason for s in result.sequences] == ["length", "stop"]


def test_requests_vllm_cannot_serve_are_named() -> None:
    assert unsupported(_request()) is None
    assert "target_prompt_tokens" in (unsupported(_request(target_prompt_tokens=[[1]] * 7)) or "")
    assert "prompt_alt_tokens_k" in (unsupported(_request(prompt_alt_tokens_k=2)) or "")
    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 64, 300)] == [1, 8, 8, 16, 64, 320]
    with pytest.raises(InvalidInputError, match="max_lora_rank"):
        vllm_lora_rank(1024)


def test_adapter_problem_reads_the_peft_config(tmp_path: Path) -> None:
    def adapter(name: str, **config: Any) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(
            json.dumps({"r": 8, "target_modules": ["q_proj"], **config})
        )
        return tmp_path / name

    assert adapter_problem(adapter("ok"), max_lora_rank=8) is None
    assert "rank 32" in (adapter_problem(adapter("big", r=32), max_lora_rank=16) or "")
    assert "output head" in (adapter_problem(adapter("head", target_modules=["q_proj", "lm_head"]), 64) or "")
    assert "expert" in (
        adapter_problem(adapter("moe", target_parameters=["mlp.experts.gate_up_proj"]), 64) or ""
    )
    assert "adapter_config.json" in (adapter_problem(tmp_path / "missing", 64) or "")


def test_probe_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(VllmUnavailableError, match="not an executable file"):
        probe_vllm_python(str(tmp_path / "nope" / "python"))
    if find_vllm_python() != sys.executable:
        with pytest.raises(VllmUnavailableError, match="has no vLLM"):
            probe_vllm_python(sys.executable)  # the project's own environment has no vLLM


def test_selecting_vllm_without_an_environment_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(VllmUnavailableError, match="--vllm-python .* or --vllm-url"):
        VllmPool(VllmOptions(), tmp_path)
    with pytest.raises(VllmUnavailableError, match="not an executable file"):
        VllmPool(VllmOptions(python=str(tmp_path / "python")), tmp_path)


# --- a real vLLM server ---------------------------------------------------------------------------------

VLLM_PYTHON = find_vllm_python()
needs_vllm = pytest.mark.skipif(
    VLLM_PYTHON is None, reason="no vLLM environment (run scripts/vllm_env.sh, or set EZTINKER_VLLM_PYTHON)"
)


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """The tiny Qwen2 at hidden size 128: 4 heads of 32, the smallest head vLLM's CPU attention takes."""
    out = tmp_path_factory.mktemp("tiny-qwen2-h128")
    return make_tiny_model(out, "qwen2", hidden_size=128, num_layers=2, tokenizer_dir=tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def service(vllm_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """An EZTinker service with `--sampler vllm --vllm-python ...`: the one vLLM server of this module.

    Its vLLM starts here, before `serve()` (whose start-up timeout is shorter than vLLM's start on 2 cores);
    the service's own start then finds it up.
    """
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("vllm-data"),
        models=[str(vllm_model_dir)],
        device="cpu",
        sampler="vllm",
        vllm_python=VLLM_PYTHON,
        vllm_max_loras=2,
        vllm_max_lora_rank=8,
        vllm_kv_cache_gib=1,
    )
    svc = Service(settings)
    assert isinstance(svc.backend, VllmBackend)
    svc.backend.start_vllm(str(vllm_model_dir), wait=True)
    yield svc
    svc.backend.pool.stop()  # (serve() stops the whole service when a test used it; this is idempotent)


@pytest.fixture(scope="module")
def url(service: Service, monkeypatch_module: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    monkeypatch_module.setenv("TINKER_API_KEY", "tml-test")
    monkeypatch_module.setenv("TINKER_TELEMETRY", "0")
    monkeypatch_module.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    with eztinker.serve(service=service) as served:
        yield served


@pytest.fixture(scope="module")
def sampler(service: Service, vllm_model_dir: Path) -> VllmSampler:
    backend = service.backend
    assert isinstance(backend, VllmBackend)
    return backend.pool.running()[str(vllm_model_dir)]


@pytest.fixture(scope="module")
def server(sampler: VllmSampler) -> VllmServer:
    endpoint = sampler.endpoint
    assert isinstance(endpoint, VllmServer)
    return endpoint


@pytest.fixture(scope="module")
def trained(vllm_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An engine on the same model, a run trained a few steps (a non-zero adapter), its snapshots as PEFT dirs."""
    engine = Engine()
    name = str(vllm_model_dir)
    run = engine.create_run(name, {"r": 8, "seed": 1}).run_id
    root = tmp_path_factory.mktemp("snapshots")
    snapshots = []
    for i in range(3):  # three snapshots at different steps: three different adapters
        engine.forward_backward(run, [Datum.from_labels([*PROMPT, 13, 14, 15])])
        engine.optim_step(run, AdamParams(learning_rate=5e-2))
        sampler_id = f"snap-{i}"
        engine.save_sampler(run, sampler_id)
        write_snapshot(engine, run, root, sampler_id)
        snapshots.append(sampler_id)
    big = engine.create_run(name, {"r": 16, "seed": 2}).run_id  # above the server's --max-lora-rank 8
    write_snapshot(engine, big, root, "big-rank")
    return {"engine": engine, "name": name, "run": run, "root": root, "snapshots": snapshots}


def _trainer_logprobs(engine: Engine, run: str, tokens: list[int]) -> list[float]:
    """log p(tokens[i+1] | tokens[:i+1]) from the training forward (the run's live adapter)."""
    result = engine.forward(run, [Datum.from_targets(tokens[:-1], tokens[1:])], "cross_entropy")
    return result.logprobs[0].tolist()


@needs_vllm
def test_base_sampling_and_logprobs(sampler: VllmSampler, trained: dict[str, Any]) -> None:
    engine, name = trained["engine"], trained["name"]
    [result] = sampler.sample_sync(
        [
            _request(
                params=SamplingParams(max_tokens=12, seed=5, stop=[]),
                prompt_logprobs=True,
                topk_sample_logprobs=3,
            )
        ]
    )
    [seq] = result.sequences
    assert len(seq.tokens) == 12 and seq.stop_reason == "length"
    assert all(len(top) == 3 and top == sorted(top, key=lambda p: -p[1]) for top in seq.topk_logprobs or [])
    full = PROMPT + seq.tokens
    expected = engine.compute_logprobs(full, base_model=name)  # the engine's own scoring of the base
    got = [*result.prompt_logprobs[1:], *seq.logprobs]  # type: ignore[index]
    delta = max(abs(a - b) for a, b in zip(got, expected[1:], strict=True))  # type: ignore[operator]
    print(f"base: max |vLLM - engine| logprob = {delta:.2e}")
    assert delta <= LOGPROB_TOLERANCE


@needs_vllm
def test_penalties_and_logit_bias_choose_as_the_engine_does(
    sampler: VllmSampler, trained: dict[str, Any]
) -> None:
    """Greedy under frequency / presence penalties and a logit bias: vLLM picks the engine's tokens (both
    count the generated tokens only), and reports the model's own logprobs as the engine does."""
    engine, name = trained["engine"], trained["name"]
    for shaping in ({"presence_penalty": 1.5, "frequency_penalty": 0.5}, {"logit_bias": {40: 100.0}}):
        params = SamplingParams(max_tokens=10, temperature=0.0, stop=[], **shaping)
        [ours] = engine.sample(PROMPT, params, base_model=name).sequences
        [[theirs]] = [r.sequences for r in sampler.sample_sync([_request(params=params)])]
        assert theirs.tokens == ours.tokens, shaping
        assert (
            max(abs(a - b) for a, b in zip(theirs.logprobs, ours.logprobs, strict=True)) <= LOGPROB_TOLERANCE
        )


@needs_vllm
def test_a_grammar_constrains_vllm_as_it_constrains_the_engine(
    sampler: VllmSampler, trained: dict[str, Any]
) -> None:
    """Greedy within a JSON schema and within a choice: vLLM (its guidance backend) draws the engine's
    tokens, both ending on EOS once the grammar is complete, with the model's own log-probabilities and
    top-k (vLLM's are renormalized over what the grammar allows, so the sample is scored again), also
    those its streamed `on_token` hears."""
    from eztinker.api.structured import choice_answer, json_answer

    engine, name = trained["engine"], trained["name"]
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 999}}, "required": ["n"]}
    for answer in (json_answer(schema, "f"), choice_answer(["sunny", "rain", "snow"], "f")):
        params = SamplingParams(max_tokens=30, temperature=0.0, grammar=answer.grammar(None))
        [ours] = engine.sample_many(name, [_request(params=params, topk_sample_logprobs=2)])[0].sequences
        heard: list[tuple[Any, ...]] = []
        asked = _request(params=params, topk_sample_logprobs=2, on_token=lambda *a: heard.append(a))
        [[theirs]] = [r.sequences for r in sampler.sample_sync([asked])]
        assert theirs.tokens == ours.tokens and ours.stop_reason == theirs.stop_reason == "stop"
        assert (
            max(abs(a - b) for a, b in zip(theirs.logprobs, ours.logprobs, strict=True)) <= LOGPROB_TOLERANCE
        )
        assert [[t for t, _ in top] for top in theirs.topk_logprobs or []] == [
            [t for t, _ in top] for top in ours.topk_logprobs or []
        ]
        assert [(a[1], a[2], a[4]) for a in heard] == [
            (t, lp, i == len(theirs.tokens) - 1)
            for i, (t, lp) in enumerate(zip(theirs.tokens, theirs.logprobs))
        ]


@needs_vllm
def test_a_grammar_that_never_stops_is_sampled_by_the_engine(
    url: str, service: Service, vllm_model_dir: Path
) -> None:
    """`stop=[]` with a grammar: the engine ends the sample right after the grammar's last token; vLLM would
    draw EOS after EOS to max_tokens. Such a request is routed to the engine sampler (whose batches the
    running service's scheduler steps: hence `url`)."""
    backend = service.backend
    assert isinstance(backend, VllmBackend)
    params = SamplingParams(max_tokens=20, temperature=0.0, stop=[], grammar='start: "yes" | "no"')
    before = backend.routes["engine"]
    [result] = backend.sample(str(vllm_model_dir), [_request(params=params)]).result()
    [seq] = result.sequences
    assert backend.routes["engine"] == before + 1
    assert seq.stop_reason == "stop" and EOS not in seq.tokens and len(seq.tokens) < 20


@needs_vllm
def test_vllm_refuses_what_the_engine_refuses(service: Service, vllm_model_dir: Path) -> None:
    """A prompt + max_tokens beyond the context: vLLM alone samples to the context's end ("length"); the
    backend checks every request by the engine's rules first, so both samplers answer the same 4xx."""
    backend = service.backend
    assert isinstance(backend, VllmBackend)
    name = str(vllm_model_dir)
    context = backend.engine.base_model(name).max_length
    near_end = _request(prompt=[5] * (context - 2), params=SamplingParams(max_tokens=10, temperature=0.0))
    before = dict(backend.routes)
    with pytest.raises(InvalidInputError, match="exceeds the model's context") as refused:
        backend.sample(name, [near_end]).result()
    assert refused.value.field == "sampling_params.max_tokens"
    assert backend.routes == before  # refused before it went anywhere


@needs_vllm
def test_snapshot_logprobs_equal_the_trainers(sampler: VllmSampler, trained: dict[str, Any]) -> None:
    """The snapshot taken at the run's current step: vLLM's logprobs = the training forward's (±1e-3)."""
    engine, run, root = trained["engine"], trained["run"], trained["root"]
    latest = trained["snapshots"][-1]  # taken after the last step: the run's live weights
    assert sampler.add_adapter(latest, root / latest) is None
    assert latest in sampler.loaded_adapters
    [result] = sampler.sample_sync(
        [
            _request(
                params=SamplingParams(max_tokens=10, seed=1, stop=[]), adapter=latest, prompt_logprobs=True
            )
        ]
    )
    [seq] = result.sequences
    trainer = _trainer_logprobs(engine, run, PROMPT + seq.tokens)
    got = [*result.prompt_logprobs[1:], *seq.logprobs]  # type: ignore[index]
    delta = max(abs(a - b) for a, b in zip(got, trainer, strict=True))
    print(f"snapshot: max |vLLM - trainer| logprob = {delta:.2e}")
    assert delta <= LOGPROB_TOLERANCE
    # and the adapter matters: the base model's numbers are not these
    [base] = sampler.sample_sync([_request(prompt_logprobs=True)])
    assert (
        max(abs(a - b) for a, b in zip(base.prompt_logprobs[1:], result.prompt_logprobs[1 : len(PROMPT)]))
        > 1e-3
    )  # type: ignore[index,arg-type,operator]


@needs_vllm
def test_seeds_and_num_samples(sampler: VllmSampler) -> None:
    params = SamplingParams(max_tokens=8, seed=11, stop=[])
    a, b = sampler.sample_sync(
        [_request(params=params, num_samples=4), _request(params=params, num_samples=4)]
    )
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]  # a seed reproduces
    assert len({tuple(s.tokens) for s in a.sequences}) == 4  # the samples of one request differ
    [c] = sampler.sample_sync(
        [_request(params=SamplingParams(max_tokens=8, seed=12, stop=[]), num_samples=4)]
    )
    firsts = {tuple(s.tokens) for s in a.sequences}
    assert not firsts & {tuple(s.tokens) for s in c.sequences}  # seed 12 shares no sample with seed 11
    [greedy] = sampler.sample_sync(
        [_request(params=SamplingParams(max_tokens=6, temperature=0, stop=[]), num_samples=2)]
    )
    assert greedy.sequences[0].tokens == greedy.sequences[1].tokens


@needs_vllm
def test_stop_token_ids_and_strings(sampler: VllmSampler, trained: dict[str, Any]) -> None:
    tokenizer = trained["engine"].tokenizer(trained["name"])
    [free] = sampler.sample_sync([_request(params=SamplingParams(max_tokens=20, seed=3, stop=[]))])
    tokens = free.sequences[0].tokens
    stop_id = tokens[4]
    [by_id] = sampler.sample_sync([_request(params=SamplingParams(max_tokens=20, seed=3, stop=[stop_id]))])
    cut = tokens.index(stop_id) + 1
    assert by_id.sequences[0].tokens == tokens[:cut] and by_id.sequences[0].stop_reason == "stop"
    # a stop string: the text of the sixth token (or its last character)
    text = tokenizer.decode(tokens[5:6], skip_special_tokens=False).strip() or "e"
    [by_text] = sampler.sample_sync([_request(params=SamplingParams(max_tokens=20, seed=3, stop=[text]))])
    seq = by_text.sequences[0]
    decoded = tokenizer.decode(seq.tokens, skip_special_tokens=False)
    assert seq.tokens == tokens[: len(seq.tokens)]  # the same draws, cut where the text appears
    if seq.stop_reason == "stop":
        assert text in decoded and text not in tokenizer.decode(seq.tokens[:-1], skip_special_tokens=False)
    else:
        assert text not in decoded


@needs_vllm
def test_streaming_on_token_text_and_cancel(sampler: VllmSampler) -> None:
    seen: list[tuple[Any, ...]] = []
    params = SamplingParams(max_tokens=6, seed=2, stop=[])
    [plain] = sampler.sample_sync([_request(params=params, num_samples=2)])
    [streamed] = sampler.sample_sync(
        [_request(params=params, num_samples=2, on_token=lambda *a: seen.append(a))]
    )
    assert [s.tokens for s in streamed.sequences] == [s.tokens for s in plain.sequences]
    for i, seq in enumerate(streamed.sequences):
        mine = [a for a in seen if a[0] == i]
        assert [a[1] for a in mine] == seq.tokens and [a[4] for a in mine] == [False] * 5 + [True]
    texts: list[str] = []
    result = sampler.stream(_request(params=params), on_text=lambda i, t: texts.append(t)).result()
    assert len(result.sequences[0].tokens) == 6 and "".join(texts)
    count = [0]

    def on_token(*_: Any) -> None:
        count[0] += 1

    [cut] = sampler.sample_sync(
        [
            _request(
                params=SamplingParams(max_tokens=300, stop=[]),
                on_token=on_token,
                cancelled=lambda: count[0] >= 3,
            )
        ]
    )
    assert 3 <= len(cut.sequences[0].tokens) < 300 and cut.sequences[0].stop_reason == "length"


@needs_vllm
def test_a_streamed_request_gets_its_prompt_logprobs(sampler: VllmSampler) -> None:
    """vLLM refuses `prompt_logprobs` on a stream (an OpenAI `stream` + `echo` + `logprobs`); the sampler
    reads them beside it, so a streamed request answers what the same request unstreamed does."""
    params = SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    asked = _request(params=params, prompt_logprobs=True, topk_prompt_logprobs=2, topk_sample_logprobs=1)
    [plain] = sampler.sample_sync([asked])
    heard: list[tuple[Any, ...]] = []
    [streamed] = sampler.sample_sync([dataclasses.replace(asked, on_token=lambda *a: heard.append(a))])
    assert streamed.sequences[0].tokens == plain.sequences[0].tokens == [a[1] for a in heard]
    assert streamed.prompt_logprobs is not None and plain.prompt_logprobs is not None
    assert streamed.prompt_logprobs[0] is None and len(streamed.prompt_logprobs) == len(PROMPT)
    assert max(_delta(a, b) for a, b in zip(streamed.prompt_logprobs[1:], plain.prompt_logprobs[1:])) <= 1e-6
    assert [[t for t, _ in e or []] for e in streamed.topk_prompt_logprobs or []] == [
        [t for t, _ in e or []] for e in plain.topk_prompt_logprobs or []
    ]


def _delta(a: float | None, b: float | None) -> float:
    return math.inf if a is None or b is None else abs(a - b)


@needs_vllm
def test_snapshot_hot_load_lru_and_unload(
    sampler: VllmSampler, server: VllmServer, trained: dict[str, Any]
) -> None:
    root, snaps = trained["root"], trained["snapshots"]
    for snap in snaps:  # max_loras=2: the third evicts the least recently used
        assert sampler.add_adapter(snap, root / snap) is None
    assert sampler.loaded_adapters == snaps[1:]
    [again] = sampler.sample_sync([_request(adapter=snaps[0], prompt_logprobs=True)])  # reloaded on demand
    assert sampler.loaded_adapters == [snaps[2], snaps[0]]
    served = {m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    assert snaps[0] in served and snaps[1] not in served
    # what a reloaded adapter computes is what it computed before
    engine = trained["engine"]
    expected = engine.compute_logprobs(PROMPT, sampler_id=snaps[0])
    assert max(abs(a - b) for a, b in zip(again.prompt_logprobs[1:], expected[1:])) <= LOGPROB_TOLERANCE  # type: ignore[index,arg-type,operator]
    sampler.remove_adapter(snaps[0])
    assert snaps[0] not in sampler.loaded_adapters and snaps[0] not in sampler.adapters
    served = {m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    assert snaps[0] not in served
    with pytest.raises(InvalidInputError, match="not registered"):
        sampler.sample_sync([_request(adapter=snaps[0])])


@needs_vllm
def test_a_burst_beyond_max_loras_leaves_max_loras_loaded(
    sampler: VllmSampler, trained: dict[str, Any]
) -> None:
    """Requests for three adapters at once with max_loras=2: all three load (none may be evicted while in
    use), and once they are done the least recently used goes, back to two."""
    root, snaps = trained["root"], trained["snapshots"]
    for snap in snaps:
        assert sampler.add_adapter(snap, root / snap) is None
    params = SamplingParams(max_tokens=64, temperature=0.0, stop=[])
    results = sampler.sample_sync([_request(params=params, adapter=snap) for snap in snaps])
    assert [len(r.sequences[0].tokens) for r in results] == [64] * 3
    assert len(sampler.loaded_adapters) <= 2 and set(sampler.loaded_adapters) <= set(snaps)


@needs_vllm
def test_rank_above_the_limit_is_left_to_the_engine(sampler: VllmSampler, trained: dict[str, Any]) -> None:
    problem = sampler.add_adapter("big-rank", trained["root"] / "big-rank")
    assert problem is not None and "rank 16" in problem
    assert "rank 16" in (sampler.unsupported(_request(adapter="big-rank")) or "")
    assert "big-rank" not in sampler.loaded_adapters


@needs_vllm
def test_an_adapter_vllm_refuses_is_marked(
    sampler: VllmSampler, trained: dict[str, Any], tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(trained["root"] / trained["snapshots"][0], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    problem = sampler.add_adapter("broken", broken)
    assert problem is not None and "vLLM refused to load it" in problem
    assert "refused" in (sampler.unsupported(_request(adapter="broken")) or "")
    [ok] = sampler.sample_sync([_request()])  # the server is fine
    assert len(ok.sequences[0].tokens) == 4


@needs_vllm
def test_external_server_through_the_pool(
    server: VllmServer, trained: dict[str, Any], tmp_path: Path
) -> None:
    """`--vllm-url`: the pool uses a server it did not start (and leaves it running)."""
    options = VllmOptions(url=server.url, max_loras=2, max_lora_rank=8, health_interval=1.0)
    pool = VllmPool(options, tmp_path / "adapters")
    try:
        client = pool.start(server.model, [EOS])
        assert client is not None and pool.ready(server.model) is client
        assert client.endpoint.served_name == server.served_name and client.endpoint.max_model_len == 512
        assert pool.serves(server.model) and not pool.serves("another/model")
        [base] = client.sample_sync([_request(params=SamplingParams(max_tokens=3, temperature=0))])
        assert len(base.sequences[0].tokens) == 3
        sampler_id = "sess-1:sample:0"  # Tinker's ids hold colons: a plain name for the directory and vLLM
        info = write_snapshot(trained["engine"], trained["run"], pool.adapter_root, sampler_id)
        assert info.path == pool.snapshot_path(sampler_id) and ":" not in info.path.name
        assert pool.add_snapshot(server.model, sampler_id, info.path) is None
        [adapted] = client.sample_sync([_request(adapter=sampler_id, prompt_logprobs=True)])
        expected = trained["engine"].compute_logprobs(PROMPT, run_id=trained["run"])
        assert _max_delta(adapted.prompt_logprobs, expected) <= LOGPROB_TOLERANCE
        pool.remove_snapshot(sampler_id)
        assert not info.path.exists() and sampler_id not in client.loaded_adapters
    finally:
        pool.stop()
    assert server.failure() is None  # not stopped: it is not the pool's


# --- through the EZTinker server: the Tinker SDK and the OpenAI routes ------------------------------------


def _max_delta(got: list[float | None] | None, expected: list[float | None]) -> float:
    """max |got - expected| over the positions both score."""
    assert got is not None and len(got) == len(expected)
    return max(abs(a - b) for a, b in zip(got, expected, strict=True) if a is not None and b is not None)


@needs_vllm
def test_tinker_sdk_sampling_client_on_vllm(url: str, service: Service, vllm_model_dir: Path) -> None:
    tinker = pytest.importorskip("tinker")
    from tinker import types

    backend = service.backend
    assert isinstance(backend, VllmBackend)
    client = tinker.ServiceClient(base_url=url)
    client.get_server_capabilities()
    try:
        # rank 8, no output head: an adapter vLLM serves (vLLM's LoRA does not take lm_head)
        training = client.create_lora_training_client(
            base_model=str(vllm_model_dir), rank=8, seed=0, train_unembed=False
        )
        tokens = [*PROMPT, 13, 14, 15, 16]
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
        )
        for _ in range(3):
            fb = training.forward_backward([datum], "cross_entropy")
            training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
            fb.result()
        before = backend.routes["vllm"]
        sampling = training.save_weights_and_get_sampling_client()
        assert len(backend.pool.running()[str(vllm_model_dir)].loaded_adapters) >= 1  # hot-loaded
        result = sampling.sample(
            types.ModelInput.from_ints(PROMPT),
            num_samples=2,
            sampling_params=types.SamplingParams(max_tokens=6, seed=1, stop=[]),
        ).result()
        assert backend.routes["vllm"] == before + 1
        assert [len(s.tokens) for s in result.sequences] == [6, 6]
        seq = result.sequences[0]
        full = PROMPT + list(seq.tokens)
        forward = training.forward(
            [
                types.Datum(
                    model_input=types.ModelInput.from_ints(full[:-1]),
                    loss_fn_inputs={"target_tokens": full[1:]},
                )
            ],
            "cross_entropy",
        ).result()
        trainer = list(forward.loss_fn_outputs[0]["logprobs"].data)
        assert _max_delta(list(seq.logprobs), trainer[-len(seq.tokens) :]) <= LOGPROB_TOLERANCE
        scored = sampling.compute_logprobs(types.ModelInput.from_ints(full)).result()
        assert backend.routes["vllm"] == before + 2
        assert _max_delta(list(scored), [None, *trainer]) <= LOGPROB_TOLERANCE
        # Tinker's default LoRA also adapts the output head: that snapshot is sampled by the engine
        with_head = client.create_lora_training_client(base_model=str(vllm_model_dir), rank=8, seed=0)
        engine_before = backend.routes["engine"]
        head_sampling = with_head.save_weights_and_get_sampling_client()
        out = head_sampling.sample(
            types.ModelInput.from_ints(PROMPT),
            num_samples=1,
            sampling_params=types.SamplingParams(max_tokens=3),
        ).result()
        assert len(out.sequences[0].tokens) <= 3 and backend.routes["engine"] == engine_before + 1
    finally:
        client.close("success").result()


@needs_vllm
def test_openai_completions_and_streaming_on_vllm(url: str, service: Service, vllm_model_dir: Path) -> None:
    openai = pytest.importorskip("openai")
    backend = service.backend
    assert isinstance(backend, VllmBackend)
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    base = str(vllm_model_dir)
    before = dict(backend.routes)
    plain = oai.completions.create(model=base, prompt=PROMPT, max_tokens=8, seed=4, logprobs=2)
    assert backend.routes["vllm"] == before.get("vllm", 0) + 1
    choice = plain.choices[0]
    assert choice.text and choice.logprobs is not None and len(choice.logprobs.token_logprobs or []) >= 1
    streamed = oai.completions.create(model=base, prompt=PROMPT, max_tokens=8, seed=4, stream=True)
    text = "".join(chunk.choices[0].text for chunk in streamed if chunk.choices)
    assert text == choice.text  # same seed, same tokens: streaming through vLLM changes nothing
    assert backend.routes["vllm"] == before.get("vllm", 0) + 2
    chat = oai.chat.completions.create(
        model=base, messages=[{"role": "user", "content": "the model"}], max_tokens=5, seed=2
    )
    assert chat.choices[0].message.content is not None
    # a run's live adapter is sampled by the engine (it changes every step): see VllmBackend
    with eztinker.EZTinkerClient(base_url=url) as native:
        run_id = native.create_run(base_model=base, lora_config={"r": 8})
        engine_before = backend.routes["engine"]
        live = oai.completions.create(model=run_id, prompt=PROMPT, max_tokens=4, seed=1)
        assert live.choices[0].text is not None and backend.routes["engine"] == engine_before + 1


COOKBOOK_STEPS = 2  # math_rl steps; each samples BATCH * GROUP rollouts from a fresh snapshot
COOKBOOK_BATCH, COOKBOOK_GROUP = 2, 2


@needs_vllm
def test_cookbook_math_rl_kl_sample_train_on_vllm(
    url: str, service: Service, vllm_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tinker-cookbook's math_rl flow (`rl.train.main` on the arithmetic environment, as
    `recipes/math_rl/train.py` builds it, `stable_reinforce`) with its rollouts sampled by vLLM.

    Every step samples from a fresh snapshot (`save_weights_and_get_sampling_client`), then `forward_backward`
    scores the same tokens on the same weights; the cookbook logs the mean difference as
    `optim/kl_sample_train_v1` (and half its mean square as `_v2`). Both must stay within LOGPROB_TOLERANCE
    (|v1| and sqrt(2 v2), the RMS difference, <= 1e-3; measured: |v1| ~1e-8, v2 ~1e-14). The `routes` counter
    shows the rollouts were vLLM's, not the engine sampler's (which would make this the engine against itself).

    vLLM's LoRA does not take the output head, and the cookbook's `create_lora_training_client` leaves Tinker's
    default `train_unembed=True` (such a snapshot is sampled by the engine): the run is created without it.
    The cookbook runs in this process (its imports are already here: a subprocess would add their start-up).
    """
    pytest.importorskip("tinker_cookbook")
    import asyncio
    import functools
    import logging

    import tinker
    from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticDatasetBuilder
    from tinker_cookbook.rl.train import Config, main

    backend = service.backend
    assert isinstance(backend, VllmBackend)
    monkeypatch.setenv("TINKER_BASE_URL", url)
    create = tinker.ServiceClient.create_lora_training_client
    monkeypatch.setattr(
        tinker.ServiceClient,
        "create_lora_training_client",
        functools.partialmethod(create, train_unembed=False),
    )
    model = str(vllm_model_dir)
    log = tmp_path / "log"
    config = Config(
        learning_rate=1e-2,
        dataset_builder=ArithmeticDatasetBuilder(
            batch_size=COOKBOOK_BATCH,
            model_name_for_tokenizer=model,
            renderer_name="role_colon",
            n_batches=COOKBOOK_STEPS,
            group_size=COOKBOOK_GROUP,
        ),
        model_name=model,
        recipe_name="recipe_math_rl",
        renderer_name="role_colon",
        lora_rank=8,
        max_tokens=12,
        temperature=1.0,
        log_path=str(log),
        eval_every=0,
        save_every=0,
        loss_fn="stable_reinforce",
        max_steps=COOKBOOK_STEPS,
    )
    before = dict(backend.routes)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # the cookbook replaces the root logger's handlers
    t0 = time.monotonic()
    try:
        asyncio.run(main(config))
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
    print(f"cookbook math_rl, {COOKBOOK_STEPS} steps on vLLM: {time.monotonic() - t0:.1f} s")
    rollouts = COOKBOOK_STEPS * COOKBOOK_BATCH * COOKBOOK_GROUP
    vllm_requests = backend.routes["vllm"] - before.get("vllm", 0)
    engine_requests = backend.routes["engine"] - before.get("engine", 0)
    assert (vllm_requests, engine_requests) == (rollouts, 0)
    metrics = [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "optim/kl_sample_train_v1" in m]
    assert len(steps) == COOKBOOK_STEPS
    for i, step in enumerate(steps):
        v1, v2 = step["optim/kl_sample_train_v1"], step["optim/kl_sample_train_v2"]
        print(
            f"step {i}: kl_sample_train_v1 = {v1:.2e}, v2 = {v2:.2e}, entropy = {step['optim/entropy']:.3f}"
        )
        assert abs(v1) <= LOGPROB_TOLERANCE and (2 * v2) ** 0.5 <= LOGPROB_TOLERANCE
        assert step["optim/entropy"] > 0  # sampled tokens with real (non-zero) logprobs were compared


@needs_vllm
def test_killed_mid_request_fails_clearly_then_recovers(
    sampler: VllmSampler, server: VllmServer, trained: dict[str, Any], service: Service, url: str
) -> None:
    started = threading.Event()
    generation = server.generation
    future = sampler.sample(
        [_request(params=SamplingParams(max_tokens=480, stop=[]), on_token=lambda *a: started.set())]
    )
    assert started.wait(120), "the long request never started streaming"
    assert server.pid is not None
    os.kill(server.pid, signal.SIGKILL)  # the API server; the supervisor must clean up its engine core
    with pytest.raises(VllmUnavailableError, match="stopped while serving"):
        future.result(timeout=60)
    # while vLLM restarts, the server's sampling goes to the engine sampler (same numbers, no wait)
    backend = service.backend
    assert isinstance(backend, VllmBackend)
    engine_before = backend.routes["engine"]
    [meanwhile] = backend.sample(
        server.model, [_request(params=SamplingParams(max_tokens=3, stop=[]))]
    ).result(60)
    assert len(meanwhile.sequences[0].tokens) == 3 and backend.routes["engine"] == engine_before + 1
    t0 = time.monotonic()
    server.wait_ready(600)
    print(f"restarted in {time.monotonic() - t0:.0f} s")
    assert server.generation == generation + 1
    [after] = sampler.sample_sync([_request(params=SamplingParams(max_tokens=4, temperature=0))])
    assert len(after.sequences[0].tokens) == 4
    vllm_before = backend.routes["vllm"]
    backend.sample(server.model, [_request()]).result(60)
    assert backend.routes["vllm"] == vllm_before + 1  # back on vLLM
    snap = trained["snapshots"][-1]
    [adapted] = sampler.sample_sync([_request(adapter=snap, prompt_logprobs=True)])  # reloaded after restart
    expected = trained["engine"].compute_logprobs(PROMPT, sampler_id=snap)
    assert max(abs(a - b) for a, b in zip(adapted.prompt_logprobs[1:], expected[1:])) <= LOGPROB_TOLERANCE  # type: ignore[index,arg-type,operator]
