"""Long context without the memory wall (`engine.head`, `engine.memory`).

* Chunked losses (hidden states -> head -> loss, a few positions at a time, recomputed in backward) equal
  the unchunked ones computed from full (B, T, V) logits — values, log-probs and LoRA gradients within
  1e-6 in fp32 — for every native built-in and every Tinker loss (top-K too), `forward` included, on one
  run and on a co-batched pass of two runs of different ranks, one with a LoRA on the output head.
* Gradient checkpointing of the decoder layers changes no gradient (even with LoRA dropout).
* No tensor of B·T·V elements exists during a chunked pass (every op output is inspected).
* Attention is SDPA's flash kernel with no mask and `is_causal`, padded co-batched pass or not.
* A sequence longer than the memory limit allows is refused before compute, saying the longest one the
  server takes, and the run is unchanged.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eztinker.engine import (
    Datum,
    Engine,
    EngineConfig,
    InvalidInputError,
    TokenLoss,
    TrainOp,
    register_loss_function,
)
from eztinker.engine import memory as engine_memory
from eztinker.engine.losses import TokenTerms, list_losses, unregister_loss_function
from eztinker.engine.memory import memory_profile
from eztinker.models import LossFunctionConfig

VOCAB = 1024  # the tiny tokenizer's
RUN_A = {"r": 4, "lora_alpha": 8, "seed": 1}  # attention + MLP
RUN_B = {"r": 8, "lora_alpha": 16, "seed": 2, "target_modules": ["q_proj", "v_proj", "down_proj", "lm_head"]}
NATIVE = ["cross_entropy", "weighted_cross_entropy", "focal_loss", "smooth_l1", "contrastive_loss"]
NATIVE_CONFIG = {"focal_loss": {"focal_alpha": 0.3, "focal_gamma": 1.5}, "smooth_l1": {"smooth_l1_beta": 0.5}}
TOKEN = ["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce"]
TOL = 1e-6


def _engine(model_dir, *, full_logits: bool = False, runs=(("a", RUN_A), ("b", RUN_B)), **config) -> Engine:
    """An engine with runs "a" and "b" whose B factors are random (so every LoRA gradient is non-zero).

    `full_logits`: the unchunked reference — the model's own full logits and the losses' `fn`, exactly
    the path a model whose head is not plain takes.
    """
    engine = Engine(EngineConfig(device="cpu", **config))
    gen = torch.Generator().manual_seed(0)
    for name, lora in runs:
        engine.create_run(str(model_dir), lora, run_id=name)
        with torch.no_grad():
            for p in engine._run(name).params:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    if full_logits:
        base = engine.base_model(str(model_dir))
        profile = memory_profile(base)
        assert profile.plain_head
        engine_memory._PROFILES[base.model] = dataclasses.replace(profile, plain_head=False)
    return engine


def _pair(model_dir, runs=(("a", RUN_A), ("b", RUN_B))) -> tuple[Engine, Engine]:
    """(unchunked reference, chunked: 3 positions per head chunk, recomputed; every layer checkpointed)."""
    full = _engine(model_dir, full_logits=True, runs=runs, checkpoint_tokens=10**9)
    chunked = _engine(model_dir, runs=runs, logits_chunk=3 * VOCAB, checkpoint_tokens=0)
    return full, chunked


def _tokens(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=gen).tolist()


def _native_data(seed: int) -> list[Datum]:
    """Three lengths, weights on one, ignored labels (a masked prompt) on another."""
    labels = _tokens(9, seed + 2)
    labels[:4] = [-100] * 4
    gen = torch.Generator().manual_seed(seed)
    return [
        Datum.from_labels(_tokens(12, seed), weights=(torch.rand(12, generator=gen) + 0.5).tolist()),
        Datum.from_labels(_tokens(7, seed + 1)),
        Datum.from_labels(_tokens(9, seed + 3), labels=labels),
    ]


def _token_data(name: str, seed: int, *, topk: bool = False) -> list[Datum]:
    gen = torch.Generator().manual_seed(seed)
    data = []
    for k, n in enumerate((11, 6)):
        seq = _tokens(n + 1, seed + k)
        inputs: dict = {"target_tokens": seq[1:]}
        if topk:
            inputs["target_tokens"] = torch.randint(3, VOCAB, (n, 3), generator=gen).tolist()
            inputs["weights"] = torch.rand(n, 3, generator=gen).tolist()
        elif name == "cross_entropy":
            inputs["weights"] = (torch.rand(n, generator=gen) + 0.5).tolist()
        else:
            inputs["logprobs"] = (-1.0 - torch.rand(n, generator=gen)).tolist()
            inputs["advantages"] = torch.randn(n, generator=gen).tolist()
        data.append(Datum(seq[:-1], inputs))
    return data


def _grads(engine: Engine, names) -> dict[str, list[torch.Tensor]]:
    """Each run's accumulated gradients (zeros where none), which are then cleared."""
    out: dict[str, list[torch.Tensor]] = {}
    for name in names:
        out[name] = []
        for p in engine._run(name).params:
            out[name].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            p.grad = None
    return out


