"""The CUDA-minded paths of the engine, checked on the CPU: same results as the plain way, fp32 LoRA maths
under a bf16 base, no host syncs inside a pass, and what reaches SDPA.

* The co-batched dense delta has four ways (`lora.DENSE_PATH`: "concat", "rows", "groups", "loop"); "auto"
  picks one by shape and device (`lora._dense_path`). Each equals the per-adapter
  loop for mixed ranks, repeated adapters and rows without one — in fp32 to 1e-6, under a bf16 base to
  bf16's rounding — and costs the same number of kernels for 2 adapters as for 6.
* Under a bf16 base, LoRA parameters, their gradients and the optimizer's state are fp32, and the layer
  input is kept for backward in bf16 (not as an fp32 copy) with the same gradients.
* Expert LoRA in bf16 factors (what CUDA's grouped matmul runs) equals the fp32 factors to bf16 rounding.
* No host sync in a pass: LoRA layers run with `.item()`/`.tolist()`/`bool(tensor)`/`torch.tensor(...)`
  etc. made to raise (on CUDA each of these waits for the device); a decode forward without padding, the
  whole model included, too.
* SDPA: training passes give it no mask and `is_causal=True`; sampling gives it a mask only when some row
  is left-padded; models load with `attn_implementation="sdpa"`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend
from torch.utils._python_dispatch import TorchDispatchMode

from eztinker.engine import (
    AdamParams,
    ComputeError,
    Datum,
    Engine,
    EngineConfig,
    TrainOp,
    batcher,
    lora,
    sampler,
)
from eztinker.engine.lora import LoRALinear, LoRAWeights, Routing, Segment, routed
from eztinker.engine.model import load_base_model
from eztinker.engine.sampler import SampleRequest
from eztinker.engine.types import SamplingParams
from eztinker.testing import TINY_FAMILIES, make_tiny_model

PATHS = ("concat", "rows", "groups")


@pytest.fixture(autouse=True)
def cuda_precision_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    """What CUDA does by default, here too: a bf16 input is saved for backward as it is (not as an fp32
    copy). The CPU default is the plain autograd way, which gives the same results."""
    monkeypatch.setattr(lora.layer, "SAVE_INPUT_IN_BASE_DTYPE", True)


# Rows 0-1 "a" (r 4), row 2 bare base, rows 3-5 "b" (r 8), row 6 "c" (r 2, absent in some layers), row 7
# "a" again (a second segment of one adapter), row 8 "d" (r 16).
LAYOUT = [("a", 0, 2), (None, 2, 3), ("b", 3, 6), ("c", 6, 7), ("a", 7, 8), ("d", 8, 9)]
RANKS = {"a": 4, "b": 8, "c": 2, "d": 16}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_layer(in_features: int, out_features: int, dtype: torch.dtype, *, without: str = "") -> LoRALinear:
    """A linear layer with adapters a-d (all but `without`), B non-zero so the delta is not trivially 0."""
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(in_features, out_features, bias=True).to(dtype).requires_grad_(False)
    layer = LoRALinear(base, Routing(), "layer")
    for name, r in RANKS.items():
        if name == without:
            continue
        a = torch.randn(r, in_features, generator=g) / in_features**0.5
        b = torch.randn(out_features, r, generator=g) / r**0.5
        layer.adapters[name] = LoRAWeights(nn.Parameter(a), nn.Parameter(b), scaling=2.0 / r, dropout=0.0)
    return layer


def segments(layout=LAYOUT) -> list[Segment]:
    return [Segment(adapter, start, stop) for adapter, start, stop in layout]


def run_layer(
    layer: LoRALinear,
    x: torch.Tensor,
    path: str,
    monkeypatch: pytest.MonkeyPatch,
    forward_context: contextlib.AbstractContextManager | None = None,
):
    """(output, dL/dx, {adapter: (dL/dA, dL/dB)}) of one forward/backward through `layer` on `path`."""
    monkeypatch.setattr(lora.layer, "DENSE_PATH", path)
    for slot in layer.adapters.values():
        slot.lora_A.grad = slot.lora_B.grad = None
    x = x.detach().clone().requires_grad_(True)
    with routed(layer.routing, segments(), train=True), forward_context or contextlib.nullcontext():
        y = layer(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=torch.float32).view(y.shape)
    (y.float() * weights).sum().backward()
    assert x.grad is not None
    grads = {}
    for name, slot in layer.adapters.items():
        assert slot.lora_A.grad is not None and slot.lora_B.grad is not None
        grads[name] = (slot.lora_A.grad.clone(), slot.lora_B.grad.clone())
    return y.detach(), x.grad, grads


# --- the dense paths equal the loop -------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("without", ["", "c"])
def test_dense_paths_equal_the_loop_in_fp32(tokens: int, path: str, without: str, monkeypatch) -> None:
    layer = make_layer(24, 40, torch.float32, without=without)
    x = torch.randn(9, tokens, 24, generator=torch.Generator().manual_seed(1))
    y_ref, dx_ref, grads_ref = run_layer(layer, x, "loop", monkeypatch)
    y, dx, grads = run_layer(layer, x, path, monkeypatch)
    assert relative_error(y - layer.base_layer(x), y_ref - layer.base_layer(x)) < 1e-6
    assert relative_error(dx, dx_ref) < 1e-6
    for name, (da, db) in grads.items():
        assert relative_error(da, grads_ref[name][0]) < 1e-6, name
        assert relative_error(db, grads_ref[name][1]) < 1e-6, name
    assert torch.equal(y[2], layer.base_layer(x)[2])  # the bare row: the base layer's output exactly


@pytest.mark.parametrize("path", PATHS)
def test_dense_paths_equal_the_loop_under_a_bf16_base(path: str, monkeypatch) -> None:
    layer = make_layer(32, 48, torch.bfloat16)
    x = torch.randn(9, 5, 32, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y_ref, dx_ref, grads_ref = run_layer(layer, x, "loop", monkeypatch)
    y, dx, grads = run_layer(layer, x, path, monkeypatch)
    assert y.dtype == dx.dtype == torch.bfloat16
    # The delta is fp32 either way and rounded once: outputs differ by at most a bf16 rounding.
    torch.testing.assert_close(y, y_ref, rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(dx, dx_ref, rtol=8e-3, atol=8e-3)
    for name, (da, db) in grads.items():
        assert da.dtype == db.dtype == torch.float32
        assert relative_error(da, grads_ref[name][0]) < 1e-5, name
        assert relative_error(db, grads_ref[name][1]) < 1e-5, name


def test_the_delta_is_fp32_maths_under_a_bf16_base(monkeypatch) -> None:
    """x·Aᵀ·Bᵀ runs in fp32: the delta matches a float64 reference to fp32 precision, not bf16's."""
    layer = make_layer(32, 48, torch.bfloat16)
    x = torch.randn(9, 5, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    slots = [layer.adapters.get(a) if a else None for a, _, _ in LAYOUT]
    for path in (*PATHS, "loop"):
        monkeypatch.setattr(lora.layer, "DENSE_PATH", path)
        delta = lora._routed_delta(x, segments(), slots, layer.routing)
        assert delta is not None and delta.dtype == torch.float32
        for (adapter, start, stop), slot in zip(LAYOUT, slots, strict=True):
            if slot is None:
                assert not delta[start:stop].any()
                continue
            exact = x[start:stop].double() @ slot.lora_A.double().T @ slot.lora_B.double().T * slot.scaling
            assert relative_error(delta[start:stop], exact) < 1e-6, (path, adapter)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view  # kernels; views (a transpose per factor) launch none
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", PATHS)
def test_a_dense_path_costs_the_same_kernels_for_any_number_of_adapters(path: str, monkeypatch) -> None:
    """One batched op per layer, not a loop over runs: 2 adapters and 6 adapters run as many kernels (aten
    ops other than views), after the first pass of a layout, which builds its index tensors."""
    monkeypatch.setattr(lora.layer, "DENSE_PATH", path)

    def ops(adapters: int) -> int:
        layer = LoRALinear(nn.Linear(16, 16).requires_grad_(False), Routing(), "layer")
        for i in range(adapters):
            r = 2 + 2 * (i % 3)
            layer.adapters[str(i)] = LoRAWeights(
                nn.Parameter(torch.randn(r, 16)), nn.Parameter(torch.randn(16, r)), 1.0, 0.0
            )
        layout = [Segment(str(i), 2 * i, 2 * i + 2) for i in range(adapters)]
        x = torch.randn(2 * adapters, 3, 16)
        with routed(layer.routing, layout), torch.no_grad():
            layer(x)  # builds the plan
            with _CountOps() as counter:
                layer(x)
        return counter.count

    assert ops(2) == ops(6)
    if path == "concat":  # the counter counts: one matmul pair per segment grows with the adapters
        monkeypatch.setattr(lora.layer, "DENSE_PATH", "loop")
        assert ops(6) > ops(2)


def test_the_auto_choice_by_device_and_shape() -> None:
    def plan(adapters: int, rank: int) -> lora._RowPlan:
        """One row per adapter, each of rank `rank`."""
        slots = [
            LoRAWeights(nn.Parameter(torch.zeros(rank, 4)), nn.Parameter(torch.zeros(4, rank)), 1.0, 0.0)
            for _ in range(adapters)
        ]
        segs = [Segment(str(g), g, g + 1) for g in range(adapters)]
        planned = lora._row_plan(Routing(), segs, slots, torch.device("cpu"))
        assert planned is not None
        return planned[0]

    few = plan(8, 8)  # 8 rows, 8 adapters of rank 8: R = 64
    many = plan(256, 32)  # 256 rows on 256 adapters of rank 32
    assert lora._dense_path(few, 1, "cpu") == "concat"
    assert lora._dense_path(few, 64, "cpu") == "rows"
    assert lora._dense_path(many, 1, "cpu") == "groups"
    assert lora._dense_path(few, 1, "cuda") == "concat"
    assert lora._dense_path(few, 64, "cuda") == "rows"
    assert lora._dense_path(many, 1, "cuda") == "groups"  # concat would multiply 256 rows by 8192 ranks
    assert lora._dense_path(many, 8, "cuda") == "groups"  # fewer tokens than ranks: copy rows, not factors


# --- precision and memory under a bf16 base ------------------------------------------------------------


def test_the_bf16_input_is_saved_not_an_fp32_copy_and_gradients_are_unchanged(monkeypatch) -> None:
    layer = make_layer(32, 48, torch.bfloat16)
    x = torch.randn(9, 6, 32, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    results, saved = {}, {}
    for keep_bf16 in (False, True):
        monkeypatch.setattr(lora.layer, "SAVE_INPUT_IN_BASE_DTYPE", keep_bf16)
        seen: list[torch.Tensor] = []

        def pack(t: torch.Tensor, seen=seen) -> torch.Tensor:
            seen.append(t)
            return t

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        results[keep_bf16] = run_layer(layer, x, "rows", monkeypatch, forward_context=hooks)
        saved[keep_bf16] = [
            t for t in seen if t.dtype == torch.float32 and t.shape[-1] == 32 and t.dim() == 3
        ]
    assert saved[False], "autograd keeps the fp32 copy of x for the gradient of A"
    assert not any(t.shape[:2] == (9, 6) for t in saved[True]), "…and the saving path keeps x in bf16 instead"
    (y0, dx0, g0), (y1, dx1, g1) = results[False], results[True]
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
    for name in g0:
        assert torch.equal(g0[name][0], g1[name][0]) and torch.equal(g0[name][1], g1[name][1])


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2", tokenizer_dir=tiny_tokenizer_dir)


RUNS = {
    "a": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "seed": 1},
    "b": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "seed": 2},
    "c": {"r": 2, "lora_alpha": 2, "target_modules": ["gate_proj", "o_proj", "q_proj"], "seed": 3},
}


