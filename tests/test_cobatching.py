"""Co-batching in the engine: ops of several runs in one pass give exactly what each gives alone."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

import eztinker
from eztinker import EZTinkerClient
from eztinker.engine import (
    AdamParams,
    ComputeError,
    Datum,
    Engine,
    EngineConfig,
    InvalidInputError,
    NonFiniteError,
    NotFoundError,
    TokenLoss,
    TrainOp,
    register_loss_function,
)
from eztinker.engine.losses import unregister_loss_function
from eztinker.engine.memory import memory_profile
from eztinker.models import LossFunctionConfig
from eztinker.service import Service
from eztinker.settings import Settings

# Four runs that differ in everything a run can differ in: rank, alpha, target modules and loss.
RUNS = {
    "a": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "seed": 1},
    "b": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "seed": 2},
    "c": {"r": 2, "lora_alpha": 2, "target_modules": ["gate_proj", "down_proj", "o_proj"], "seed": 3},
    "d": {"r": 16, "lora_alpha": 8, "target_modules": ["k_proj", "up_proj"], "seed": 4},
}


def tokens(n: int, start: int) -> list[int]:
    return [(start + 29 * j) % 1000 + 3 for j in range(n)]


def op_for(name: str, step: int, run_id: str | None = None) -> TrainOp:
    """A different loss, batch shape and length per run (and per step), deterministic."""
    rid = run_id or name
    s = 7 * step + ord(name)
    if name == "a":  # native cross-entropy, two datums of different lengths
        return TrainOp(rid, [Datum.from_labels(tokens(12, s)), Datum.from_labels(tokens(7, s + 1))])
    if name == "b":  # Tinker cross_entropy with weights
        seq = tokens(16, s)
        return TrainOp(rid, [Datum.from_targets(seq[:-1], seq[1:], weights=[0.5] * 15)], "cross_entropy")
    if name == "c":  # importance sampling with advantages
        data = []
        for k, n in enumerate((9, 5, 11)):
            seq = tokens(n + 1, s + 3 * k)
            loss_inputs = {
                "target_tokens": seq[1:],
                "logprobs": [-1.5] * n,
                "advantages": [0.3 * (k - 1)] * n,
            }
            data.append(Datum(seq[:-1], loss_inputs))
        return TrainOp(rid, data, "importance_sampling")
    seq = tokens(10, s)  # "d": PPO
    loss_inputs = {"target_tokens": seq[1:], "logprobs": [-2.0] * 9, "advantages": [1.0] * 9}
    return TrainOp(rid, [Datum(seq[:-1], loss_inputs)], TokenLoss("ppo", {"clip_low_threshold": 0.8}))


def make_engine(model_dir, names=RUNS) -> Engine:
    engine = Engine(EngineConfig(device="cpu"))
    for name in names:
        engine.create_run(str(model_dir), RUNS[name], run_id=name)
    return engine


def state(engine: Engine, run_id: str) -> list[torch.Tensor]:
    run = engine._run(run_id)
    out = [p.detach().clone() for p in run.params]
    out += [p.grad.clone() for p in run.params if p.grad is not None]
    for p in run.params:
        out += [v.clone() for v in run.optimizer.state.get(p, {}).values()]
    return out


def assert_close(a, b) -> None:
    """Equal within 1e-5 relative, as a whole tensor: ||a - b|| <= 1e-5 ||b||.

    (Padding a row to a wider block changes float summation order slightly; Adam's first steps turn a
    1e-7 wobble in a near-zero gradient into a visible one in that single weight, so an elementwise
    relative bound would test noise, not co-batching.)
    """
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape
    assert float((a - b).norm()) <= 1e-5 * float(b.norm()) + 1e-9, float((a - b).norm() / b.norm())


def test_four_different_runs_together_equal_each_run_alone(tiny_model_dir) -> None:
    together, alone = make_engine(tiny_model_dir), make_engine(tiny_model_dir)
    adam = {
        "a": AdamParams(learning_rate=1e-2),
        "b": AdamParams(learning_rate=1e-2),  # same hyperparameters as "a": one shared update
        "c": AdamParams(learning_rate=5e-3, grad_clip_norm=0.01),
        "d": AdamParams(learning_rate=2e-2, weight_decay=0.1),
    }
    for step in range(3):
        ops = [op_for(name, step) for name in RUNS]
        results = together.forward_backward_many(ops)
        for op, result in zip(ops, results, strict=True):
            assert not isinstance(result, Exception), result
            solo = alone.forward_backward(op.run_id, op.data, op.loss)
            assert_close(torch.tensor(result.loss), torch.tensor(solo.loss))
            for lp, solo_lp in zip(result.logprobs, solo.logprobs, strict=True):
                assert_close(lp, solo_lp)
            assert result.metrics == pytest.approx(solo.metrics, rel=1e-5)
        for name in RUNS:  # accumulated gradients equal
            for a, b in zip(state(together, name), state(alone, name), strict=True):
                assert_close(a, b)
        steps = together.optim_step_many([(name, adam[name]) for name in RUNS])
        for name, outcome in zip(RUNS, steps, strict=True):
            solo_step = alone.optim_step(name, adam[name])
            assert not isinstance(outcome, Exception), outcome
            assert outcome.step == solo_step.step == step + 1
            assert outcome.grad_norm == pytest.approx(solo_step.grad_norm, rel=1e-5)
            for a, b in zip(state(together, name), state(alone, name), strict=True):
                assert_close(a, b)


def test_forward_and_forward_backward_of_different_runs_share_a_call(tiny_model_dir) -> None:
    engine, alone = make_engine(tiny_model_dir, "ab"), make_engine(tiny_model_dir, "ab")
    ops = [op_for("a", 0), TrainOp("b", op_for("b", 0).data, "cross_entropy", backward=False)]
    result_a, result_b = engine.forward_backward_many(ops)
    assert not isinstance(result_a, Exception) and not isinstance(result_b, Exception)
    assert all(p.grad is None for p in engine._run("b").params)  # forward never touches its run
    assert all(p.grad is not None for p in engine._run("a").params)
    solo_b = alone.forward("b", ops[1].data, "cross_entropy")
    assert_close(torch.tensor(result_b.loss), torch.tensor(solo_b.loss))


def test_two_ops_of_one_run_in_one_call_accumulate_as_two_calls(tiny_model_dir) -> None:
    # Both fit one block; a shared backward would hand each op the sum of both gradients (2x in all).
    together, alone = make_engine(tiny_model_dir, "b"), make_engine(tiny_model_dir, "b")
    ops = [op_for("b", 0), op_for("b", 1)]
    results = together.forward_backward_many(ops)
    for op, result in zip(ops, results, strict=True):
        assert not isinstance(result, Exception), result
        solo = alone.forward_backward(op.run_id, op.data, op.loss)
        assert_close(torch.tensor(result.loss), torch.tensor(solo.loss))
    for a, b in zip(state(together, "b"), state(alone, "b"), strict=True):
        assert_close(a, b)
    assert together._run("b").pending_grad_ops == alone._run("b").pending_grad_ops == 2


def _nan_loss(logits, labels, weights=None, **kwargs):
    return logits.sum() * float("nan")


def _raising_loss(logits, labels, weights=None, **kwargs):
    raise RuntimeError("user bug")


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (TrainOp("b", [Datum.from_labels([5, 99_999])]), InvalidInputError, "out of the vocabulary"),
        (
            TrainOp("b", [Datum.from_labels([5, 6, 7])], LossFunctionConfig(loss_type="nan_loss")),
            NonFiniteError,
            "nan",
        ),
        (
            TrainOp("b", [Datum.from_labels([5, 6, 7])], LossFunctionConfig(loss_type="raising_loss")),
            ComputeError,
            "user bug",
        ),
        (TrainOp("nope", [Datum.from_labels([5, 6, 7])]), NotFoundError, "nope"),
    ],
)
def test_a_failing_op_fails_alone_and_the_others_in_its_pass_succeed(
    tiny_model_dir, bad: TrainOp, error: type, match: str
) -> None:
    register_loss_function("nan_loss", _nan_loss)
    register_loss_function("raising_loss", _raising_loss)
    try:
        engine, alone = make_engine(tiny_model_dir), make_engine(tiny_model_dir)
        before = state(engine, "b")
        ops = [op_for("a", 0), bad, op_for("c", 0)]
        good_a, failed, good_c = engine.forward_backward_many(ops)
        assert isinstance(failed, error)
        assert match in str(failed)
        for a, b in zip(state(engine, "b"), before, strict=True):
            assert torch.equal(a, b)
        for name, result in (("a", good_a), ("c", good_c)):
            op = op_for(name, 0)
            solo = alone.forward_backward(name, op.data, op.loss)
            assert not isinstance(result, Exception)
            assert_close(torch.tensor(result.loss), torch.tensor(solo.loss))
            for a, b in zip(state(engine, name), state(alone, name), strict=True):
                assert_close(a, b)
    finally:
        unregister_loss_function("nan_loss")
        unregister_loss_function("raising_loss")


def test_a_failed_shared_pass_retries_each_op_alone(tiny_model_dir, monkeypatch) -> None:
    engine, alone = make_engine(tiny_model_dir, "ab"), make_engine(tiny_model_dir, "ab")
    memory_profile(engine._run("a").base)  # measured once on first use (probe passes): before the fault
    model = engine._run("a").base.model.base_model  # the decoder stack: every training path runs it
    original, calls = model.forward, []

    def out_of_memory_on_big_batches(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("simulated")
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", out_of_memory_on_big_batches)
    ops = [op_for("a", 0), op_for("b", 0)]
    results = engine.forward_backward_many(ops)
    assert calls == [3, 2, 1]  # the shared block of 3 rows, then each op on its own
    for op, result in zip(ops, results, strict=True):
        solo = alone.forward_backward(op.run_id, op.data, op.loss)
        assert not isinstance(result, Exception)
        assert_close(torch.tensor(result.loss), torch.tensor(solo.loss))


def test_a_run_whose_step_fails_is_restored_and_the_others_step(tiny_model_dir) -> None:
    engine = make_engine(tiny_model_dir, "ab")
    engine.forward_backward_many([op_for("a", 0), op_for("b", 0)])
    engine._run("b").params[0].grad[0, 0] = float("inf")
    before = state(engine, "b")
    ok, failed = engine.optim_step_many(
        [("a", AdamParams(learning_rate=1e-2)), ("b", AdamParams(learning_rate=1e-2))]
    )
    assert isinstance(failed, NonFiniteError)
    assert not isinstance(ok, Exception) and ok.step == 1
    for a, b in zip(state(engine, "b"), before, strict=True):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
    assert engine._run("b").step == 0


# --- through the server: separate clients, one pass ------------------------------------------------------


def client_call(client: EZTinkerClient, op: TrainOp):
    """The op as a user's client sends it (token losses as Tinker datums, native as input_ids)."""
    if op.loss is None:
        return client.forward_backward(op.run_id, input_ids=[list(d.tokens) for d in op.data])
    loss = op.loss if isinstance(op.loss, TokenLoss) else TokenLoss(op.loss)
    data = [{"tokens": list(d.tokens), "loss_inputs": dict(d.loss_inputs)} for d in op.data]
    return client.forward_backward(
        op.run_id, data=data, loss_fn=loss.name, loss_fn_config=loss.config or None
    )