def _assert_same(results, others, grads=None, other_grads=None) -> None:
    for got, want in zip(results, others, strict=True):
        assert not isinstance(got, Exception), got
        assert not isinstance(want, Exception), want
        assert got.loss == pytest.approx(want.loss, abs=TOL, rel=TOL)
        for lp, lp_want in zip(got.logprobs, want.logprobs, strict=True):
            assert lp.shape == lp_want.shape
            torch.testing.assert_close(lp, lp_want, atol=TOL, rtol=TOL)
    if grads is not None and other_grads is not None:
        assert grads.keys() == other_grads.keys()
        for name in grads:  # each run's own gradient
            assert_grads_close(grads[name], other_grads[name])


def assert_grads_close(grads: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """The runs' gradients within 1e-6 of their scale: ||g − want|| ≤ 1e-6 · ||want|| over every LoRA
    parameter at once (fp32), and elementwise within 1e-5 of the largest.

    A gradient summed over positions in another order (the head's matmul on chunks of 3 positions vs all
    at once) moves by float32 ulps of its largest terms: ~1e-7 of the whole gradient, but more than 1e-6
    of a small element, or of a small tensor (a head adapter's A), in an RL loss that exponentiates the
    log-probs.
    """
    assert [g.shape for g in grads] == [w.shape for w in want]
    g64 = torch.cat([g.double().flatten() for g in grads])
    w64 = torch.cat([w.double().flatten() for w in want])
    assert float((g64 - w64).norm()) <= TOL * float(w64.norm()), float((g64 - w64).norm() / w64.norm())
    assert float((g64 - w64).abs().max()) <= 10 * TOL * float(w64.abs().max())


def _both(engines, ops, names):
    outs = []
    for engine in engines:
        results = engine.forward_backward_many(ops)
        outs.append((results, _grads(engine, names)))
    return outs


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    return _pair(tiny_model_dir)


@pytest.mark.parametrize("name", NATIVE)
def test_chunked_native_losses_equal_full_logits(engines, name) -> None:
    loss = LossFunctionConfig(loss_type=name, **NATIVE_CONFIG.get(name, {}))
    ops = [TrainOp("a", _native_data(1), loss), TrainOp("b", _native_data(7), loss)]
    (full, g_full), (chunked, g_chunked) = _both(engines, ops, "ab")  # co-batched, two runs
    _assert_same(chunked, full, g_chunked, g_full)
    (full, g_full), (chunked, g_chunked) = _both(engines, ops[1:], "b")  # one run (LoRA on the head)
    _assert_same(chunked, full, g_chunked, g_full)
    forward = [dataclasses.replace(op, backward=False) for op in ops]
    _assert_same(engines[1].forward_backward_many(forward), engines[0].forward_backward_many(forward))


@pytest.mark.parametrize("name", [*TOKEN, "cross_entropy-topk"])
def test_chunked_token_losses_equal_full_logits(engines, name) -> None:
    loss_name = name.removesuffix("-topk")
    topk = name.endswith("-topk")
    loss = TokenLoss(loss_name, {"beta": 0.1} if loss_name == "dro" else {})
    ops = [TrainOp("a", _token_data(loss_name, 2, topk=topk), loss)]
    ops.append(TrainOp("b", _token_data(loss_name, 5, topk=topk), loss))
    (full, g_full), (chunked, g_chunked) = _both(engines, ops, "ab")
    _assert_same(chunked, full, g_chunked, g_full)
    (full, g_full), (chunked, g_chunked) = _both(engines, ops[1:], "b")
    _assert_same(chunked, full, g_chunked, g_full)
    forward = [dataclasses.replace(op, backward=False) for op in ops]
    _assert_same(engines[1].forward_backward_many(forward), engines[0].forward_backward_many(forward))


def test_every_builtin_is_covered() -> None:
    assert set(NATIVE) <= set(list_losses("native"))
    assert set(TOKEN) == set(list_losses("token"))


def test_a_registered_loss_takes_full_logits_and_one_with_token_terms_is_chunked(engines) -> None:
    seen: list[tuple[int, ...]] = []

    def doubled(logits, labels, weights=None, **kwargs):
        seen.append(tuple(logits.shape))
        return 2 * engine_losses_ce(logits, labels, weights)

    from eztinker.engine.losses import native_cross_entropy as engine_losses_ce

    data = _native_data(3)
    try:
        register_loss_function("doubled_ce", doubled)
        full_logits = engines[1].forward_backward("a", data, LossFunctionConfig(loss_type="doubled_ce"))
        _grads(engines[1], "a")
        assert seen and seen[0][-1] == VOCAB  # the contract: full (B, T, V) logits
        seen.clear()
        register_loss_function("doubled_ce", doubled, token_terms=TokenTerms(lambda z, y, lp, **kw: -2 * lp))
        chunked = engines[1].forward_backward("a", data, LossFunctionConfig(loss_type="doubled_ce"))
        _grads(engines[1], "a")
        assert not seen  # computed from its token terms, never with full logits
        assert chunked.loss == pytest.approx(full_logits.loss, abs=TOL)
    finally:
        unregister_loss_function("doubled_ce")


def test_gradient_checkpointing_changes_no_gradient(tiny_model_dir) -> None:
    dropout = {**RUN_A, "lora_dropout": 0.1}
    runs = (("a", dropout), ("b", RUN_B))
    plain = _engine(tiny_model_dir, runs=runs, checkpoint_tokens=10**9)
    checkpointed = _engine(tiny_model_dir, runs=runs, checkpoint_tokens=0)
    ops = [TrainOp("a", _native_data(4)), TrainOp("b", _token_data("ppo", 6), "ppo")]
    outs = []
    for engine in (plain, checkpointed):
        torch.manual_seed(123)  # the same dropout masks: checkpointing replays the RNG state
        outs.append((engine.forward_backward_many(ops), _grads(engine, "ab")))
    (a, ga), (b, gb) = outs
    _assert_same(b, a, gb, ga)


class _Outputs(TorchDispatchMode):
    """Records the shape of every tensor every aten op (forward and backward) produces."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def test_no_tensor_of_b_t_v_elements_is_made(tiny_model_dir) -> None:
    engine = _engine(tiny_model_dir, logits_chunk=16 * VOCAB)  # 16 positions per chunk
    rows, width = 3, 150
    data = [Datum.from_labels(_tokens(width, 10 + i)) for i in range(rows)]
    token_data = [Datum.from_targets(_tokens(width, 20 + i), _tokens(width, 30 + i)) for i in range(rows)]
    config = engine.base_model(str(tiny_model_dir)).model.config
    hidden, mlp = config.hidden_size, config.intermediate_size
    for op in (TrainOp("b", data), TrainOp("b", token_data, "cross_entropy")):
        recorder = _Outputs()
        with recorder:
            (result,) = engine.forward_backward_many([op])
        assert not isinstance(result, Exception), result
        _grads(engine, "b")
        assert any("backward" in name for name, _ in recorder.shapes)  # backward ops were seen too
        biggest = max(torch.Size(shape).numel() for _, shape in recorder.shapes)
        # Nothing comes near B·T·V: the largest are the MLP activations (B·T·I) or the head's weight (V·H).
        assert biggest <= max(rows * width * mlp, hidden * VOCAB) < rows * width * VOCAB
        logits = [s for _, s in recorder.shapes if s and s[-1] == VOCAB and hidden not in s]
        assert logits and max(torch.Size(s).numel() for s in logits) <= 16 * VOCAB


def test_attention_is_causal_sdpa_with_no_mask_padded_or_not(tiny_model_dir, monkeypatch) -> None:
    engine = _engine(tiny_model_dir)
    base = engine.base_model(str(tiny_model_dir))
    assert base.model.config._attn_implementation == "sdpa"
    calls: list[tuple[bool, bool]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask") is None, bool(kwargs.get("is_causal"))))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    padded = [TrainOp("a", _native_data(1)), TrainOp("b", _token_data("ppo", 2), "ppo")]  # rows of 6-12
    single = [TrainOp("a", [Datum.from_labels(_tokens(40, 3))])]
    for ops in (padded, single):
        calls.clear()
        kernels = _Outputs()
        with kernels:
            results = engine.forward_backward_many(ops)
        assert all(not isinstance(r, Exception) for r in results)
        assert calls and all(calls_ok == (True, True) for calls_ok in calls)
        names = {name for name, _ in kernels.shapes}
        assert any("flash_attention" in name for name in names), names
        assert not any("attention_math" in name for name in names)
    _grads(engine, "ab")


def test_padded_co_batched_pass_equals_each_row_alone(tiny_model_dir) -> None:
    engine = _engine(tiny_model_dir)
    data = _native_data(8)
    (together,) = engine.forward_backward_many([TrainOp("a", data)])
    g_together = _grads(engine, "a")
    alone = [engine.forward_backward("a", [d]) for d in data]
    for lp, solo in zip(together.logprobs, alone, strict=True):
        torch.testing.assert_close(lp, solo.logprobs[0], atol=TOL, rtol=TOL)
    assert g_together  # (gradients of a mean over rows differ from a sum of per-row means: not compared)


def test_a_sequence_beyond_memory_is_refused_before_compute(tiny_model_dir) -> None:
    engine = _engine(tiny_model_dir, checkpoint_tokens=64)
    base = engine.base_model(str(tiny_model_dir))
    profile = memory_profile(base)
    memory = engine.config.pass_options().memory(base)
    limit = memory.estimate(profile, 1, 300, backward=True, checkpoint=True)
    engine.config = dataclasses.replace(engine.config, memory_limit=limit)
    largest = (
        engine.config.pass_options().memory(base).largest_sequence(profile, backward=True, full_logits=False)
    )
    assert 300 <= largest < 400
    run = engine._run("a")
    before = [p.detach().clone() for p in run.params]
    too_long = [Datum.from_labels(_tokens(50, 1)), Datum.from_labels(_tokens(400, 2))]
    with pytest.raises(InvalidInputError) as info:
        engine.check_data("a", too_long)
    assert info.value.field == "data[1].tokens"
    assert f"the longest sequence it can take is {largest} tokens" in info.value.message
    with pytest.raises(InvalidInputError) as info:
        engine.forward_backward("a", too_long)
    assert info.value.field == "data[1].tokens" and str(largest) in info.value.message
    assert all(torch.equal(p, b) for p, b in zip(run.params, before, strict=True))
    assert all(p.grad is None for p in run.params) and run.pending_grad_ops == 0 and run.step == 0
    # Co-batched: the over-long request fails alone; the other one trains.
    bad, good = engine.forward_backward_many([TrainOp("a", too_long), TrainOp("b", _native_data(2))])
    assert isinstance(bad, InvalidInputError) and not isinstance(good, Exception)
    assert all(p.grad is None for p in run.params)
    # The longest allowed sequence trains; a forward (no saved activations) may take longer ones.
    assert engine.forward_backward("a", [Datum.from_labels(_tokens(largest, 3))]).loss > 0
    assert engine.forward("a", [Datum.from_labels(_tokens(400, 4))]).loss > 0


def test_the_estimate_follows_the_model(tiny_model_dir) -> None:
    engine = _engine(tiny_model_dir)
    base = engine.base_model(str(tiny_model_dir))
    profile = memory_profile(base)
    assert len(profile.layers) == base.model.config.num_hidden_layers
    _, b, c = profile.saved
    assert b > base.model.config.hidden_size * 4 * len(profile.layers)  # at least one float per layer
    assert c == 0  # flash attention saves O(T)
    memory = engine.config.pass_options().memory(base)
    sizes = [memory.estimate(profile, 1, n, backward=True, checkpoint=True) for n in (256, 512, 1024, 2048)]
    assert sizes == sorted(sizes)
    plain = memory.estimate(profile, 1, 2048, backward=True, checkpoint=False)
    assert plain > sizes[-1]  # checkpointing is what makes long sequences cheap


@pytest.mark.parametrize("family", ["gpt2", "phi", "phi3", "llama"])
def test_chunked_losses_equal_full_logits_in_every_family(tiny_model_dirs, family) -> None:
    """Each family's head is found and plain, and its padded, mask-free pass matches full logits."""
    runs = (
        ("a", {"r": 4, "lora_alpha": 8, "seed": 1}),
        ("b", {"r": 8, "seed": 2, "target_modules": "all-linear"}),
    )
    full, chunked = _pair(tiny_model_dirs[family], runs)
    ops = [TrainOp("a", _native_data(1)), TrainOp("b", _token_data("ppo", 2), "ppo")]
    (want, g_want), (got, g_got) = _both((full, chunked), ops, "ab")
    _assert_same(got, want, g_got, g_want)