def ops(step: int) -> list[TrainOp]:
    def seq(n: int, start: int) -> list[int]:
        return [(start + 37 * j) % 900 + 3 for j in range(n)]

    return [
        TrainOp("a", [Datum.from_labels(seq(12, step)), Datum.from_labels(seq(7, step + 1))]),
        TrainOp("b", [Datum.from_labels(seq(16, step + 2))]),
        TrainOp("c", [Datum.from_labels(seq(9, step + 3)), Datum.from_labels(seq(14, step + 4))]),
    ]


def make_engine(
    model_dir: Path, dtype: torch.dtype, *, nonzero_b: bool = False, checkpoint_tokens: int = 1024
) -> Engine:
    engine = Engine(EngineConfig(device="cpu", dtype=dtype, checkpoint_tokens=checkpoint_tokens))
    for k, (name, config) in enumerate(RUNS.items()):
        engine.create_run(str(model_dir), config, run_id=name)
        if nonzero_b:  # B = 0 at init: the forward would not see the adapters
            g = torch.Generator().manual_seed(k)
            with torch.no_grad():
                for slot in engine._run(name).slots.values():
                    slot.lora_B.normal_(0, 0.2, generator=g)
    return engine


def test_lora_parameters_gradients_and_optimizer_state_are_fp32_with_a_bf16_base(qwen2_dir) -> None:
    engine = make_engine(qwen2_dir, torch.bfloat16)
    base = engine.base_model(str(qwen2_dir))
    assert base.dtype == torch.bfloat16
    assert {p.dtype for p in base.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    results = engine.forward_backward_many(ops(0))
    assert not any(isinstance(r, Exception) for r in results), results
    for name in RUNS:
        run = engine._run(name)
        assert {p.dtype for p in run.params} == {torch.float32}
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in run.params)
        engine.optim_step(name, AdamParams(learning_rate=1e-3))
        states = [v for p in run.params for v in run.optimizer.state[p].values() if torch.is_tensor(v)]
        assert states and all(v.dtype == torch.float32 for v in states if v.dim() > 0)


