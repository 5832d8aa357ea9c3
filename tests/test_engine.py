"""The training engine: runs on a shared base, exact gradient accumulation, chunking, rollback."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from eztinker.engine import (
    AdamParams,
    ComputeError,
    ConflictError,
    Datum,
    Engine,
    EngineConfig,
    InvalidInputError,
    NonFiniteError,
    NotFoundError,
    TokenLoss,
    UnknownLossError,
    register_loss_function,
)
from eztinker.engine.losses import unregister_loss_function
from eztinker.models import LossFunctionConfig

QWEN_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def seqs(lengths: list[int], start: int = 5) -> list[list[int]]:
    """Deterministic token sequences of the given lengths (ids within the tiny vocabulary)."""
    return [[(start + 37 * i + 11 * j) % 1000 + 3 for j in range(n)] for i, n in enumerate(lengths)]


def ce_data(lengths: list[int]) -> list[Datum]:
    """Token-family cross-entropy data: next-token targets with varying weights."""
    out = []
    for s in seqs(lengths):
        weights = [0.5 + (j % 3) * 0.25 for j in range(len(s) - 1)]
        out.append(Datum.from_targets(s[:-1], s[1:], weights=weights))
    return out


def run_state(engine: Engine, run_id: str) -> dict[str, object]:
    """Everything that defines a run's training state, cloned."""
    run = engine._run(run_id)
    return {
        "weights": [p.detach().clone() for p in run.params],
        "grads": [None if p.grad is None else p.grad.clone() for p in run.params],
        "optimizer": [
            {k: v.clone() for k, v in run.optimizer.state[p].items()} if p in run.optimizer.state else {}
            for p in run.params
        ],
        "step": run.step,
    }


def assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for x, y in zip(a["weights"], b["weights"], strict=True):
        assert torch.equal(x, y)
    for x, y in zip(a["grads"], b["grads"], strict=True):
        assert (x is None and y is None) or torch.equal(x, y)
    for x, y in zip(a["optimizer"], b["optimizer"], strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k])


@pytest.fixture
def engine(tiny_model_dir) -> Engine:
    return Engine(EngineConfig(device="cpu"))


@pytest.fixture
def run_id(engine: Engine, tiny_model_dir) -> str:
    """A run whose adapter has trained one step, so B is non-zero and the adapter matters."""
    run = engine.create_run(str(tiny_model_dir), {"r": 4, "lora_alpha": 8, "seed": 1})
    engine.forward_backward(run.run_id, ce_data([12, 9]), "cross_entropy")
    engine.optim_step(run.run_id, AdamParams(learning_rate=1e-2))
    return run.run_id


# --- the engine against a hand-written PEFT + AdamW loop ------------------------------------------------


