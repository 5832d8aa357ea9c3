"""The official `tinker` SDK (0.38.0) against a real EZTinker server on a loopback port, on a tiny model."""

from __future__ import annotations

import time

import pytest

import eztinker

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, monkeypatch_module) -> str:
    monkeypatch_module.setenv("TINKER_API_KEY", "tml-test")
    monkeypatch_module.setenv("TINKER_TELEMETRY", "0")
    monkeypatch_module.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    data_dir = tmp_path_factory.mktemp("tinker-data")
    with eztinker.serve(data_dir=data_dir, models=[str(tiny_model_dir)]) as url:
        yield url


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def service_client(server: str):
    client = tinker.ServiceClient(base_url=server)
    # SDK 0.38.0 quirk: building the session-less REST holder while a training-client call is pending on the
    # SDK's event loop can deadlock on its lifecycle lock, so make the REST holder first (as §4.2's flow does).
    client.get_server_capabilities()
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def training(service_client, tiny_model_dir):
    return service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=0)


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


TOKENS = [(7 + 13 * i) % 900 + 3 for i in range(12)]


def test_capabilities_and_info(service_client, training, tiny_model_dir) -> None:
    caps = service_client.get_server_capabilities()
    assert str(tiny_model_dir) in [m.model_name for m in caps.supported_models]
    info = training.get_info()
    assert info.model_data.model_name == str(tiny_model_dir)
    tokenizer = training.get_tokenizer()
    assert tokenizer.encode("hello")


def test_sft_loss_falls(training) -> None:
    losses = []
    for _ in range(6):
        fb = training.forward_backward([_datum(TOKENS)], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
        out = fb.result()
        losses.append(out.metrics["loss:sum"])
        assert len(out.loss_fn_outputs[0]["logprobs"].data) == len(TOKENS) - 1
    assert losses[-1] < losses[0]


def test_sample_with_stop_and_n(training) -> None:
    sampler = training.save_weights_and_get_sampling_client()
    prompt = types.ModelInput.from_ints(TOKENS[:4])
    result = sampler.sample(
        prompt, num_samples=3, sampling_params=types.SamplingParams(max_tokens=6, stop=[TOKENS[5]], seed=1)
    ).result()
    assert len(result.sequences) == 3
    for seq in result.sequences:
        assert 1 <= len(seq.tokens) <= 6 and len(seq.logprobs) == len(seq.tokens)
        assert seq.stop_reason in ("stop", "length")
    no_stop = sampler.sample(
        prompt, num_samples=1, sampling_params=types.SamplingParams(max_tokens=5, stop=[])
    ).result()
    assert len(no_stop.sequences[0].tokens) == 5 and no_stop.sequences[0].stop_reason == "length"
    logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(TOKENS)).result()
    assert logprobs[0] is None and len(logprobs) == len(TOKENS)


def test_sampler_logprobs_match_training_and_importance_sampling(training) -> None:
    sampler = training.save_weights_and_get_sampling_client()
    prompt = TOKENS[:5]
    seq = (
        sampler.sample(
            types.ModelInput.from_ints(prompt),
            num_samples=1,
            sampling_params=types.SamplingParams(max_tokens=4, stop=[]),
        )
        .result()
        .sequences[0]
    )
    full = prompt + list(seq.tokens)
    n_prompt = len(prompt) - 1
    sampled_lp = [0.0] * n_prompt + list(seq.logprobs)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={
            "target_tokens": full[1:],
            "logprobs": sampled_lp,
            "advantages": [0.0] * n_prompt + [1.0] * len(seq.tokens),
        },
    )
    forward = training.forward([datum], "importance_sampling").result()
    trained_lp = forward.loss_fn_outputs[0]["logprobs"].data[n_prompt:]
    assert max(abs(a - b) for a, b in zip(trained_lp, seq.logprobs, strict=True)) < 1e-4
    out = training.forward_backward([datum], "importance_sampling").result()
    assert out.metrics["loss:sum"] == pytest.approx(-len(seq.tokens), abs=1e-3)  # ratio 1, advantage 1
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result()


def test_forward_backward_custom(training) -> None:
    import torch

    def loss_fn(data, logprobs_list):
        loss = sum((lp**2).sum() for lp in logprobs_list)
        return loss, {"custom:sum": float(loss.detach())}

    out = training.forward_backward_custom([_datum(TOKENS)], loss_fn).result()
    assert "loss:sum" in out.metrics and out.metrics["loss:sum"] > 0
    assert isinstance(out.metrics["custom:sum"], float) and torch is not None


def test_save_and_load_state_visible_natively(server, training) -> None:
    saved = training.save_state("ckpt-1").result()
    run_id = training.model_id
    assert saved.path == f"tinker://{run_id}/weights/ckpt-1"
    before = training.forward([_datum(TOKENS)], "cross_entropy").result().metrics["loss:sum"]
    training.forward_backward([_datum(TOKENS)], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    training.load_state(saved.path).result()
    after = training.forward([_datum(TOKENS)], "cross_entropy").result().metrics["loss:sum"]
    assert after == pytest.approx(before, rel=1e-5)
    with eztinker.EZTinkerClient(base_url=server) as native:
        assert "ckpt-1" in [c.name for c in native.get_checkpoints(run_id)]


def test_engine_error_raises_cleanly(training) -> None:
    bad = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 10**6]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
    )
    start = time.monotonic()
    with pytest.raises(tinker.RequestFailedError, match="vocab|range|token"):
        training.forward_backward([bad], "cross_entropy").result(timeout=30)
    assert time.monotonic() - start < 10
    training.forward([_datum(TOKENS)], "cross_entropy").result()  # the client still works


def test_named_sampler_weights_and_create_from_state(service_client, training) -> None:
    saved = training.save_weights_for_sampler("for-sampling").result()
    assert saved.path == f"tinker://{training.model_id}/sampler_weights/for-sampling"
    sampler = service_client.create_sampling_client(model_path=saved.path)
    out = sampler.sample(
        types.ModelInput.from_ints(TOKENS[:3]),
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=3),
    ).result()
    assert 1 <= len(out.sequences[0].tokens) <= 3
    state = training.save_state("for-copy").result()
    copy = service_client.create_training_client_from_state(state.path)
    a = training.forward([_datum(TOKENS)], "cross_entropy").result().metrics["loss:sum"]
    b = copy.forward([_datum(TOKENS)], "cross_entropy").result().metrics["loss:sum"]
    assert a == pytest.approx(b, rel=1e-5)
