"""Optimizers: Dimuon as Tinker documents it, one fixed optimizer per run, and what a checkpoint restores.

- Dimuon's update equals a reference written here from the documented formula (momentum; a damped row
  and column preconditioner; the matrix sign, here by SVD; a direction of Frobenius norm sqrt(rank); the
  learning rate corrected by (rank / 32) ** exponent), on plain tensors and on a run's adapter.
- Through the `tinker` SDK: `DimuonOptimizerConfig` trains with Dimuon (not AdamW at a default rate);
  `save_state` + `..._with_optimizer` resumes it bit for bit; params of the other optimizer, an unknown
  optimizer, or a bad value are user errors that change nothing.
- `create_training_client_from_state` loads the weights only (a fresh optimizer), while
  `create_training_client_from_state_with_optimizer` restores weights and optimizer state.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

import eztinker
from eztinker.engine import AdamParams, Datum, DimuonParams, Engine, EngineConfig, InvalidInputError
from eztinker.engine.optimizers import Dimuon, matrix_sign
from eztinker.exceptions import EZTinkerError

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402
from tinker.types.optimizer import OptimizerConfigBase  # noqa: E402

TOKENS = [(7 + 13 * i) % 900 + 3 for i in range(12)]


# --- the reference: Dimuon from its documented formula, in float64 with an SVD ---------------------------


def reference_step(
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    momenta: list[torch.Tensor],
    params: DimuonParams,
    rank: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(new weights, new momenta) after one Dimuon step over the matrices of one run."""
    g = [x.double() for x in grads]
    if params.grad_clip_norm > 0:  # the global norm over every matrix (torch's clip: c / (norm + 1e-6))
        norm = math.sqrt(sum(float(x.square().sum()) for x in g))
        g = [x * min(1.0, params.grad_clip_norm / (norm + 1e-6)) for x in g]
    lr = params.learning_rate * (rank / 32) ** params.rank_lr_correction_exponent
    new_weights, new_momenta = [], []
    for w, x, m in zip(weights, g, momenta, strict=True):
        m = params.beta1 * m.double() + (1 - params.beta1) * x
        new_momenta.append(m)
        if not bool(m.any()):  # nothing to follow yet (e.g. A's gradient while B is 0)
            new_weights.append(w.double())
            continue
        mh = m / m.square().mean().sqrt()
        rows = (mh.square().mean(dim=1, keepdim=True) + params.damping) ** -0.25
        cols = (mh.square().mean(dim=0, keepdim=True) + params.damping) ** -0.25
        u, _, vh = torch.linalg.svd(rows * mh * cols, full_matrices=False)
        polar = u @ vh
        direction = polar * math.sqrt(rank) / torch.linalg.matrix_norm(polar)
        new_weights.append(w.double() - lr * direction)
    return new_weights, new_momenta


def test_matrix_sign_is_the_polar_factor() -> None:
    torch.manual_seed(0)
    for shape in [(4, 24), (24, 4), (8, 8), (3, 5, 40)]:
        x = torch.randn(*shape)
        u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
        torch.testing.assert_close(matrix_sign(x), (u @ vh).float(), rtol=0, atol=1e-5)
    assert torch.equal(matrix_sign(torch.zeros(4, 6)), torch.zeros(4, 6))