def test_training_matches_a_hand_written_peft_adamw_loop(engine: Engine, tiny_model_dir) -> None:
    run_id = engine.create_run(str(tiny_model_dir), {"r": 4, "lora_alpha": 8, "seed": 3}).run_id
    run = engine._run(run_id)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=QWEN_TARGETS),
    )
    # Start both from the same adapter: copy the engine's A (B is zero in both).
    for path, slot in run.slots.items():
        layer = peft_model.base_model.model.get_submodule(path)
        layer.lora_A["default"].weight.data.copy_(slot.lora_A.data)
        layer.lora_B["default"].weight.data.copy_(slot.lora_B.data)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    batch = seqs([16, 16, 16])
    input_ids = torch.tensor(batch)

    for step, lr in enumerate([1e-2, 5e-3, 2e-3]):
        result = engine.forward_backward(run_id, [Datum.from_labels(s) for s in batch])
        engine.optim_step(
            run_id, AdamParams(learning_rate=lr, eps=1e-8, weight_decay=0.01, grad_clip_norm=1.0)
        )

        loss = peft_model(input_ids=input_ids, labels=input_ids).loss
        assert result.loss == pytest.approx(loss.item(), abs=1e-5), f"step {step}"
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for path, slot in run.slots.items():
        layer = peft_model.base_model.model.get_submodule(path)
        # Adam divides by sqrt(v): float noise in tiny gradients grows to ~1e-6 after a few steps.
        torch.testing.assert_close(
            slot.lora_A.data, layer.lora_A["default"].weight.data, atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(
            slot.lora_B.data, layer.lora_B["default"].weight.data, atol=1e-5, rtol=1e-4
        )
    assert run.step == 3


# --- exact accumulation and chunking ---------------------------------------------------------------------


def twin_runs(engine: Engine, model_dir, n: int = 2) -> list[str]:
    """Runs with identical adapters (same seed, same non-zero B), so every gradient is exercised."""
    ids = []
    for _ in range(n):
        run_id = engine.create_run(str(model_dir), {"r": 4, "seed": 7}).run_id
        generator = torch.Generator().manual_seed(0)
        for path in sorted(engine._run(run_id).slots):
            engine._run(run_id).slots[path].lora_B.data.normal_(0, 0.02, generator=generator)
        ids.append(run_id)
    return ids


def test_two_half_batch_calls_equal_one_full_batch_call(engine: Engine, tiny_model_dir) -> None:
    data = ce_data([14, 7, 11, 5])
    run_id, other = twin_runs(engine, tiny_model_dir)

    full = engine.forward_backward(run_id, data, "cross_entropy")
    half1 = engine.forward_backward(other, data[:2], "cross_entropy")
    half2 = engine.forward_backward(other, data[2:], "cross_entropy")

    assert full.loss == pytest.approx(half1.loss + half2.loss, rel=1e-6)
    for a, b in zip(engine._run(run_id).params, engine._run(other).params, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)
    for a, b in zip(full.logprobs, half1.logprobs + half2.logprobs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "loss",
    [
        TokenLoss("cross_entropy"),
        LossFunctionConfig(loss_type="cross_entropy"),
        LossFunctionConfig(loss_type="weighted_cross_entropy"),
    ],
    ids=["token-ce", "native-ce", "native-weighted-ce"],
)
def test_a_batch_run_in_chunks_equals_one_pass(tiny_model_dir, loss) -> None:
    lengths = [30, 4, 17, 9, 25, 2, 12]
    if isinstance(loss, TokenLoss):
        data = ce_data(lengths)
    else:
        data = [Datum.from_labels(s, weights=[1.0 + (j % 4) for j in range(len(s))]) for s in seqs(lengths)]
    outputs, grads = [], []
    for budget in (10_000, 32):  # one pass / a chunk per one or two datums
        engine = Engine(EngineConfig(device="cpu", token_budget=budget))
        [run_id] = twin_runs(engine, tiny_model_dir, 1)
        run = engine._run(run_id)
        outputs.append(engine.forward_backward(run_id, data, loss))
        grads.append([p.grad.clone() for p in run.params])
    one_pass, chunked = outputs
    assert one_pass.loss == pytest.approx(chunked.loss, rel=1e-5)
    for a, b in zip(one_pass.logprobs, chunked.logprobs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_per_datum_logprobs_have_the_targets_shape(engine: Engine, run_id: str) -> None:
    token = engine.forward(run_id, ce_data([8, 3]), "cross_entropy")
    assert [tuple(lp.shape) for lp in token.logprobs] == [(7,), (2,)]
    assert token.metrics["num_tokens:sum"] == 9
    assert token.loss_family == "token"
    assert "loss:sum" in token.metrics
    native = engine.forward(run_id, [Datum.from_labels(s) for s in seqs([8, 3])])
    assert [tuple(lp.shape) for lp in native.logprobs] == [(7,), (2,)]
    assert "loss:mean" in native.metrics
    assert all(bool((lp <= 0).all()) for lp in token.logprobs + native.logprobs)


def test_top_k_targets_give_n_by_k_logprobs_and_sum_over_k(engine: Engine, run_id: str) -> None:
    s = seqs([6])[0]
    targets = torch.tensor([[t, (t + 1) % 900, (t + 2) % 900] for t in s[1:]])  # (N, K=3)
    weights = torch.tensor([[0.6, 0.3, 0.1]] * (len(s) - 1))
    out = engine.forward(
        run_id, [Datum(s[:-1], {"target_tokens": targets, "weights": weights})], "cross_entropy"
    )
    assert tuple(out.logprobs[0].shape) == (5, 3)
    assert out.loss == pytest.approx(float(-(out.logprobs[0] * weights).sum()), rel=1e-6)


def test_forward_computes_without_touching_the_run(engine: Engine, run_id: str) -> None:
    before = run_state(engine, run_id)
    fwd = engine.forward(run_id, ce_data([9, 4]), "cross_entropy")
    assert_same_state(before, run_state(engine, run_id))
    fb = engine.forward_backward(run_id, ce_data([9, 4]), "cross_entropy")
    assert fwd.loss == pytest.approx(fb.loss, rel=1e-6)


def test_gradients_accumulate_until_optim_step_which_zeroes_them(engine: Engine, run_id: str) -> None:
    run = engine._run(run_id)
    engine.forward_backward(run_id, ce_data([9]), "cross_entropy")
    once = [p.grad.clone() for p in run.params]
    engine.forward_backward(run_id, ce_data([9]), "cross_entropy")
    for g, p in zip(once, run.params, strict=True):
        torch.testing.assert_close(p.grad, 2 * g)
    result = engine.optim_step(run_id, AdamParams(learning_rate=1e-3))
    assert result.step == 2
    assert all(p.grad is None for p in run.params)


def test_a_zero_learning_rate_step_counts_but_does_not_move_the_weights(engine: Engine, run_id: str) -> None:
    before = run_state(engine, run_id)
    engine.forward_backward(run_id, ce_data([9]), "cross_entropy")
    assert engine.optim_step(run_id, AdamParams(learning_rate=0.0)).step == before["step"] + 1
    for a, b in zip(before["weights"], engine._run(run_id).params, strict=True):
        assert torch.equal(a, b)


def test_grads_from_the_client_backpropagate_like_weighted_cross_entropy(
    engine: Engine, tiny_model_dir
) -> None:
    ids = [engine.create_run(str(tiny_model_dir), {"r": 2, "seed": 5}).run_id for _ in range(2)]
    s = seqs([10])[0]
    grads = [[0.1 * (j - 4) for j in range(9)]]
    engine.forward_backward_from_grads(ids[0], [Datum.from_targets(s[:-1], s[1:])], grads)
    engine.forward_backward(
        ids[1], [Datum.from_targets(s[:-1], s[1:], weights=[-g for g in grads[0]])], "cross_entropy"
    )
    for a, b in zip(engine._run(ids[0]).params, engine._run(ids[1]).params, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


# --- many runs on one base -----------------------------------------------------------------------------


def test_runs_share_one_frozen_base_and_do_not_disturb_each_other(engine: Engine, tiny_model_dir) -> None:
    a = engine.create_run(str(tiny_model_dir), {"r": 4, "seed": 1}).run_id
    b = engine.create_run(str(tiny_model_dir), {"r": 2, "target_modules": ["q_proj", "v_proj"]}).run_id
    base = engine.base_model(str(tiny_model_dir))
    assert engine.loaded_models == [str(tiny_model_dir)]
    base_weights = {k: v.clone() for k, v in base.model.state_dict().items()}
    b_before = engine.forward(b, ce_data([10]), "cross_entropy").loss
    for _ in range(3):
        engine.forward_backward(a, ce_data([10, 6]), "cross_entropy")
        engine.optim_step(a, AdamParams(learning_rate=1e-2))
    assert engine.forward(b, ce_data([10]), "cross_entropy").loss == b_before
    for k, v in base.model.state_dict().items():
        if "lora" not in k:
            assert torch.equal(v, base_weights[k]), k
    assert not any(p.requires_grad for n, p in base.model.named_parameters())


def test_each_run_costs_only_its_adapter_and_deleting_it_frees_it(engine: Engine, tiny_model_dir) -> None:
    base = engine.base_model(str(tiny_model_dir))
    base_params = sum(p.numel() for p in base.model.parameters())
    info = engine.create_run(str(tiny_model_dir), {"r": 8})
    run = engine._run(info.run_id)
    # Every adapted layer holds exactly r·(in + out) new numbers for this run, nothing else is copied.
    expected = sum(8 * (layer.in_features + layer.out_features) for layer in base.lora_layers.values())
    assert info.num_parameters == expected
    assert sum(p.numel() for p in base.model.parameters()) == base_params
    engine.delete_run(info.run_id)
    assert all(info.run_id not in layer.adapters for layer in base.lora_layers.values())
    with pytest.raises(NotFoundError):
        engine.run_info(info.run_id)
    del run


def test_lora_layer_computes_base_plus_scaled_low_rank_delta(engine: Engine, tiny_model_dir) -> None:
    info = engine.create_run(str(tiny_model_dir), {"r": 4, "lora_alpha": 12, "target_modules": ["q_proj"]})
    base = engine.base_model(str(tiny_model_dir))
    layer = base.lora_layers["model.layers.0.self_attn.q_proj"]
    slot = layer.adapters[info.run_id]
    slot.lora_B.data.normal_()
    x = torch.randn(3, 5, layer.in_features)
    from eztinker.engine.lora import Segment, routed

    expected = (
        x @ layer.base_layer.weight.T + layer.base_layer.bias + (x @ slot.lora_A.T @ slot.lora_B.T) * 3.0
    )
    with routed(base.routing, [Segment(info.run_id, 0, 3)]):
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    with routed(base.routing, [Segment(None, 0, 1), Segment(info.run_id, 1, 3)]):  # mixed rows
        mixed = layer(x)
    torch.testing.assert_close(mixed[0], layer.base_layer(x[0]))
    torch.testing.assert_close(mixed[1:], expected[1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # no routing: the bare base


def test_a_seed_makes_the_adapter_init_reproducible(engine: Engine, tiny_model_dir) -> None:
    def init(seed):
        run_id = engine.create_run(str(tiny_model_dir), {"r": 4, "seed": seed}).run_id
        return [p.detach().clone() for p in engine._run(run_id).params]

    a, b, c = init(11), init(11), init(12)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "phi", "phi3", "llama"])
def test_every_family_trains_with_its_default_targets(tiny_model_dirs, family: str) -> None:
    engine = Engine(EngineConfig(device="cpu"))
    info = engine.create_run(str(tiny_model_dirs[family]), {"r": 4, "lora_alpha": 16, "seed": 0})
    expected = {
        "qwen2": QWEN_TARGETS,
        "llama": QWEN_TARGETS,
        "gpt2": ["c_attn", "c_fc", "c_proj"],
        "phi": ["dense", "fc1", "fc2", "k_proj", "q_proj", "v_proj"],
        "phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
    }[family]
    assert info.target_modules == expected
    data = [Datum.from_labels(s) for s in seqs([20, 20])]
    losses = []
    for _ in range(6):
        losses.append(engine.forward_backward(info.run_id, data).loss)
        engine.optim_step(info.run_id, AdamParams(learning_rate=2e-2))
    assert losses[-1] < losses[0] - 0.05


def test_target_modules_all_linear_excludes_the_output_head(engine: Engine, tiny_model_dir) -> None:
    info = engine.create_run(str(tiny_model_dir), {"r": 1, "target_modules": "all-linear"})
    assert info.target_modules == QWEN_TARGETS
    paths = engine._run(info.run_id).slots
    assert "lm_head" not in paths and len(paths) == 2 * 7


def test_run_ids_are_unique_and_losses_are_checked_at_creation(engine: Engine, tiny_model_dir) -> None:
    engine.create_run(str(tiny_model_dir), run_id="mine")
    with pytest.raises(ConflictError, match="mine"):
        engine.create_run(str(tiny_model_dir), run_id="mine")
    with pytest.raises(UnknownLossError, match="register_loss_function"):
        engine.create_run(str(tiny_model_dir), loss_config={"loss_type": "no_such_loss"})
    with pytest.raises(InvalidInputError, match="lora_config.target_modules.*q_proj"):
        engine.create_run(str(tiny_model_dir), {"target_modules": ["not_a_layer"]})
    with pytest.raises(NotFoundError):
        engine.forward(run_id="nope", data=ce_data([3]))


def test_a_registered_custom_loss_gets_its_config_as_keyword_arguments(
    engine: Engine, tiny_model_dir
) -> None:
    seen = {}

    def temperature_scaled(logits, labels, weights=None, *, temperature: float = 1.0, **kwargs):
        seen["temperature"] = temperature
        shift_logits = logits[:, :-1, :].contiguous() / temperature
        shift_labels = labels[:, 1:].contiguous()
        return torch.nn.functional.cross_entropy(
            shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1), ignore_index=-100
        )

    register_loss_function("temperature_scaled", temperature_scaled)
    try:
        config = LossFunctionConfig(loss_type="temperature_scaled", temperature=2.0)
        run_id = engine.create_run(str(tiny_model_dir), loss_config=config).run_id
        out = engine.forward_backward(run_id, [Datum.from_labels(s) for s in seqs([12])])
        assert seen["temperature"] == 2.0
        assert math.isfinite(out.loss)
    finally:
        unregister_loss_function("temperature_scaled")


# --- bad input is refused before compute, naming the field ------------------------------------------------


@pytest.mark.parametrize(
    ("data", "loss", "field"),
    [
        ([], "cross_entropy", "data"),
        ([Datum.from_targets([1, 2, 3], [2, 3, 5000])], "cross_entropy", "data[0].loss_inputs.target_tokens"),
        (
            [Datum.from_targets([1, 2, 3], [2, 3, 4]), Datum.from_targets([1, -2], [2, 3])],
            "cross_entropy",
            "data[1].tokens",
        ),
        ([Datum.from_targets([1, 2, 3], [2, 3])], "cross_entropy", "data[0].loss_inputs.target_tokens"),
        (
            [Datum.from_targets([1, 2, 3], [2, 3, 4], weights=[1.0, 1.0])],
            "cross_entropy",
            "data[0].loss_inputs.weights",
        ),
        (
            [Datum.from_targets([1, 2], [2, 3], weights=[1.0, float("nan")])],
            "cross_entropy",
            "data[0].loss_inputs.weights",
        ),
        (
            [Datum.from_targets([1, 2], [2, 3], logprobs=[-1.0, -1.0], advantages=[1.0, float("inf")])],
            "importance_sampling",
            "data[0].loss_inputs.advantages",
        ),
        (
            [Datum.from_targets([1, 2], [2, 3], logprobs=[-1.0, -1.0])],
            "ppo",
            "data[0].loss_inputs.advantages",
        ),
        (
            [Datum.from_targets([1, 2], [2, 3], advantage=[1.0, 1.0])],
            "cross_entropy",
            "data[0].loss_inputs.advantage",
        ),
        ([Datum.from_targets(list(range(600)), list(range(600)))], "cross_entropy", "data[0].tokens"),
        ([Datum.from_targets([], [])], "cross_entropy", "data[0].tokens"),
        ([Datum.from_labels([1, 2, 3], labels=[1, 2])], None, "data[0].loss_inputs.labels"),
        ([Datum.from_labels([1, 2, 3], labels=[1, -5, 2])], None, "data[0].loss_inputs.labels"),
        ([Datum.from_targets([1, 2], [2, 3])], "no_such_loss", "loss_fn"),
    ],
    ids=[
        "empty",
        "target-out-of-vocab",
        "negative-token",
        "length-mismatch",
        "weights-length",
        "nan-weight",
        "inf-advantage",
        "missing-input",
        "unknown-input",
        "too-long",
        "empty-datum",
        "labels-length",
        "negative-label",
        "unknown-loss",
    ],
)
def test_bad_input_is_refused_with_its_field_and_changes_nothing(
    engine: Engine, run_id: str, data, loss, field: str
) -> None:
    engine.forward_backward(run_id, ce_data([6]), "cross_entropy")  # some accumulated gradient to protect
    before = run_state(engine, run_id)
    with pytest.raises(InvalidInputError) as info:
        engine.forward_backward(run_id, data, loss)
    assert info.value.field == field or info.value.field.startswith(field), str(info.value)
    assert_same_state(before, run_state(engine, run_id))


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (AdamParams(learning_rate=-1.0), "adam_params.learning_rate"),
        (AdamParams(beta1=1.0), "adam_params.beta1"),
        (AdamParams(eps=0.0), "adam_params.eps"),
        (AdamParams(learning_rate=float("nan")), "adam_params.learning_rate"),
        (AdamParams(grad_clip_norm=-1.0), "adam_params.grad_clip_norm"),
    ],
)
def test_bad_optimizer_params_are_refused(engine: Engine, run_id: str, params, field: str) -> None:
    engine.forward_backward(run_id, ce_data([6]), "cross_entropy")
    before = run_state(engine, run_id)
    with pytest.raises(InvalidInputError) as info:
        engine.optim_step(run_id, params)
    assert info.value.field == field
    assert_same_state(before, run_state(engine, run_id))


