"""The official `tinker` SDK (0.38.0) against a real EZTinker server on a loopback port, on a tiny model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
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


def test_rest_client_runs_and_checkpoints(server, service_client, training) -> None:
    rest = service_client.create_rest_client()
    run_id = training.model_id
    training.forward_backward([_datum(TOKENS)], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    state = training.save_state("rest-state").result().path
    sampler = training.save_weights_for_sampler("rest-sampler").result().path

    run = rest.get_training_run(run_id).result()
    assert run.training_run_id == run_id and run.is_lora and run.lora_rank == 8
    assert run.base_model == training.get_info().model_data.model_name
    assert run.last_checkpoint is not None and run.last_checkpoint.tinker_path == state
    assert run.last_sampler_checkpoint is not None and run.last_sampler_checkpoint.tinker_path == sampler
    assert rest.get_training_run_by_tinker_path(state).result().training_run_id == run_id
    runs = rest.list_training_runs(limit=100).result()
    assert run_id in [r.training_run_id for r in runs.training_runs]
    assert runs.cursor.total_count >= 1

    listed = {c.tinker_path: c for c in rest.list_checkpoints(run_id).result().checkpoints}
    assert listed[state].checkpoint_type == "training" and listed[state].checkpoint_id == "weights/rest-state"
    assert listed[sampler].checkpoint_type == "sampler"
    assert listed[sampler].checkpoint_id == "sampler_weights/rest-sampler"
    user = rest.list_user_checkpoints(limit=1000).result()
    assert {state, sampler} <= {c.tinker_path for c in user.checkpoints}

    info = rest.get_weights_info_by_tinker_path(state).result()
    assert info.is_lora and info.lora_rank == 8 and info.base_model == run.base_model

    rest.publish_checkpoint_from_tinker_path(state).result()
    rest.set_checkpoint_ttl_from_tinker_path(state, 7200).result()
    found = next(c for c in rest.list_checkpoints(run_id).result().checkpoints if c.tinker_path == state)
    assert found.public and found.expires_at is not None
    rest.unpublish_checkpoint_from_tinker_path(state).result()
    rest.set_checkpoint_ttl_from_tinker_path(state, None).result()
    found = next(c for c in rest.list_checkpoints(run_id).result().checkpoints if c.tinker_path == state)
    assert not found.public and found.expires_at is None

    # The archive URL (no SDK 0.38.0 method): this server's own native download route.
    answer = httpx.get(f"{server}/api/v1/training_runs/{run_id}/checkpoints/weights/rest-state/archive")
    assert answer.status_code == 200, answer.text
    archive = httpx.get(answer.json()["url"])
    assert archive.status_code == 200 and archive.content[:2] == b"\x1f\x8b"  # gzip

    # The run and its checkpoints are the native API's too.
    with eztinker.EZTinkerClient(base_url=server) as native:
        assert run_id in [r.run_id for r in native.get_runs()]
        assert {"rest-state", "sampler_weights.rest-sampler"} <= {
            c.name for c in native.get_checkpoints(run_id)
        }
        rest.delete_checkpoint_from_tinker_path(sampler).result()
        assert "sampler_weights.rest-sampler" not in {c.name for c in native.get_checkpoints(run_id)}
    with pytest.raises(tinker.NotFoundError):
        rest.get_training_run("no-such-run").result()


@pytest.fixture(scope="module")
def rl_training(service_client, tiny_model_dir):
    """A separate model: these tests leave gradients accumulated that no other test should apply."""
    return service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=1)


def _rl_datum(q: list[float], advantages: list[float], **extra: list[float]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:], "logprobs": q, "advantages": advantages, **extra},
    )


@pytest.mark.parametrize(
    ("loss_fn", "config", "expected"),
    [
        # At ratio 1 (q = the learner's own logprobs): each loss's value from its formula in engine/losses.py.
        ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, lambda lp, a: -sum(a)),
        ("cispo", None, lambda lp, a: -sum(x * y for x, y in zip(lp, a, strict=True))),
        ("dro", {"beta": 0.5}, lambda lp, a: -sum(x * y for x, y in zip(lp, a, strict=True))),
        ("stable_reinforce", None, lambda lp, a: -sum(x * y for x, y in zip(lp, a, strict=True))),
    ],
)
def test_rl_losses_at_ratio_one(rl_training, loss_fn, config, expected) -> None:
    lp = rl_training.forward([_datum(TOKENS)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
    advantages = [0.5 + 0.1 * i for i in range(len(lp))]
    out = rl_training.forward_backward([_rl_datum(lp, advantages)], loss_fn, config).result()
    assert len(out.loss_fn_outputs[0]["logprobs"].data) == len(TOKENS) - 1
    assert out.loss_fn_outputs[0]["logprobs"].data == pytest.approx(lp, abs=1e-5)
    assert out.metrics["loss:sum"] == pytest.approx(expected(lp, advantages), rel=1e-4, abs=1e-4)


def test_gspo_sequence_ratio_mask(rl_training) -> None:
    lp = rl_training.forward([_datum(TOKENS)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
    n = len(lp)
    advantages = [1.0] * n
    # q is off by 0.3 on the first half only: masking that half out of the ratio leaves the sequence
    # ratio at 1, so the loss is -Σ A; with every token in the ratio, s = exp(0.3 · half / n) ≠ 1.
    half = n // 2
    q = [x - 0.3 if i < half else x for i, x in enumerate(lp)]
    ratio_mask = [0.0 if i < half else 1.0 for i in range(n)]
    config = {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}
    masked = rl_training.forward_backward(
        [_rl_datum(q, advantages, sequence_ratio_mask=ratio_mask)], "gspo", config
    ).result()
    assert len(masked.loss_fn_outputs[0]["logprobs"].data) == n
    assert masked.metrics["loss:sum"] == pytest.approx(-n, rel=1e-4)
    unmasked = rl_training.forward_backward([_rl_datum(q, advantages)], "gspo", config).result()
    s = math.exp(0.3 * half / n)
    assert unmasked.metrics["loss:sum"] == pytest.approx(-n * s, rel=1e-4)


def test_dro_trust_term_matches_engine_formula(rl_training) -> None:
    import torch

    from eztinker.engine.losses import token_dro

    lp = rl_training.forward([_datum(TOKENS)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
    q = [x - 0.2 for x in lp]
    advantages = [(-1.0) ** i for i in range(len(lp))]
    out = rl_training.forward_backward([_rl_datum(q, advantages)], "dro", {"beta": 0.5}).result()
    inputs = {"logprobs": torch.tensor([q]), "advantages": torch.tensor([advantages])}
    engine = token_dro(torch.tensor([lp]), inputs, torch.ones(1, len(lp), dtype=torch.bool), beta=0.5)
    assert out.metrics["loss:sum"] == pytest.approx(float(engine[0]), rel=1e-4, abs=1e-4)
    assert float(engine[0]) == pytest.approx(
        -sum(advantages[i] * lp[i] for i in range(len(lp))) + 0.01 * len(lp)
    )


def test_cookbook_chat_sl_recipe_offline(server, tiny_model_dir, tmp_path) -> None:
    """tinker-cookbook 0.6.1's chat SFT recipe, unmodified, on a local JSONL: 2 steps against this server."""
    cookbook = pytest.importorskip("tinker_cookbook")
    examples = (Path(cookbook.__file__).parent / "example_data" / "conversations.jsonl").read_text()
    data = tmp_path / "conversations.jsonl"
    data.write_text("".join(examples.splitlines(keepends=True)[:8]))
    log = tmp_path / "log"
    args = {
        "model_name": str(tiny_model_dir),
        "renderer_name": "role_colon",  # a local path is not a model name the cookbook knows
        "dataset": str(data),
        "batch_size": 4,
        "max_steps": 2,
        "max_length": 256,
        "lora_rank": 8,
        "learning_rate": 1e-3,
        "save_every": 0,
        "eval_every": 0,
        "infrequent_eval_every": 0,
        "log_path": str(log),
        "behavior_if_log_dir_exists": "delete",
    }
    env = {**os.environ, "TINKER_BASE_URL": server, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinker_cookbook.recipes.chat_sl.train",
            *(f"{k}={v}" for k, v in args.items()),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines()]
    nll = [s["train_mean_nll"] for s in steps if "train_mean_nll" in s]
    assert len(nll) == 2 and all(math.isfinite(x) for x in nll)
    saved = json.loads((log / "checkpoints.jsonl").read_text().splitlines()[-1])
    run_id = saved["state_path"].removeprefix("tinker://").split("/")[0]
    with eztinker.EZTinkerClient(base_url=server) as native:
        run = native.get_run(run_id)
        assert run.step == 2 and run.last_loss is not None and math.isfinite(run.last_loss)
        assert {"final", "sampler_weights.final"} <= {c.name for c in native.get_checkpoints(run_id)}