@pytest.mark.parametrize("path", ["loop", *PATHS])
def test_a_cobatched_bf16_pass_on_each_path_equals_the_loop(path: str, qwen2_dir, monkeypatch) -> None:
    """Through the whole engine: three runs of different ranks and targets in one bf16 pass."""

    def losses_and_grads(p: str) -> tuple[list[float], dict[str, list[torch.Tensor]]]:
        monkeypatch.setattr(lora.layer, "DENSE_PATH", p)
        engine = make_engine(qwen2_dir, torch.bfloat16, nonzero_b=True)
        results = engine.forward_backward_many(ops(1))
        assert not any(isinstance(r, Exception) for r in results), results
        grads = {name: [q.grad.clone() for q in engine._run(name).params] for name in RUNS}  # type: ignore[union-attr]
        return [r.loss for r in results], grads  # type: ignore[union-attr]

    ref_losses, ref_grads = losses_and_grads("loop")
    got_losses, got_grads = losses_and_grads(path)
    assert got_losses == pytest.approx(ref_losses, rel=1e-3)
    for name in RUNS:
        total = torch.cat([g.flatten() for g in got_grads[name]])
        expected = torch.cat([g.flatten() for g in ref_grads[name]])
        # fp32 LoRA maths either way; where the 1e-7 differences flip a bf16 rounding, ~1e-3 follows
        assert relative_error(total, expected) < 1e-2, name