def test_four_clients_training_concurrently_are_co_batched_and_match_training_alone(
    tmp_path, tiny_model_dir
) -> None:
    adam = {"learning_rate": 1e-2, "weight_decay": 0.01}
    alone = make_engine(tiny_model_dir)
    steps = 3
    results: dict[str, list] = {name: [] for name in RUNS}
    run_ids: dict[str, str] = {}
    service = Service(Settings(data_dir=tmp_path, models=[str(tiny_model_dir)]))
    with eztinker.serve(service=service) as url:
        for name, config in RUNS.items():
            with EZTinkerClient(base_url=url) as client:
                run_ids[name] = client.create_run(base_model=str(tiny_model_dir), lora_config=config)
        submitted = threading.Barrier(len(RUNS) + 1, timeout=30)

        def train(name: str) -> None:
            with EZTinkerClient(base_url=url) as client:
                for step in range(steps):
                    fb = client_call(client, op_for(name, step, run_ids[name]))
                    opt = client.optim_step(run_ids[name], **adam)
                    submitted.wait()  # every client has submitted this step's ops
                    results[name].append(
                        (fb.result(timeout=60), opt.result(timeout=60), fb.job_id, opt.job_id)
                    )
                    submitted.wait()  # every client has its results: the next step may begin

        threads = [threading.Thread(target=train, args=(name,)) for name in RUNS]
        for thread in threads:
            thread.start()
        for _ in range(steps):
            release = threading.Event()
            # Hold the one worker while the four clients submit, so their ops meet in the queue.
            service.submit("hold", None, lambda release=release: release.wait(30) and {}, None)
            submitted.wait()
            release.set()
            submitted.wait()
        for thread in threads:
            thread.join(60)
        pass_sizes = {
            (name, kind): service.views.get_job(job_id, None).pass_size
            for name in RUNS
            for _, _, fb_id, opt_id in results[name]
            for kind, job_id in (("fb", fb_id), ("opt", opt_id))
        }
        metrics = httpx.get(f"{url}/metrics").text
        engine = service.backend.engine
        final = {name: [p.detach().clone() for p in engine._run(run_ids[name]).params] for name in RUNS}

    assert set(pass_sizes.values()) == {4}  # every op shared its pass with the other three runs
    assert "eztinker_pass_jobs_bucket" in metrics and "eztinker_worker_utilisation" in metrics
    for step in range(steps):
        for name in RUNS:
            op = op_for(name, step)
            solo = alone.forward_backward(name, op.data, op.loss)
            solo_step = alone.optim_step(name, AdamParams(**adam))
            fb, opt, _, _ = results[name][step]
            assert fb["loss"] == pytest.approx(solo.loss, rel=1e-5)
            for lp, solo_lp in zip(fb["logprobs"], solo.logprobs, strict=True):
                assert_close(torch.tensor(lp), solo_lp)
            assert opt["step"] == solo_step.step
            assert opt["grad_norm"] == pytest.approx(solo_step.grad_norm, rel=1e-5)
    for name in RUNS:
        for a, b in zip(final[name], alone._run(name).params, strict=True):
            assert_close(a, b.detach())