# --- a failed op leaves the run exactly as it was ----------------------------------------------------------


def _nan_loss(logits, labels, weights=None, **kwargs):
    return logits.sum() * float("nan")


def _raising_loss(logits, labels, weights=None, **kwargs):
    raise RuntimeError("boom in user code")


@pytest.mark.parametrize(
    ("fn", "error"), [(_nan_loss, NonFiniteError), (_raising_loss, ComputeError)], ids=["nan", "raises"]
)
def test_a_failing_loss_rolls_back_and_the_run_keeps_working(engine: Engine, run_id: str, fn, error) -> None:
    register_loss_function("bad_loss", fn)
    try:
        engine.forward_backward(run_id, ce_data([6]), "cross_entropy")
        before = run_state(engine, run_id)
        with pytest.raises(error):
            engine.forward_backward(
                run_id, [Datum.from_labels(s) for s in seqs([7, 5])], LossFunctionConfig(loss_type="bad_loss")
            )
        assert_same_state(before, run_state(engine, run_id))
        engine.forward_backward(run_id, ce_data([6]), "cross_entropy")
        assert engine.optim_step(run_id).step == before["step"] + 1
    finally:
        unregister_loss_function("bad_loss")


def test_out_of_memory_mid_batch_rolls_back(tiny_model_dir, monkeypatch) -> None:
    engine = Engine(EngineConfig(device="cpu", token_budget=16))  # a chunk per datum
    run_id = engine.create_run(str(tiny_model_dir), {"r": 4}).run_id
    engine.forward_backward(run_id, ce_data([6]), "cross_entropy")
    before = run_state(engine, run_id)
    model = engine._run(run_id).base.model.base_model  # the decoder stack: every training path runs it
    calls = {"n": 0}
    original = model.forward

    def forward_that_runs_out_of_memory_on_the_second_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward_that_runs_out_of_memory_on_the_second_chunk)
    with pytest.raises(ComputeError, match="out of memory"):
        engine.forward_backward(run_id, ce_data([10, 10, 10]), "cross_entropy")
    assert calls["n"] == 2
    assert_same_state(before, run_state(engine, run_id))