def test_dimuon_steps_match_the_documented_formula_on_plain_tensors() -> None:
    """LoRA-shaped matrices (two of one shape: they step as a batch), three steps with changing settings,
    and a matrix whose gradient is zero at first (as A's is while B = 0)."""
    torch.manual_seed(1)
    rank = 4
    shapes = [(rank, 24), (20, rank), (rank, 24)]
    params = [nn.Parameter(torch.randn(*s) * 0.1) for s in shapes]
    optimizer = Dimuon(params, rank=rank)
    weights = [p.detach().double().clone() for p in params]
    momenta = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    schedule = [
        DimuonParams(learning_rate=0.05),
        DimuonParams(learning_rate=0.02, beta1=0.5, damping=1e-2),
        DimuonParams(learning_rate=0.1, beta1=0.0, rank_lr_correction_exponent=0.0),
    ]
    for step, hyper in enumerate(schedule):
        grads = [torch.randn(*s) for s in shapes]
        if step == 0:
            grads[0] = torch.zeros(shapes[0])
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        optimizer.set_hyperparameters(hyper)
        optimizer.step()
        weights, momenta = reference_step(weights, grads, momenta, hyper, rank)
        for p, w, m in zip(params, weights, momenta, strict=True):
            torch.testing.assert_close(p.detach(), w.float(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], m.float(), rtol=1e-5, atol=1e-6)
    # Each update is lr * (rank/32)^e times a direction of Frobenius norm sqrt(rank).
    before = params[1].detach().clone()
    params[1].grad = torch.randn(shapes[1])
    optimizer.set_hyperparameters(DimuonParams(learning_rate=0.01, rank_lr_correction_exponent=0.5))
    optimizer.step()
    moved = float(torch.linalg.matrix_norm(params[1].detach() - before))
    assert moved == pytest.approx(0.01 * (rank / 32) ** 0.5 * math.sqrt(rank), rel=1e-4)


# --- the engine -------------------------------------------------------------------------------------------


@pytest.fixture
def engine(tiny_model_dir: Path) -> Engine:
    return Engine(EngineConfig(device="cpu"))


def _data() -> list[Datum]:
    return [Datum.from_targets(TOKENS[:-1], TOKENS[1:])]