def test_saving_the_bf16_input_works_under_layer_checkpointing(qwen2_dir, monkeypatch) -> None:
    """Decoder layers checkpointed (recomputed in backward, `engine.memory`): the saving path's own
    recompute nests inside and gives the gradients of the plain pass."""
    from eztinker.engine import memory

    calls = []
    original = memory.checkpoint

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(memory, "checkpoint", counting)

    def grads(checkpoint_tokens: int) -> dict[str, torch.Tensor]:
        engine = make_engine(qwen2_dir, torch.bfloat16, nonzero_b=True, checkpoint_tokens=checkpoint_tokens)
        results = engine.forward_backward_many(ops(3))
        assert not any(isinstance(r, Exception) for r in results), results
        return {n: torch.cat([p.grad.flatten() for p in engine._run(n).params]) for n in RUNS}  # type: ignore[union-attr]

    plain = grads(10**6)
    assert not calls
    checkpointed = grads(1)
    assert calls
    for name in RUNS:
        assert relative_error(checkpointed[name], plain[name]) < 1e-6, name


# --- experts ------------------------------------------------------------------------------------------


def test_run_ends_equal_bincount_cumsum() -> None:
    keys = torch.sort(torch.randint(0, 12, (200,), generator=torch.Generator().manual_seed(5))).values
    expected = torch.bincount(keys, minlength=15).cumsum(0).to(torch.int32)
    assert torch.equal(lora._run_ends(keys, 15), expected)
    assert torch.equal(lora._run_ends(keys[:0], 4), torch.zeros(4, dtype=torch.int32))


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("qwen3-moe"), "qwen3_moe", tokenizer_dir=tiny_tokenizer_dir
    )