def test_a_failing_optimizer_step_rolls_back(engine: Engine, run_id: str, monkeypatch) -> None:
    engine.forward_backward(run_id, ce_data([8]), "cross_entropy")
    before = run_state(engine, run_id)
    original = torch.optim.AdamW.step

    def half_step_then_oom(self, *args, **kwargs):
        original(self, *args, **kwargs)  # weights and moments are already modified...
        raise torch.OutOfMemoryError("simulated")  # ...when the failure comes

    monkeypatch.setattr(torch.optim.AdamW, "step", half_step_then_oom)
    with pytest.raises(ComputeError):
        engine.optim_step(run_id, AdamParams(learning_rate=1e-2, grad_clip_norm=1e-3))
    assert_same_state(before, run_state(engine, run_id))
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    assert engine.optim_step(run_id, AdamParams(learning_rate=1e-2)).step == before["step"] + 1


def test_non_finite_accumulated_gradients_refuse_the_step(engine: Engine, run_id: str) -> None:
    run = engine._run(run_id)
    engine.forward_backward(run_id, ce_data([8]), "cross_entropy")
    run.params[0].grad[0, 0] = float("inf")
    before = run_state(engine, run_id)
    with pytest.raises(NonFiniteError):
        engine.optim_step(run_id)
    assert_same_state(before, run_state(engine, run_id))
