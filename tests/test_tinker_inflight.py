"""Sampler weights through the official `tinker` SDK: `kind="inflight"` sampling clients (one mutable target
per training model, moved on by each later inflight save), ephemeral snapshots freed once replaced and unused
(an RL loop's memory stays flat), and `get_server_capabilities` with each model's context length."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

import eztinker
from eztinker.engine.errors import NotFoundError
from eztinker.engine.sampler import SampleRequest
from eztinker.engine.types import SamplingParams
from eztinker.models import LoRAConfig, api
from eztinker.service import SampleSpec, Service
from eztinker.settings import Settings

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

TOKENS = [(3 + 17 * i) % 900 + 3 for i in range(12)]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINKER_API_KEY", "tml-test")
        mp.setenv("TINKER_TELEMETRY", "0")
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        mp.delenv("TINKER_PROJECT_ID", raising=False)
        settings = Settings(
            data_dir=tmp_path_factory.mktemp("inflight"), models=[str(tiny_model_dir)], workers=2
        )
        service = Service(settings)
        with eztinker.serve(service=service) as url:
            yield url, service


@pytest.fixture(scope="module")
def client(served):
    url, _ = served
    client = tinker.ServiceClient(base_url=url)
    client.get_server_capabilities()  # the SDK's REST holder first (see test_tinker_sdk.py)
    yield client
    client.close("success").result()


def _datum() -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)},
    )


def _step(training, lr: float = 5e-2) -> None:
    training.forward_backward([_datum()], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=lr)).result()


def _logprobs(sampler) -> list[float]:
    return sampler.compute_logprobs(types.ModelInput.from_ints(TOKENS)).result()[1:]


def _snapshots(service: Service) -> set[str]:
    return {info.sampler_id for info in service.backend.list_samplers()}


def _eventually(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_capabilities_list_each_model_with_its_context_length(client, served, tiny_model_dir: Path) -> None:
    _, service = served
    caps = client.get_server_capabilities()
    (model,) = [m for m in caps.supported_models if m.model_name == str(tiny_model_dir)]
    config = json.loads((tiny_model_dir / "config.json").read_text())
    expected = min(config["max_position_embeddings"], service.settings.max_sequence_tokens)
    assert model.max_context_length == expected == 512
    assert model.trainable and model.sampleable


def test_inflight_clients_share_one_target_that_later_saves_move_on(client, served, tiny_model_dir) -> None:
    _, service = served
    training = client.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=1)
    _step(training)
    fixed = training.save_weights_and_get_sampling_client().result()  # kind="snapshot": these weights, kept
    sampler_a = training.save_weights_and_get_sampling_client(kind="inflight").result()
    before = _logprobs(sampler_a)
    assert before == pytest.approx(_logprobs(fixed), abs=1e-6)
    _step(training, lr=2e-1)
    sampler_b = training.save_weights_and_get_sampling_client(kind="inflight").result()
    # Each save is a new sampling session; both now sample the newer weights, and the snapshot does not move.
    assert sampler_a._sampling_session_id != sampler_b._sampling_session_id
    after_b = _logprobs(sampler_b)
    assert _logprobs(sampler_a) == pytest.approx(after_b, abs=1e-6)
    assert max(abs(x - y) for x, y in zip(after_b, before, strict=True)) > 1e-3
    assert _logprobs(fixed) == pytest.approx(before, abs=1e-6)
    out = sampler_a.sample(
        types.ModelInput.from_ints(TOKENS[:4]),
        num_samples=2,
        sampling_params=types.SamplingParams(max_tokens=3),
    ).result()
    assert len(out.sequences) == 2
    # The first target was freed (nothing samples it): the model holds one inflight snapshot.
    prefix = f"{training.model_id}:inflight:"
    _eventually(lambda: len([s for s in _snapshots(service) if s.startswith(prefix)]) == 1)
    # A pickled-style lookup of the session names the model's inflight weights.
    rest = client.create_rest_client()
    info = rest.get_sampler(sampler_a._sampling_session_id).result()
    assert info.base_model == str(tiny_model_dir)


def test_rl_loop_snapshots_do_not_accumulate(client, served, tiny_model_dir) -> None:
    _, service = served
    service.sampling.superseded_grace = 0.0  # a replaced snapshot is freed as soon as nothing samples it
    try:
        training = client.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=2)
        named = training.save_weights_for_sampler("keep").result().path  # saved by name: never freed
        keep = client.create_sampling_client(model_path=named)
        kept = _logprobs(keep)
        baseline = _snapshots(service)
        for step in range(20):
            sampler = training.save_weights_and_get_sampling_client().result()
            prompt = types.ModelInput.from_ints(TOKENS[:4])
            out = sampler.sample(prompt, num_samples=2, sampling_params=types.SamplingParams(max_tokens=4))
            assert len(out.result().sequences) == 2
            _step(training, lr=1e-2)
            # Held: this step's snapshot, and at most the previous one until the reaper has freed it.
            _eventually(lambda: len(_snapshots(service) - baseline) <= 1)
            assert len(_snapshots(service) - baseline) <= 2, step
        assert _logprobs(keep) == pytest.approx(kept, abs=1e-6)
        assert _logprobs(sampler)  # the latest one is still served
    finally:
        service.sampling.superseded_grace = 120.0


def test_a_request_in_flight_on_a_replaced_snapshot_completes(served, tiny_model_dir) -> None:
    _, service = served
    service.sampling.superseded_grace = 0.0
    try:
        config = LoRAConfig(r=4, lora_alpha=8.0, seed=3)
        run = service.create_run(
            api.CreateRunRequest(base_model=str(tiny_model_dir), lora_config=config), None
        )
        assert service.sampling.save_sampler(run.run_id, "old-snap", None, ephemeral=True).wait_sync(30)
        started = threading.Event()

        def on_token(*_: object) -> None:  # slow decoding: the request stays in flight a while
            started.set()
            time.sleep(0.02)

        request = SampleRequest(
            prompt=TOKENS[:4], params=SamplingParams(max_tokens=48, stop=[], seed=0), on_token=on_token
        )
        target = service.sampling.target(None, sampler_id="old-snap")
        job = service.sampling.sample(SampleSpec(target, [request]), None)
        assert started.wait(30)
        assert service.sampling.save_sampler(run.run_id, "new-snap", None, ephemeral=True).wait_sync(30)
        service.sampling.reap()
        assert not job.done and "old-snap" in _snapshots(service)  # in use: kept
        assert job.wait_sync(60) and job.status == "completed", job.error
        assert len(job.result.results[0].sequences[0].tokens) == 48
        _eventually(lambda: "old-snap" not in _snapshots(service))  # freed once its request was done
        assert "new-snap" in _snapshots(service)
        refused = SampleSpec(target, [SampleRequest(prompt=TOKENS[:4], params=SamplingParams(max_tokens=2))])
        with pytest.raises(NotFoundError, match="freed"):
            service.sampling.sample(refused, None)
        service.delete_run(run.run_id, None)  # the run's held snapshots go with it
        _eventually(lambda: "new-snap" not in _snapshots(service))
    finally:
        service.sampling.superseded_grace = 120.0


def test_finishing_the_session_frees_its_snapshots(served, tiny_model_dir) -> None:
    url, service = served
    other = tinker.ServiceClient(base_url=url)
    other.get_server_capabilities()
    training = other.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=4)
    snap = training.save_weights_and_get_sampling_client().result()
    live = training.save_weights_and_get_sampling_client(kind="inflight").result()
    assert _logprobs(snap) and _logprobs(live)
    mine = {
        s for s in _snapshots(service) if s.startswith(training.model_id) or s == snap._sampling_session_id
    }
    assert len(mine) == 2
    other.close("success").result()
    _eventually(lambda: not (mine & _snapshots(service)))