def test_expert_lowrank_in_bf16_factors_equals_fp32_factors(moe_dir, monkeypatch) -> None:
    """CUDA computes the expert low-rank products in bf16 (its grouped matmul's one fast dtype); run that
    here on a bf16 base against the fp32 factors the CPU uses: equal to bf16 rounding, grads fp32."""
    monkeypatch.setattr(lora.experts, "MERGE_EXPERTS_BELOW", 0.0)  # the low-rank way, not W + ΔW

    def run(factors: torch.dtype) -> tuple[list[float], list[torch.Tensor]]:
        monkeypatch.setattr(lora.experts, "EXPERT_FACTORS_DTYPE", factors)
        engine = Engine(EngineConfig(device="cpu", dtype=torch.bfloat16))
        for name, r in (("x", 4), ("y", 8)):
            engine.create_run(
                str(moe_dir),
                {"r": r, "lora_alpha": 16, "target_modules": ["experts", "q_proj"], "seed": r},
                run_id=name,
            )
            for path, slot in engine._run(name).slots.items():
                if "experts" in path:
                    with torch.no_grad():  # B = 0 at init would hide the forward delta
                        slot.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(r))
        data = [Datum.from_labels([(7 * j + k) % 900 + 3 for j in range(11)]) for k in range(2)]
        results = engine.forward_backward_many([TrainOp("x", data), TrainOp("y", data[:1])])
        assert not any(isinstance(r, Exception) for r in results), results
        grads = [p.grad for name in ("x", "y") for p in engine._run(name).params]
        assert all(g is not None and g.dtype == torch.float32 for g in grads)
        return [r.loss for r in results], grads  # type: ignore[union-attr,misc]

    ref_losses, ref_grads = run(torch.float32)
    losses, grads = run(torch.bfloat16)
    assert losses == pytest.approx(ref_losses, rel=1e-2)
    assert (
        relative_error(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref_grads]))
        < 3e-2
    )


# --- no host syncs inside a pass -----------------------------------------------------------------------


class HostSyncs:
    """Makes every Python-level way of reading a tensor back to the host (or creating one from host data,
    a synchronising copy on CUDA) raise while armed. On a CPU this catches the calls that would sync on
    CUDA; calls inside C++ kernels are not Python-level and need no catching."""

    METHODS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")
    FUNCTIONS = ("tensor", "as_tensor", "bincount", "nonzero", "unique", "masked_select")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.depth = 0
        for name in self.METHODS:
            monkeypatch.setattr(
                torch.Tensor, name, self._guard(getattr(torch.Tensor, name), f"Tensor.{name}")
            )
        for name in self.FUNCTIONS:
            monkeypatch.setattr(torch, name, self._guard(getattr(torch, name), f"torch.{name}"))

    def _guard(self, fn: Callable, name: str) -> Callable:
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if self.depth:
                raise AssertionError(f"host sync inside a pass: {name}")
            return fn(*args, **kwargs)

        return guarded

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def arm_during(
        self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, *, static: bool = False
    ) -> None:
        """Arm while `owner.name` (a method, a static method or a module's function) runs."""
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.armed():
                return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, staticmethod(wrapper) if static else wrapper)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", ["auto", *PATHS])
def test_lora_layers_do_not_sync_in_a_cobatched_pass(path: str, dtype, qwen2_dir, monkeypatch) -> None:
    monkeypatch.setattr(lora.layer, "DENSE_PATH", path)
    engine = make_engine(qwen2_dir, dtype)
    assert not any(isinstance(r, Exception) for r in engine.forward_backward_many(ops(0)))  # layouts planned
    guard = HostSyncs(monkeypatch)
    guard.arm_during(monkeypatch, LoRALinear, "forward")
    guard.arm_during(monkeypatch, lora._LowRankSavingInput, "backward", static=True)
    results = engine.forward_backward_many(ops(0))  # the same shapes: every layer's plan is cached
    assert not any(isinstance(r, Exception) for r in results), results


def test_expert_lora_does_not_sync_in_a_cobatched_pass(moe_dir, monkeypatch) -> None:
    engine = Engine(EngineConfig(device="cpu"))
    for name, r in (("x", 4), ("y", 8)):
        engine.create_run(
            str(moe_dir), {"r": r, "lora_alpha": 16, "target_modules": "all-linear", "seed": r}, run_id=name
        )
    data = [Datum.from_labels([(5 * j + k) % 900 + 3 for j in range(10)]) for k in range(2)]
    batch = [TrainOp("x", data), TrainOp("y", data[:1])]
    for merge in (0.0, float("inf")):  # the low-rank way and the W + ΔW way
        monkeypatch.setattr(lora.experts, "MERGE_EXPERTS_BELOW", merge)
        assert not any(isinstance(r, Exception) for r in engine.forward_backward_many(batch))
    guard = HostSyncs(monkeypatch)
    guard.arm_during(monkeypatch, lora.experts, "_routed_experts")
    guard.arm_during(monkeypatch, LoRALinear, "forward")
    for merge in (0.0, float("inf")):
        monkeypatch.setattr(lora.experts, "MERGE_EXPERTS_BELOW", merge)
        results = engine.forward_backward_many(batch)
        assert not any(isinstance(r, Exception) for r in results), results