def _snapshot(engine: Engine, run_id: str) -> dict:
    run = engine._run(run_id)
    return {
        "step": run.step,
        "weights": [p.detach().clone() for p in run.params],
        "grads": [None if p.grad is None else p.grad.clone() for p in run.params],
        "state": [{k: v.clone() for k, v in run.optimizer.state.get(p, {}).items()} for p in run.params],
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for x, y in zip(a["weights"], b["weights"], strict=True):
        assert torch.equal(x, y)
    for x, y in zip(a["grads"], b["grads"], strict=True):
        assert (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
    for x, y in zip(a["state"], b["state"], strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_a_runs_dimuon_step_matches_the_formula_with_global_clipping(engine: Engine, tiny_model_dir) -> None:
    run_id = engine.create_run(str(tiny_model_dir), {"r": 4, "seed": 0}, optimizer="dimuon").run_id
    assert engine.run_info(run_id).optimizer == "dimuon"
    engine.forward_backward(run_id, _data(), "cross_entropy")
    engine.optim_step(run_id, DimuonParams(learning_rate=0.05))  # B moves off 0, so A's gradient is live
    engine.forward_backward(run_id, _data(), "cross_entropy")
    run = engine._run(run_id)
    weights = [p.detach().clone() for p in run.params]
    grads = [p.grad.clone() for p in run.params if p.grad is not None]
    momenta = [run.optimizer.state[p]["momentum_buffer"].clone() for p in run.params]
    norm = math.sqrt(sum(float(g.square().sum()) for g in grads))
    hyper = DimuonParams(
        learning_rate=0.03, beta1=0.8, grad_clip_norm=norm / 3, damping=1e-3, rank_lr_correction_exponent=0.5
    )
    result = engine.optim_step(run_id, hyper)
    assert result.step == 2 and result.grad_norm == pytest.approx(norm, rel=1e-5)
    expected, expected_momenta = reference_step(weights, grads, momenta, hyper, rank=4)
    for p, w, m in zip(run.params, expected, expected_momenta, strict=True):
        torch.testing.assert_close(p.detach(), w.float(), rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(run.optimizer.state[p]["momentum_buffer"], m.float(), rtol=1e-5, atol=1e-6)


def test_params_of_the_other_optimizer_or_out_of_range_change_nothing(engine: Engine, tiny_model_dir) -> None:
    adamw = engine.create_run(str(tiny_model_dir), {"r": 4, "seed": 0}).run_id
    dimuon = engine.create_run(str(tiny_model_dir), {"r": 4, "seed": 0}, optimizer="dimuon").run_id
    for run_id, good in ((adamw, AdamParams(learning_rate=1e-2)), (dimuon, DimuonParams(learning_rate=1e-2))):
        engine.forward_backward(run_id, _data(), "cross_entropy")
        engine.optim_step(run_id, good)
        engine.forward_backward(run_id, _data(), "cross_entropy")
    cases = [
        (adamw, DimuonParams(learning_rate=1e-2), "optimizer_params"),
        (dimuon, AdamParams(learning_rate=1e-2), "adam_params"),
        (dimuon, None, "adam_params"),  # the default step is AdamW's: not silently Dimuon's
        (dimuon, DimuonParams(learning_rate=-1.0), "optimizer_params.learning_rate"),
        (dimuon, DimuonParams(learning_rate=float("nan")), "optimizer_params.learning_rate"),
        (dimuon, DimuonParams(learning_rate=1e-2, beta1=1.0), "optimizer_params.beta1"),
        (dimuon, DimuonParams(learning_rate=1e-2, damping=0.0), "optimizer_params.damping"),
        (
            dimuon,
            DimuonParams(learning_rate=1e-2, grad_clip_norm=math.inf),
            "optimizer_params.grad_clip_norm",
        ),
        (adamw, AdamParams(learning_rate=-1e-2), "adam_params.learning_rate"),
    ]
    for run_id, params, field in cases:
        before = _snapshot(engine, run_id)
        with pytest.raises(InvalidInputError) as info:
            engine.optim_step(run_id, params)
        assert info.value.field == field
        _assert_same(before, _snapshot(engine, run_id))
    with pytest.raises(InvalidInputError) as info:
        engine.create_run(str(tiny_model_dir), {"r": 4}, optimizer="sgd")  # type: ignore[arg-type]
    assert info.value.field == "optimizer"
    # Nothing was lost: the accumulated gradients still apply.
    assert engine.optim_step(dimuon, DimuonParams(learning_rate=1e-2)).step == 2


def test_co_batched_steps_of_both_optimizers_equal_stepping_alone(tiny_model_dir) -> None:
    """AdamW runs still share one fused update; a Dimuon run in the same batch steps on its own."""
    together, alone = Engine(EngineConfig(device="cpu")), Engine(EngineConfig(device="cpu"))
    runs = {"a1": "adamw", "d1": "dimuon", "a2": "adamw", "d2": "dimuon"}
    params = {
        "adamw": AdamParams(learning_rate=1e-2, weight_decay=0.01),
        "dimuon": DimuonParams(learning_rate=0.05, grad_clip_norm=1.0),
    }
    for engine in (together, alone):
        for name, optimizer in runs.items():
            engine.create_run(str(tiny_model_dir), {"r": 4, "seed": 0}, run_id=name, optimizer=optimizer)
    for _ in range(2):
        for engine in (together, alone):
            for name in runs:
                engine.forward_backward(name, _data(), "cross_entropy")
        outcomes = together.optim_step_many([(name, params[optimizer]) for name, optimizer in runs.items()])
        for (name, optimizer), outcome in zip(runs.items(), outcomes, strict=True):
            solo = alone.optim_step(name, params[optimizer])
            assert not isinstance(outcome, Exception) and outcome.grad_norm == solo.grad_norm
            _assert_same(_snapshot(together, name), _snapshot(alone, name))
    assert not torch.equal(together._run("a1").params[1], together._run("d1").params[1])


def test_a_run_named_twice_in_one_call_steps_twice_in_order(tiny_model_dir) -> None:
    """Its second step starts where the first left it: no gradients left (grad norm 0), moments moved on."""
    together, alone = Engine(EngineConfig(device="cpu")), Engine(EngineConfig(device="cpu"))
    adam = AdamParams(learning_rate=1e-2, weight_decay=0.01)
    for engine in (together, alone):
        engine.create_run(str(tiny_model_dir), {"r": 4, "seed": 0}, run_id="a")
        engine.create_run(str(tiny_model_dir), {"r": 2, "seed": 1}, run_id="b")
        for name in "ab":
            engine.forward_backward(name, _data(), "cross_entropy")
    outcomes = together.optim_step_many([("a", adam), ("b", adam), ("a", adam)])
    solos = [alone.optim_step(name, adam) for name in "aba"]
    for outcome, solo in zip(outcomes, solos, strict=True):
        assert not isinstance(outcome, Exception), outcome
        assert (outcome.step, outcome.grad_norm) == (solo.step, solo.grad_norm)
    assert outcomes[2].grad_norm == 0.0
    for name in "ab":
        _assert_same(_snapshot(together, name), _snapshot(alone, name))


def test_dimuon_checkpoints_resume_bit_identically(engine: Engine, tiny_model_dir, tmp_path: Path) -> None:
    step = DimuonParams(learning_rate=0.05, beta1=0.7)
    run_id = engine.create_run(str(tiny_model_dir), {"r": 4, "seed": 0}, optimizer="dimuon").run_id
    for _ in range(2):
        engine.forward_backward(run_id, _data(), "cross_entropy")
        engine.optim_step(run_id, step)
    engine.save_state(run_id, tmp_path / "state")
    meta = json.loads((tmp_path / "state" / "eztinker.json").read_text())
    assert meta["optimizer"] == "dimuon" and meta["optimizer_config"] == {"type": "dimuon", "version": 1}
    from safetensors.torch import load_file

    stats = {key.rsplit(".", 1)[1] for key in load_file(tmp_path / "state" / "optimizer.safetensors")}
    assert stats == {"momentum_buffer"}

    def next_step(target: str) -> dict:
        engine.forward_backward(target, _data(), "cross_entropy")
        engine.optim_step(target, step)
        return _snapshot(engine, target)

    straight = next_step(run_id)
    created = engine.create_run(str(tiny_model_dir), adapter_path=tmp_path / "state").run_id
    assert engine.run_info(created).optimizer == "dimuon"
    loaded = engine.create_run(str(tiny_model_dir), {"r": 4, "seed": 5}, optimizer="dimuon").run_id
    engine.load_state(loaded, tmp_path / "state", with_optimizer=True)
    _assert_same(straight, next_step(created))
    _assert_same(straight, next_step(loaded))

    # Weights only: a fresh optimizer (of the checkpoint's family unless told otherwise), another step.
    fresh = engine.create_run(
        str(tiny_model_dir), adapter_path=tmp_path / "state", with_optimizer=False
    ).run_id
    assert engine.run_info(fresh).optimizer == "dimuon" and not engine._run(fresh).optimizer.state
    assert not torch.equal(next_step(fresh)["weights"][1], straight["weights"][1])
    as_adamw = engine.create_run(
        str(tiny_model_dir), adapter_path=tmp_path / "state", with_optimizer=False, optimizer="adamw"
    ).run_id
    assert engine.run_info(as_adamw).optimizer == "adamw"
    # Its optimizer state cannot go into an AdamW run, nor make one.
    with pytest.raises(InvalidInputError, match="dimuon optimizer state"):
        engine.load_state(as_adamw, tmp_path / "state", with_optimizer=True)
    with pytest.raises(InvalidInputError) as info:
        engine.create_run(str(tiny_model_dir), adapter_path=tmp_path / "state", optimizer="adamw")
    assert info.value.field == "optimizer"


# --- through the tinker SDK ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, monkeypatch_module) -> str:
    monkeypatch_module.setenv("TINKER_API_KEY", "tml-test")
    monkeypatch_module.setenv("TINKER_TELEMETRY", "0")
    monkeypatch_module.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    with eztinker.serve(data_dir=tmp_path_factory.mktemp("data"), models=[str(tiny_model_dir)]) as url:
        yield url


@pytest.fixture(scope="module")
def service_client(server: str):
    client = tinker.ServiceClient(base_url=server)
    client.get_server_capabilities()  # the REST holder first (see test_tinker_sdk.py)
    yield client
    client.close("success").result()


def _datum(tokens: list[int] = TOKENS) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def _train(client, params) -> float:
    """One forward_backward + optim_step; the loss before the step."""
    fb = client.forward_backward([_datum()], "cross_entropy")
    client.optim_step(params).result()
    return fb.result().metrics["loss:sum"]


def _logprobs(client) -> list[float]:
    return list(client.forward([_datum()], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data)


def _create(service_client, tiny_model_dir, seed: int = 0, **kwargs):
    return service_client.create_lora_training_client(
        base_model=str(tiny_model_dir), rank=4, seed=seed, **kwargs
    )


def test_dimuon_trains_through_the_sdk_and_is_not_adamw(service_client, tiny_model_dir) -> None:
    dimuon = _create(service_client, tiny_model_dir, optimizer=types.DimuonOptimizerConfig())
    adamw = _create(service_client, tiny_model_dir)
    config = dimuon.get_info().optimizer_config
    assert (config.type, config.model_dump().get("version")) == ("dimuon", 1)
    assert adamw.get_info().optimizer_config.type == "adamw"
    dimuon_losses = [_train(dimuon, types.DimuonParams(learning_rate=0.05)) for _ in range(4)]
    adamw_losses = [_train(adamw, types.AdamParams(learning_rate=0.05)) for _ in range(4)]
    assert dimuon_losses[-1] < dimuon_losses[0]
    assert dimuon_losses[0] == adamw_losses[0]  # the same start (same seed)...
    assert all(abs(a - b) > 1e-4 for a, b in zip(dimuon_losses[1:], adamw_losses[1:], strict=True))  # ...not
    metrics = dimuon.optim_step(types.DimuonParams(learning_rate=0.03)).result().metrics
    assert metrics["learning_rate:mean"] == pytest.approx(0.03)


def test_dimuon_save_state_resumes_exactly(service_client, tiny_model_dir) -> None:
    step = types.DimuonParams(learning_rate=0.05, beta1=0.8)
    original = _create(service_client, tiny_model_dir, seed=3, optimizer=types.DimuonOptimizerConfig())
    for _ in range(2):
        _train(original, step)
    path = original.save_state("dimuon-2").result().path
    assert service_client.create_rest_client().get_weights_info_by_tinker_path(
        path
    ).result().optimizer_config.type == ("dimuon")
    resumed = service_client.create_training_client_from_state_with_optimizer(path).result()
    legacy = _create(service_client, tiny_model_dir, seed=9, optimizer=types.DimuonOptimizerConfig())
    legacy.load_state_with_optimizer(path).result()
    weights_only = service_client.create_training_client_from_state(
        path, optimizer=types.DimuonOptimizerConfig()
    ).result()
    assert resumed.get_info().optimizer_config.type == "dimuon"
    after = {}
    for name, client in (
        ("original", original),
        ("resumed", resumed),
        ("legacy", legacy),
        ("fresh", weights_only),
    ):
        _train(client, step)
        after[name] = _logprobs(client)
    assert after["resumed"] == after["original"] and after["legacy"] == after["original"]  # bit for bit
    assert after["fresh"] != after["original"]  # no momentum: another step

    # Without an optimizer, from_state makes an AdamW model (Tinker's default); DimuonParams are refused.
    default = service_client.create_training_client_from_state(path).result()
    assert default.get_info().optimizer_config.type == "adamw"
    default.forward_backward([_datum()], "cross_entropy").result()
    with pytest.raises(tinker.RequestFailedError, match="optimizer_params") as info:
        default.optim_step(step).result()
    assert info.value.category == "user"


def test_from_state_loads_weights_only_and_with_optimizer_restores_both(
    service_client, tiny_model_dir
) -> None:
    step = types.AdamParams(learning_rate=2e-2)
    original = _create(service_client, tiny_model_dir, seed=1)
    for _ in range(2):
        _train(original, step)
    path = original.save_state("adam-2").result().path
    weights_only = service_client.create_training_client_from_state(path).result()
    full = service_client.create_training_client_from_state_with_optimizer(path).result()
    fresh = _create(service_client, tiny_model_dir, seed=2)  # the same weights, loaded without the optimizer
    fresh.load_state(path).result()
    assert _logprobs(weights_only) == _logprobs(original) == _logprobs(full)  # the same weights, all three
    after = {}
    for name, client in (("original", original), ("weights", weights_only), ("full", full), ("fresh", fresh)):
        _train(client, step)
        after[name] = _logprobs(client)
    assert after["full"] == after["original"]  # continuing the original run, Adam moments included
    assert after["weights"] == after["fresh"]  # a first step from those weights: no Adam state
    assert after["weights"] != after["original"]


def test_unknown_optimizers_and_mismatched_params_are_user_errors(
    service_client, server, tiny_model_dir
) -> None:
    with pytest.raises(tinker.RequestFailedError, match=r"optimizer_config\.type.*sgd") as info:
        _create(service_client, tiny_model_dir, optimizer=OptimizerConfigBase(type="sgd")).result()
    assert info.value.category == "user"

    adamw, reference = _create(service_client, tiny_model_dir), _create(service_client, tiny_model_dir)
    dimuon = _create(service_client, tiny_model_dir, optimizer=types.DimuonOptimizerConfig())
    for client in (adamw, reference, dimuon):
        client.forward_backward([_datum()], "cross_entropy").result()
    failing = [
        (adamw, types.DimuonParams(learning_rate=1e-2), "optimizer_params"),
        (adamw, types.AdamParams(learning_rate=-1.0), r"adam_params\.learning_rate"),
        (dimuon, types.AdamParams(learning_rate=1e-2), "adam_params"),
    ]
    for client, params, field in failing:
        with pytest.raises(tinker.RequestFailedError, match=field) as info:
            client.optim_step(params).result()
        assert info.value.category == "user"
    # The failed steps changed nothing: the gradients still apply, to the untouched weights and moments.
    for client in (adamw, reference):
        client.optim_step(types.AdamParams(learning_rate=2e-2)).result()
    assert _logprobs(adamw) == _logprobs(reference)

    # Raw wire: an unknown step type and a NaN rate fail the future with the field named.
    http = httpx.Client(base_url=server, headers={"x-api-key": "tml-test"}, timeout=60)
    model_id = dimuon.model_id
    for body, field in (
        ({"optimizer_params": {"type": "lion", "learning_rate": 0.1}}, "optimizer_params.type"),
        (
            {"optimizer_params": {"type": "dimuon", "learning_rate": float("nan")}},
            "optimizer_params.learning_rate",
        ),
        ({"optimizer_params": {"type": "dimuon"}}, "optimizer_params.learning_rate"),
        ({"optimizer_params": {"type": "dimuon", "learning_rate": 0.1, "eps": 1e-8}}, "optimizer_params.eps"),
    ):
        raw = json.dumps({"model_id": model_id, **body})  # NaN as JSON's NaN token, which json.loads reads
        future = http.post(
            "/api/v1/optim_step", content=raw, headers={"content-type": "application/json"}
        ).json()
        answer = http.post("/api/v1/retrieve_future", json={"request_id": future["request_id"]}).json()
        assert answer["category"] == "user" and field in answer["error"], answer
    http.close()
    assert dimuon.optim_step(types.DimuonParams(learning_rate=1e-2)).result().metrics["step:max"] == 1.0


def test_native_runs_choose_their_optimizer(server, tiny_model_dir) -> None:
    client = eztinker.EZTinkerClient(base_url=server)
    run_id = client.create_run(str(tiny_model_dir), {"r": 4, "seed": 0}, optimizer="dimuon")
    assert client.get_run(run_id).optimizer == "dimuon"
    client.forward_backward(run_id, TOKENS).result()
    assert client.optim_step(run_id, learning_rate=0.05, damping=1e-3).result()["step"] == 1
    with pytest.raises(EZTinkerError, match="weight_decay"):
        client.optim_step(run_id, learning_rate=0.05, weight_decay=0.1).result()
    adamw = client.create_run(str(tiny_model_dir), {"r": 4})
    assert client.get_run(adamw).optimizer == "adamw"
    with pytest.raises(EZTinkerError, match="damping"):
        client.optim_step(adamw, damping=1e-3).result()
