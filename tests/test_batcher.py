"""Continuous batching: requests join a running batch at any step, share prefills, and wait for KV room."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import torch

import eztinker
from eztinker import EZTinkerClient
from eztinker.engine import batcher as batcher_module
from eztinker.engine.batcher import ContinuousBatcher
from eztinker.engine.engine import Engine, EngineConfig
from eztinker.engine.sampler import SampleRequest, SamplerLimits, sample_batch
from eztinker.engine.types import AdamParams, Datum, SamplingParams
from eztinker.scheduler import Batchable, Deferred, Job, Scheduler

PROMPTS = [[40, 41, 42], [300, 12, 700, 13, 14, 15, 16, 9, 88], [500], [61, 62, 63, 64, 65]]


def seeded(seed: int, max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, stop=[])


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(device="cpu", dtype=torch.float32))


@pytest.fixture(scope="module")
def model(engine: Engine, tiny_model_dir: Path) -> str:
    name = str(tiny_model_dir)
    engine.base_model(name)
    return name


@pytest.fixture(scope="module")
def trained_run(engine: Engine, model: str) -> str:
    run_id = engine.create_run(model, {"r": 4, "seed": 3}, run_id="batcher-run").run_id
    seq = [5, 6, 7, 8, 9, 10]
    engine.forward_backward(run_id, [Datum.from_targets(seq[:-1], seq[1:])], "cross_entropy")
    engine.optim_step(run_id, AdamParams(learning_rate=0.05))
    return run_id


def run(batcher: ContinuousBatcher, requests: list[SampleRequest], out: list) -> None:
    batcher.add(requests, out.append)


def count_prefills(monkeypatch) -> list[int]:
    """The rows of each prefill forward from now on."""
    prefilled: list[int] = []
    real = batcher_module._prefill

    def counting(base, rows):
        prefilled.append(len(rows))
        return real(base, rows)

    monkeypatch.setattr(batcher_module, "_prefill", counting)
    return prefilled


def drain(batcher: ContinuousBatcher) -> None:
    while batcher.has_work:
        batcher.step()


def test_a_request_joining_mid_generation_samples_as_it_would_alone(
    engine: Engine, model: str, trained_run: str
) -> None:
    base = engine.base_model(model)
    requests = [
        SampleRequest(p, seeded(i, max_tokens=8 + 3 * i), adapter=trained_run if i % 2 else None)
        for i, p in enumerate(PROMPTS)
    ]
    alone = [sample_batch(base, [r])[0] for r in requests]
    batcher = ContinuousBatcher(base)
    outs: list[list] = [[] for _ in requests]
    for i, request in enumerate(requests):  # each joins a batch that is already decoding
        run(batcher, [request], outs[i])
        for _ in range(3):
            batcher.step()
    drain(batcher)
    for expected, out in zip(alone, outs, strict=True):
        (got,) = out[0]
        assert [s.tokens for s in got.sequences] == [s.tokens for s in expected.sequences]
        for a, b in zip(got.sequences, expected.sequences, strict=True):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-5


def test_samples_of_one_request_share_one_prefill(engine: Engine, model: str, monkeypatch) -> None:
    base = engine.base_model(model)
    prefilled = count_prefills(monkeypatch)
    (result,) = sample_batch(base, [SampleRequest(PROMPTS[1], seeded(4), num_samples=6)])
    assert prefilled == [1] and len(result.sequences) == 6
    assert len({tuple(s.tokens) for s in result.sequences}) > 1  # each sample its own stream


def test_rows_wait_for_kv_room_and_then_run(engine: Engine, model: str) -> None:
    base = engine.base_model(model)
    requests = [SampleRequest(p, seeded(10 + i)) for i, p in enumerate(PROMPTS)]
    expected = sample_batch(base, requests)
    per_token = batcher_module._kv_bytes_per_token(base)
    limits = SamplerLimits(kv_cache_bytes=per_token * 2 * (9 + 12))  # room for two rows at most
    batcher = ContinuousBatcher(base, limits)
    out: list = []
    run(batcher, requests, out)
    batcher.step()
    assert batcher.running_rows <= 2 and batcher.waiting_rows >= 2
    peak = 0
    while batcher.has_work:
        batcher.step()
        peak = max(peak, batcher.running_rows)
    assert peak <= 2
    for a, b in zip(out[0], expected, strict=True):
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]


def test_a_bad_request_is_refused_before_it_is_queued(engine: Engine, model: str) -> None:
    batcher = ContinuousBatcher(engine.base_model(model))
    with pytest.raises(Exception, match="prompt"):
        batcher.add([SampleRequest([], seeded(0))], lambda _: None)
    assert not batcher.has_work


def test_a_deferred_job_holds_its_run_until_completed() -> None:
    scheduler = Scheduler()
    scheduler.start()
    completions: list = []
    try:
        sample = scheduler.submit(Job(op="sample", run_id="r", fn=lambda: Deferred(completions.append)))
        after = scheduler.submit(Job(op="optim", run_id="r", fn=lambda: {"ok": True}))
        assert not after.wait_sync(0.3)  # the run's next op waits for the generation
        assert sample.status == "running"
        completions[0]({"tokens": [1]})
        assert sample.wait_sync(5) and sample.result == {"tokens": [1]}
        assert after.wait_sync(5) and after.status == "completed"
    finally:
        scheduler.stop()


def test_sampling_interleaves_with_training_on_one_worker(tmp_path, tiny_model_dir) -> None:
    """A training op submitted during a long generation finishes before it: decode steps and passes alternate."""
    with eztinker.serve(data_dir=tmp_path, models=[str(tiny_model_dir)]) as url:
        with EZTinkerClient(base_url=url) as client:
            run_id = client.create_run(base_model=str(tiny_model_dir), lora_config={"r": 2})
            body = {
                "prompt_tokens": [5, 6, 7],
                "max_new_tokens": 400,
                "temperature": 1.0,
                "seed": 1,
                "stop": [],
            }
            sample_id = httpx.post(f"{url}/v1/sample", json=body).json()["job_id"]
            ids = list(range(5, 25))
            trained = client.forward_backward(run_id, input_ids=ids, target_ids=ids)
            assert trained.result()["loss"] > 0
            # The long-poll's read timeout outlasts its wait (httpx's default 5 s would end it first).
            sample = httpx.get(f"{url}/v1/jobs/{sample_id}", params={"wait": 60}, timeout=90).json()
            while sample["status"] not in ("completed", "failed"):
                sample = httpx.get(f"{url}/v1/jobs/{sample_id}", params={"wait": 60}, timeout=90).json()
            fb = httpx.get(f"{url}/v1/jobs/{trained['job_id']}").json()
            assert sample["status"] == "completed" and len(sample["result"]["samples"][0]["tokens"]) == 400
            assert fb["finished_at"] < sample["finished_at"]
        metrics = httpx.get(f"{url}/metrics").text
        assert "eztinker_sample_time_to_first_token_seconds_count 1.0" in metrics
        assert "eztinker_sampling_queue_rows" in metrics
        assert "eztinker_tokens_sampled_total 400.0" in metrics


def test_samples_of_one_run_start_together_and_training_waits_for_them() -> None:
    scheduler = Scheduler(runners={"sample": lambda requests: [None] * len(requests)})
    completions: list = []
    try:
        deferred = Deferred(completions.append)
        samples = [
            scheduler.submit(
                Job(
                    op="sample",
                    run_id="r",
                    fn=lambda: deferred,
                    shared=True,
                    batch=Batchable("sample", "g", None, lambda _: deferred),
                )
            )
            for _ in range(3)
        ]
        train = scheduler.submit(Job(op="forward_backward", run_id="r", fn=lambda: {"ok": True}))
        scheduler.start()  # everything is queued: the samples go in one pass
        deadline = time.monotonic() + 5
        while len(completions) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(completions) == 3 and all(s.pass_size == 3 for s in samples)  # one pass, side by side
        assert not train.wait_sync(0.2)
        for complete in completions:
            complete({})
        assert train.wait_sync(5) and train.status == "completed"
    finally:
        scheduler.stop()


def test_a_failing_step_fails_its_requests_and_the_batcher_goes_on(
    engine: Engine, model: str, monkeypatch
) -> None:
    base = engine.base_model(model)
    batcher = ContinuousBatcher(base)
    real = batcher_module._prefill

    def broken(base, rows):
        raise RuntimeError("boom")

    monkeypatch.setattr(batcher_module, "_prefill", broken)
    failed: list = []
    run(batcher, [SampleRequest(PROMPTS[0], seeded(1))], failed)
    drain(batcher)
    assert len(failed) == 1 and "boom" in str(failed[0])
    monkeypatch.setattr(batcher_module, "_prefill", real)
    ok: list = []
    run(batcher, [SampleRequest(PROMPTS[0], seeded(1))], ok)
    drain(batcher)
    assert len(ok[0][0].sequences[0].tokens) == 12


def test_requests_repeating_a_prompt_share_its_prefill(engine: Engine, model: str, monkeypatch) -> None:
    base = engine.base_model(model)
    prefilled: list[int] = []
    real = batcher_module._prefill

    def counting(base, rows):
        prefilled.append(len(rows))
        return real(base, rows)

    requests = [SampleRequest(PROMPTS[3], seeded(i)) for i in range(4)]
    requests.append(SampleRequest(PROMPTS[3], seeded(9), prompt_logprobs=True))
    requests.append(SampleRequest(PROMPTS[3], seeded(8), prompt_logprobs=True))
    alone = [sample_batch(base, [r])[0] for r in requests]
    monkeypatch.setattr(batcher_module, "_prefill", counting)
    together = sample_batch(base, requests)
    assert prefilled == [2]  # one for the plain requests and the first with extras, one for the second
    for a, b in zip(alone, together, strict=True):
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
        assert a.prompt_logprobs == pytest.approx(b.prompt_logprobs, abs=1e-5) if a.prompt_logprobs else True
    assert together[4].prompt_logprobs is not None and together[5].prompt_logprobs is not None


def test_a_request_cancelled_while_it_waits_is_never_prefilled(
    engine: Engine, model: str, monkeypatch
) -> None:
    base = engine.base_model(model)
    prefilled = count_prefills(monkeypatch)
    kept = SampleRequest(PROMPTS[0], seeded(1))
    expected = sample_batch(base, [kept])[0]
    prefilled.clear()
    batcher = ContinuousBatcher(base)
    out_kept, out_cancelled = [], []
    run(batcher, [kept], out_kept)
    run(batcher, [SampleRequest(PROMPTS[1], seeded(2), num_samples=3, cancelled=lambda: True)], out_cancelled)
    drain(batcher)

    assert prefilled == [1]  # the kept request's prompt only
    (cancelled,) = out_cancelled[0]
    assert [s.tokens for s in cancelled.sequences] == [[], [], []]
    (got,) = out_kept[0]
    assert [s.tokens for s in got.sequences] == [s.tokens for s in expected.sequences]