def requests(
    prompts: list[list[int]], adapters: list[str | None], max_tokens: int = 6
) -> list[SampleRequest]:
    return [
        SampleRequest(
            prompt=p,
            params=SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, stop=[]),
            adapter=a,
        )
        for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))
    ]


def test_a_decode_forward_without_padding_reads_nothing_back(qwen2_dir, monkeypatch) -> None:
    """Rows of equal prompt length on two adapters and the bare base: each decode forward — the whole
    model, transformers included — runs with nothing read back to the host."""
    engine = make_engine(qwen2_dir, torch.float32)
    base = engine.base_model(str(qwen2_dir))
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    batch = requests(prompts, ["a", "b", None])
    expected = sampler.sample_batch(base, batch)
    guard = HostSyncs(monkeypatch)
    decodes = []
    original = sampler._forward

    def forward(base: Any, *, keep_all_logits: bool, **inputs: Any) -> torch.Tensor:
        if inputs["input_ids"].shape[1] != 1:  # the prefill builds its inputs from the prompts
            return original(base, keep_all_logits=keep_all_logits, **inputs)
        decodes.append(inputs["attention_mask"])
        with guard.armed():
            return original(base, keep_all_logits=keep_all_logits, **inputs)

    monkeypatch.setattr(sampler, "_forward", forward)
    got = sampler.sample_batch(base, batch)
    assert len(decodes) == 5 and all(mask is None for mask in decodes)
    for a, b in zip(got, expected, strict=True):
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
        assert [s.logprobs for s in a.sequences] == [s.logprobs for s in b.sequences]


def test_the_guard_catches_host_syncs(monkeypatch) -> None:
    guard = HostSyncs(monkeypatch)
    t = torch.ones(3)
    syncs = [
        lambda: t.sum().item(),
        lambda: t.tolist(),
        lambda: bool(t.sum() > 0),
        lambda: int(t[0]),
        lambda: t.nonzero(),
        lambda: torch.tensor([1, 2]),
        lambda: torch.bincount(t.long()),
    ]
    with guard.armed():
        for sync in syncs:
            with pytest.raises(AssertionError, match="host sync"):
                sync()
    assert t.tolist() == [1.0, 1.0, 1.0]  # disarmed: as before


def test_a_padded_decode_forward_still_reads_its_mask_back(qwen2_dir, monkeypatch) -> None:
    """The one sync left in a decode forward: with left-padded rows transformers checks on the host
    whether the mask is all ones (`masking_utils.fast_all`) before building the 4-D mask."""
    engine = make_engine(qwen2_dir, torch.float32)
    base = engine.base_model(str(qwen2_dir))
    guard = HostSyncs(monkeypatch)
    original = sampler._forward

    def forward(base: Any, *, keep_all_logits: bool, **inputs: Any) -> torch.Tensor:
        if inputs["input_ids"].shape[1] != 1:
            return original(base, keep_all_logits=keep_all_logits, **inputs)
        with guard.armed():
            return original(base, keep_all_logits=keep_all_logits, **inputs)

    monkeypatch.setattr(sampler, "_forward", forward)
    with pytest.raises(ComputeError, match="host sync"):
        sampler.sample_batch(base, requests([[5, 6, 7], [8, 9, 10, 11]], ["a", None]))


def test_host_known_attention_columns_match_the_mask(qwen2_dir, monkeypatch) -> None:
    """The batcher knows on the host how many columns each row attends to (for `_trim` and for dropping
    an all-ones mask); check that against the device mask through staggered joins and finishes."""
    engine = make_engine(qwen2_dir, torch.float32)
    base = engine.base_model(str(qwen2_dir))
    checked = []
    original_mask, original_trim = sampler._padding_mask, batcher._trim

    def padding_mask(rows, attention_mask, pending):
        assert attention_mask.sum(dim=1).tolist() == [sampler._attended_columns(r, pending) for r in rows]
        checked.append(pending)
        return original_mask(rows, attention_mask, pending)

    def trim(batch):
        mask = batch.attention_mask
        assert mask.sum(dim=1).tolist() == [sampler._attended_columns(r, 0) for r in batch.rows]
        used = mask.any(dim=0)
        start = int(used.int().argmax()) if used.any() else 0
        original_trim(batch)
        assert batch.attention_mask.shape[1] == mask.shape[1] - start  # what reading the mask would cut
        checked.append("trim")

    monkeypatch.setattr(sampler, "_padding_mask", padding_mask)
    monkeypatch.setattr(batcher, "_trim", trim)
    engine_batcher = batcher.ContinuousBatcher(base, sampler.SamplerLimits(max_rows=3))
    outcomes: list[Any] = []
    lengths = [3, 9, 5, 12, 4, 7]
    prompts = [[(11 * k + j) % 900 + 3 for j in range(n)] for k, n in enumerate(lengths)]
    for k, prompt in enumerate(prompts):  # different lengths and budgets; at most 3 rows run at once
        engine_batcher.add(
            requests([prompt], [("a", "b", None)[k % 3]], max_tokens=2 + 3 * (k % 3)), outcomes.append
        )
    while engine_batcher.has_work:
        engine_batcher.step()
    assert len(outcomes) == len(prompts) and not any(isinstance(o, Exception) for o in outcomes)
    assert {0, 1, "trim"} <= set(checked)


def test_one_read_back_carries_exact_tokens_and_logprobs() -> None:
    tokens = torch.tensor([0, 151_935, 2**31 - 1])
    logprobs = torch.tensor([-0.1, -12.345678, -1e-7], dtype=torch.float32)
    got_tokens, got_logprobs = sampler._to_host(tokens, logprobs)
    assert [int(t) for t in got_tokens] == tokens.tolist()
    assert got_logprobs == logprobs.tolist()


# --- what reaches SDPA -----------------------------------------------------------------------------------


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[dict[str, Any]]:
    """Every `scaled_dot_product_attention` call: its mask, causality, dtype and the CPU's chosen kernel."""
    calls: list[dict[str, Any]] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        choice = torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal, **kwargs)
        calls.append(
            {
                "mask": None if attn_mask is None else attn_mask.dtype,
                "is_causal": is_causal,
                "dtype": query.dtype,
                "queries": query.shape[-2],
                "backend": SDPBackend(choice),
            }
        )
        return original(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs
        )

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_padded_cobatched_training_pass_gives_sdpa_no_mask(dtype, qwen2_dir, sdpa_calls) -> None:
    """Rows of 7..16 tokens, right-padded to one width, three adapters: causal SDPA with no mask (flash on
    CUDA, and the CPU's flash kernel here), in the base dtype."""
    engine = make_engine(qwen2_dir, dtype)
    results = engine.forward_backward_many(ops(2))
    assert not any(isinstance(r, Exception) for r in results), results
    assert sdpa_calls
    for call in sdpa_calls:
        assert call["mask"] is None and call["is_causal"] is True and call["dtype"] == dtype
        assert call["backend"] == SDPBackend.FLASH_ATTENTION


def test_sampling_gives_sdpa_a_mask_only_with_left_padding(qwen2_dir, sdpa_calls) -> None:
    engine = make_engine(qwen2_dir, torch.float32)
    base = engine.base_model(str(qwen2_dir))
    sampler.sample_batch(base, requests([[5, 6, 7], [8, 9, 10]], ["a", "b"], max_tokens=3))
    assert sdpa_calls and all(c["mask"] is None for c in sdpa_calls)
    prefill = [c for c in sdpa_calls if c["queries"] > 1]
    assert prefill and all(c["is_causal"] for c in prefill)
    sdpa_calls.clear()
    sampler.sample_batch(base, requests([[5, 6, 7], [8, 9, 10, 11, 12]], ["a", "b"], max_tokens=3))
    assert sdpa_calls and all(c["mask"] == torch.bool and not c["is_causal"] for c in sdpa_calls)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_models_load_with_sdpa_attention(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    base = load_base_model(str(tiny_model_dirs[family]), device="cpu")
    assert base.model.config._attn_implementation == "sdpa"
