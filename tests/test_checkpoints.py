"""Checkpoints: PEFT-compatible, bit-exact, atomic, and strict about what they load.

Behaviour as specification:
- a saved run is a PEFT adapter directory that `PeftModel.from_pretrained` loads unchanged, with the
  engine's logits; an adapter PEFT itself saved loads into a run with PEFT's logits;
- save → load round-trips weights, optimizer state and step bit for bit, and training resumed from a
  checkpoint (in a new engine) ends bit-identical to training straight through;
- only JSON and safetensors are written; a save that fails leaves nothing under the final name;
- a checkpoint that does not fit a run is refused and the run is untouched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from eztinker.engine import (
    AdamParams,
    ConflictError,
    Datum,
    Engine,
    EngineConfig,
    InvalidInputError,
    NotFoundError,
    checkpoint,
)
from eztinker.engine.checkpoint import disk
from eztinker.engine.lora import Segment, routed
from eztinker.engine.run import TrainingRun

# Changing hyperparameters from step to step, as an RL loop does: the resumed run must follow them.
SCHEDULE = [
    AdamParams(learning_rate=3e-2),
    AdamParams(learning_rate=1e-2, weight_decay=0.01),
    AdamParams(learning_rate=5e-2, grad_clip_norm=1.0),
    AdamParams(learning_rate=2e-2),
    AdamParams(learning_rate=4e-3, weight_decay=0.1),
    AdamParams(learning_rate=6e-2, beta1=0.8, beta2=0.99),
]
DATA = [
    Datum.from_labels([5, 17, 300, 42, 8, 999, 64]),
    Datum.from_labels([11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]),
    Datum.from_labels([700, 3, 800, 4, 900], weights=[1.0, 0.5, 2.0, 1.0, 0.0]),
]
INPUT_IDS = torch.tensor([[5, 17, 300, 42, 8, 999, 64, 3], [100, 200, 300, 400, 500, 600, 700, 800]])


def new_engine() -> Engine:
    return Engine(EngineConfig(device="cpu", dtype=torch.float32))


def run_of(engine: Engine, run_id: str) -> TrainingRun:
    return engine._run(run_id)


def train(engine: Engine, run_id: str, steps: range) -> None:
    for i in steps:
        engine.forward_backward(run_id, DATA)
        engine.optim_step(run_id, SCHEDULE[i])


def snapshot(run: TrainingRun) -> dict:
    """Everything about a run's training state, cloned."""
    named = checkpoint._named_params(run)
    return {
        "step": run.step,
        "pending": run.pending_grad_ops,
        "weights": {k: p.detach().clone() for k, p in named.items()},
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in named.items()},
        "optimizer": {
            k: {s: v.clone() for s, v in run.optimizer.state[p].items()}
            for k, p in named.items()
            if p in run.optimizer.state
        },
    }


def assert_identical(a: dict, b: dict) -> None:
    """Bit-identical training states (tensor values, dtypes and devices)."""
    assert a["step"] == b["step"]
    assert a["pending"] == b["pending"]
    assert a["weights"].keys() == b["weights"].keys()
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key
        ga, gb = a["grads"][key], b["grads"][key]
        assert (ga is None) == (gb is None), key
        assert ga is None or torch.equal(ga, gb), key
    assert a["optimizer"].keys() == b["optimizer"].keys()
    for key, state in a["optimizer"].items():
        assert state.keys() == b["optimizer"][key].keys(), key
        for stat, value in state.items():
            other = b["optimizer"][key][stat]
            assert value.dtype == other.dtype and value.device == other.device and value.shape == other.shape
            assert torch.equal(value, other), (key, stat)


def engine_logits(engine: Engine, run_id: str, input_ids: torch.Tensor = INPUT_IDS) -> torch.Tensor:
    """The engine's own logits for the run: its base model under the run's routing."""
    base = run_of(engine, run_id).base
    with torch.no_grad(), base.lock, routed(base.routing, [Segment(run_id, 0, input_ids.shape[0])]):
        return base.model(input_ids=input_ids).logits


def hf_logits(model: torch.nn.Module, input_ids: torch.Tensor = INPUT_IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def load_hf(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def peft_saved_adapter(model_dir: Path, out: Path, **lora_kwargs) -> tuple[Path, torch.Tensor]:
    """An adapter made and saved by PEFT itself (random A and B), and PEFT's logits with it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    kwargs: dict[str, Any] = {
        "r": 4,
        "lora_alpha": 8,
        "init_lora_weights": False,
        "task_type": "CAUSAL_LM",
        **lora_kwargs,
    }
    model = get_peft_model(load_hf(model_dir), LoraConfig(**kwargs))
    model.save_pretrained(str(out))
    return out, hf_logits(model)


@pytest.fixture(scope="module")
def qwen2_dir(tiny_model_dirs: dict[str, Path]) -> str:
    return str(tiny_model_dirs["qwen2"])


# --- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_state_round_trip_is_bit_exact(family: str, tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    model_dir = str(tiny_model_dirs[family])
    engine = new_engine()
    run_id = engine.create_run(model_dir, {"r": 4, "seed": 1}).run_id
    train(engine, run_id, range(3))
    before = snapshot(run_of(engine, run_id))

    info = engine.save_state(run_id, tmp_path / "ckpt")
    assert info.kind == "state" and info.step == 3 and info.base_model == model_dir
    assert info.optimizer_path == tmp_path / "ckpt" / "optimizer.safetensors"
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "eztinker.json",
        "optimizer.safetensors",
    ]
    assert info.size_bytes == sum(p.stat().st_size for p in (tmp_path / "ckpt").iterdir())
    assert_identical(before, snapshot(run_of(engine, run_id)))  # saving changes nothing

    # PEFT's format: keys, config.
    config = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["bias"]) == (4, 16, "none")
    assert config["fan_in_fan_out"] is (family == "gpt2")
    assert config["base_model_name_or_path"] == model_dir
    assert sorted(config["target_modules"]) == run_of(engine, run_id).target_modules
    keys = load_file(tmp_path / "ckpt" / "adapter_model.safetensors").keys()
    assert {k for k in keys} == {
        f"base_model.model.{path}.lora_{x}.weight" for path in run_of(engine, run_id).slots for x in "AB"
    }
    meta = json.loads((tmp_path / "ckpt" / "eztinker.json").read_text())
    assert meta["format_version"] == checkpoint.FORMAT_VERSION
    assert (meta["kind"], meta["step"], meta["base_model"]) == ("state", 3, model_dir)
    assert meta["lora_config"]["r"] == 4 and meta["loss_config"] == {"loss_type": "cross_entropy"}

    # Into a fresh run of a new engine (different seed: every value must come from the checkpoint).
    other = new_engine()
    fresh = other.create_run(model_dir, {"r": 4, "seed": 2}).run_id
    assert other.load_state(fresh, tmp_path / "ckpt").step == 3
    restored = snapshot(run_of(other, fresh))
    assert_identical(before, restored)
    step = restored["optimizer"][next(iter(restored["optimizer"]))]["step"]
    assert step.dtype == torch.float32 and step.device.type == "cpu" and step.shape == ()

    # And through create_run(adapter_path=...).
    third = other.create_run(model_dir, adapter_path=tmp_path / "ckpt").run_id
    assert_identical(before, snapshot(run_of(other, third)))
    assert run_of(other, third).lora_config == run_of(engine, run_id).lora_config


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_resumed_training_is_bit_identical_to_straight_through(
    family: str, tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model_dir = str(tiny_model_dirs[family])
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "seed": 7}

    straight = new_engine()
    run_id = straight.create_run(model_dir, lora).run_id
    train(straight, run_id, range(6))
    expected = snapshot(run_of(straight, run_id))

    first = new_engine()
    half = first.create_run(model_dir, lora).run_id
    train(first, half, range(3))
    first.save_state(half, tmp_path / "step-3")
    del first

    # load_state into a freshly created run with the same LoRA config, in a new engine...
    second = new_engine()
    resumed = second.create_run(model_dir, {**lora, "seed": 99}).run_id
    second.load_state(resumed, tmp_path / "step-3")
    train(second, resumed, range(3, 6))
    assert_identical(expected, snapshot(run_of(second, resumed)))

    # ... and a run created from the checkpoint directory.
    third = new_engine()
    from_dir = third.create_run(model_dir, adapter_path=tmp_path / "step-3").run_id
    assert third.run_info(from_dir).step == 3
    train(third, from_dir, range(3, 6))
    assert_identical(expected, snapshot(run_of(third, from_dir)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused CUDA AdamW kernel needs a GPU")
def test_training_resumed_on_cuda_is_identical_to_straight_through(qwen2_dir: str, tmp_path: Path) -> None:
    """A restored state keeps `step` on the CPU (the run's unfused optimizer's place for it); the fused
    CUDA update reads it on the device, so it must move there before the step."""
    lora = {"r": 4, "lora_alpha": 8, "seed": 7}
    straight = Engine(EngineConfig(device="cuda", dtype=torch.float32))
    run_id = straight.create_run(qwen2_dir, lora).run_id
    train(straight, run_id, range(4))
    straight.save_state(run_id, tmp_path / "step-4")
    train(straight, run_id, range(4, 6))

    resumed = Engine(EngineConfig(device="cuda", dtype=torch.float32))
    from_dir = resumed.create_run(qwen2_dir, adapter_path=tmp_path / "step-4").run_id
    train(resumed, from_dir, range(4, 6))
    assert_identical(snapshot(run_of(straight, run_id)), snapshot(run_of(resumed, from_dir)))


def test_loaded_checkpoint_is_not_aliased_by_the_run(qwen2_dir: str, tmp_path: Path) -> None:
    """Training after a restore must not write into the LoadedCheckpoint (it may be restored again)."""
    engine = new_engine()
    run_id = engine.create_run(qwen2_dir, {"r": 4, "seed": 0}).run_id
    train(engine, run_id, range(2))
    engine.save_state(run_id, tmp_path / "ckpt")
    loaded = checkpoint.read_checkpoint(tmp_path / "ckpt")
    kept = {k: (a.clone(), b.clone()) for k, (a, b) in loaded.tensors.items()}
    kept_opt = {k: {s: v.clone() for s, v in st.items()} for k, st in (loaded.optimizer or {}).items()}
    checkpoint.restore_into_run(run_of(engine, run_id), loaded, with_optimizer=True)
    train(engine, run_id, range(2, 4))
    for k, (a, b) in kept.items():
        assert torch.equal(a, loaded.tensors[k][0]) and torch.equal(b, loaded.tensors[k][1])
    for k, st in kept_opt.items():
        for s, v in st.items():
            assert torch.equal(v, (loaded.optimizer or {})[k][s])


def test_prepared_checkpoint_is_a_snapshot(qwen2_dir: str, tmp_path: Path) -> None:
    """prepare (under the lock) then write (without it): training in between does not leak in."""
    engine = new_engine()
    run_id = engine.create_run(qwen2_dir, {"r": 4, "seed": 0}).run_id
    train(engine, run_id, range(2))
    before = snapshot(run_of(engine, run_id))
    prepared = checkpoint.prepare_checkpoint(run_of(engine, run_id), kind="state")
    train(engine, run_id, range(2, 4))
    assert checkpoint.write_checkpoint(tmp_path / "ckpt", prepared).step == 2
    other = new_engine()
    restored = other.create_run(qwen2_dir, adapter_path=tmp_path / "ckpt").run_id
    assert_identical(before, snapshot(run_of(other, restored)))


# --- PEFT compatibility ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "phi", "phi3", "llama"])
def test_peft_loads_a_saved_run_with_equal_logits(
    family: str, tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from peft import PeftModel

    model_dir = tiny_model_dirs[family]
    engine = new_engine()
    run_id = engine.create_run(str(model_dir), {"r": 4, "lora_alpha": 12, "seed": 0}).run_id
    train(engine, run_id, range(2))  # B != 0: the adapter changes the logits
    ours = engine_logits(engine, run_id)
    engine.save_weights(run_id, tmp_path / "adapter")

    peft_model = PeftModel.from_pretrained(load_hf(model_dir), str(tmp_path / "adapter"))
    theirs = hf_logits(peft_model)
    bare = hf_logits(load_hf(model_dir))
    assert (ours - bare).abs().max() > 1e-3  # not vacuous
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # PEFT adapted exactly the run's layers, with the saved values.
    lora_modules = {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
    }
    assert lora_modules == set(run_of(engine, run_id).slots)
    # And the engine's own forward agrees with PEFT's logits on log-probabilities.
    datum = Datum.from_labels(INPUT_IDS[0].tolist())
    logprobs = engine.forward(run_id, [datum]).logprobs[0]
    peft_lp = torch.log_softmax(theirs[0, :-1], -1).gather(-1, INPUT_IDS[0, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, peft_lp, atol=1e-5, rtol=0)


def test_peft_loads_a_run_on_a_subset_of_layers(qwen2_dir: str, tmp_path: Path) -> None:
    """A run on one layer's q_proj must not make PEFT adapt every q_proj: full paths are saved."""
    from peft import PeftModel

    engine = new_engine()
    run_id = engine.create_run(
        qwen2_dir, {"r": 2, "target_modules": ["model.layers.1.self_attn.q_proj"]}
    ).run_id
    train(engine, run_id, range(2))
    engine.save_weights(run_id, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    peft_model = PeftModel.from_pretrained(load_hf(Path(qwen2_dir)), str(tmp_path / "adapter"))
    assert [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")] == [
        "base_model.model.model.layers.1.self_attn.q_proj"
    ]
    torch.testing.assert_close(hf_logits(peft_model), engine_logits(engine, run_id), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("family", "lora_kwargs", "expected_targets"),
    [
        ("qwen2", {"target_modules": ["q_proj", "v_proj"]}, ["q_proj", "v_proj"]),
        ("gpt2", {"target_modules": "all-linear", "use_rslora": True, "fan_in_fan_out": True}, None),
        ("llama", {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1]}, None),
        ("phi3", {"target_modules": r".*layers\.0\..*qkv_proj"}, ["model.layers.0.self_attn.qkv_proj"]),
        ("phi", {"target_modules": ["dense", "fc2"], "lora_dropout": 0.1}, ["dense", "fc2"]),
    ],
)
def test_run_from_a_peft_saved_adapter_gives_peft_logits(
    family: str,
    lora_kwargs: dict,
    expected_targets: list[str] | None,
    tiny_model_dirs: dict[str, Path],
    tmp_path: Path,
) -> None:
    model_dir = tiny_model_dirs[family]
    adapter, peft_logits = peft_saved_adapter(model_dir, tmp_path / "peft", **lora_kwargs)

    loaded = checkpoint.read_checkpoint(adapter)
    assert loaded.kind == "weights" and loaded.step == 0 and loaded.optimizer is None
    assert all(not p.startswith("base_model.") for p in loaded.tensors)
    if expected_targets is not None:
        assert loaded.lora_config.target_modules == expected_targets
    if lora_kwargs.get("use_rslora"):
        assert loaded.lora_config.lora_alpha == pytest.approx(8 * 2.0)  # alpha·sqrt(r), r = 4

    engine = new_engine()
    run_id = engine.create_run(str(model_dir), adapter_path=adapter).run_id
    run = run_of(engine, run_id)
    assert set(run.slots) == set(loaded.tensors)
    assert run.step == 0 and not run.optimizer.state
    torch.testing.assert_close(engine_logits(engine, run_id), peft_logits, atol=1e-5, rtol=0)
    train(engine, run_id, range(1))  # and it trains


# --- weights-only checkpoints and file formats -------------------------------------------------------


def test_weights_only_checkpoint_has_no_optimizer_and_clears_it(qwen2_dir: str, tmp_path: Path) -> None:
    engine = new_engine()
    source = engine.create_run(qwen2_dir, {"r": 4, "seed": 0}).run_id
    train(engine, source, range(2))
    info = engine.save_weights(source, tmp_path / "w")
    assert info.kind == "weights" and info.optimizer_path is None and info.step == 2
    assert not (tmp_path / "w" / "optimizer.safetensors").exists()
    assert json.loads((tmp_path / "w" / "eztinker.json").read_text())["kind"] == "weights"
    loaded = checkpoint.read_checkpoint(tmp_path / "w")
    assert loaded.kind == "weights" and loaded.optimizer is None and loaded.step == 2

    target = engine.create_run(qwen2_dir, {"r": 4, "seed": 5}).run_id
    train(engine, target, range(1))
    engine.forward_backward(target, DATA)  # pending gradients are dropped by a load
    engine.load_state(target, tmp_path / "w")
    run = run_of(engine, target)
    assert not run.optimizer.state and run.pending_grad_ops == 0 and run.step == 2
    assert all(p.grad is None for p in run.params)
    expected = snapshot(run_of(engine, source))["weights"]
    for key, value in snapshot(run)["weights"].items():
        assert torch.equal(value, expected[key])

    from_dir = engine.create_run(qwen2_dir, adapter_path=tmp_path / "w").run_id
    assert not run_of(engine, from_dir).optimizer.state

    # A state checkpoint loaded without its optimizer also starts AdamW afresh.
    engine.save_state(source, tmp_path / "s")
    engine.load_state(target, tmp_path / "s", with_optimizer=False)
    assert not run_of(engine, target).optimizer.state


def test_checkpoint_directory_holds_no_pickle(qwen2_dir: str, tmp_path: Path) -> None:
    engine = new_engine()
    run_id = engine.create_run(qwen2_dir, {"r": 4}).run_id
    train(engine, run_id, range(1))
    engine.save_state(run_id, tmp_path / "ckpt")
    for file in (tmp_path / "ckpt").rglob("*"):
        assert file.suffix in {".json", ".safetensors"}, file
        head = file.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{file} looks like a pickle or torch.save zip"
        if file.suffix == ".json":
            json.loads(file.read_text())
        else:
            load_file(file)


# --- atomicity ---------------------------------------------------------------------------------------


def _fail_mid_write(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"half a file")
    raise OSError("No space left on device")


@pytest.mark.parametrize("where", ["save_file", "rename", "optimizer"])
def test_a_crash_mid_save_leaves_nothing_under_the_final_name(
    where: str, qwen2_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = new_engine()
    run_id = engine.create_run(qwen2_dir, {"r": 4}).run_id
    train(engine, run_id, range(1))
    engine.forward_backward(run_id, DATA)
    before = snapshot(run_of(engine, run_id))
    root = tmp_path / "ckpts"
    if where == "save_file":
        monkeypatch.setattr(disk, "save_file", _fail_mid_write)
    elif where == "optimizer":  # the adapter file is written, the optimizer file is not
        real = disk.save_file

        def fail_second(tensors, filename, metadata=None):
            if Path(filename).name == checkpoint.OPTIMIZER_FILE:
                _fail_mid_write(tensors, filename, metadata)
            real(tensors, filename, metadata=metadata)

        monkeypatch.setattr(disk, "save_file", fail_second)
    else:

        def no_rename(src, dst):
            raise OSError("I/O error")

        monkeypatch.setattr(disk.os, "rename", no_rename)

    with pytest.raises(OSError):
        engine.save_state(run_id, root / "ckpt")
    monkeypatch.undo()
    assert not (root / "ckpt").exists()
    assert list(root.iterdir()) == []  # the temporary directory was cleaned up
    assert checkpoint.list_checkpoints(root) == []
    assert_identical(before, snapshot(run_of(engine, run_id)))
    # The name is still free.
    assert engine.save_state(run_id, root / "ckpt").step == 1


def test_leftovers_of_a_killed_save_are_ignored_and_removable(
    qwen2_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process killed mid-save cannot clean up: its hidden temp dir must never count as a checkpoint."""
    engine = new_engine()
    run_id = engine.create_run(qwen2_dir, {"r": 4}).run_id
    monkeypatch.setattr(disk.shutil, "rmtree", lambda *a, **k: None)  # "killed": no cleanup runs
    monkeypatch.setattr(disk, "save_file", _fail_mid_write)
    with pytest.raises(OSError):
        engine.save_state(run_id, tmp_path / "ckpt")
    monkeypatch.undo()
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and checkpoint.is_temp_name(leftovers[0].name)
    assert not (tmp_path / "ckpt").exists()
    assert checkpoint.list_checkpoints(tmp_path) == []
    engine.save_weights(run_id, tmp_path / "ckpt")
    assert [i.path.name for i in checkpoint.list_checkpoints(tmp_path)] == ["ckpt"]
    assert checkpoint.remove_stale_temp_dirs(tmp_path) == leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_an_existing_name_is_a_conflict(qwen2_dir: str, tmp_path: Path) -> None:
    engine = new_engine()
    run_id = engine.create_run(qwen2_dir, {"r": 4}).run_id
    engine.save_state(run_id, tmp_path / "ckpt")
    original = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    train(engine, run_id, range(1))
    with pytest.raises(ConflictError, match="ckpt"):
        engine.save_state(run_id, tmp_path / "ckpt")
    with pytest.raises(ConflictError, match="ckpt"):
        engine.save_weights(run_id, tmp_path / "ckpt")
    (tmp_path / "file").write_text("not a checkpoint")
    with pytest.raises(ConflictError, match="file"):
        engine.save_weights(run_id, tmp_path / "file")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "file"]


# --- refusing what does not fit ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("saved_config", "run_config", "message"),
    [
        ({"r": 4}, {"r": 8}, "shape"),  # another rank
        ({"r": 4}, {"r": 4, "target_modules": ["q_proj", "v_proj"]}, "which the run does not adapt"),
        ({"r": 4, "target_modules": ["q_proj", "v_proj"]}, {"r": 4}, "no adapter for layer"),
        ({"r": 4}, {"r": 4, "lora_alpha": 32}, "scaling"),
    ],
)
def test_a_checkpoint_that_does_not_fit_leaves_the_run_untouched(
    saved_config: dict, run_config: dict, message: str, qwen2_dir: str, tmp_path: Path
) -> None:
    engine = new_engine()
    source = engine.create_run(qwen2_dir, {**saved_config, "seed": 0}).run_id
    train(engine, source, range(1))
    engine.save_state(source, tmp_path / "ckpt")

    target = engine.create_run(qwen2_dir, {**run_config, "seed": 3}).run_id
    train(engine, target, range(2))
    engine.forward_backward(target, DATA)  # pending gradients must survive the refused load
    before = snapshot(run_of(engine, target))
    with pytest.raises(InvalidInputError, match=message) as excinfo:
        engine.load_state(target, tmp_path / "ckpt")
    assert excinfo.value.field == "path"
    assert_identical(before, snapshot(run_of(engine, target)))


def test_missing_and_foreign_directories(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        checkpoint.read_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match=r"adapter_config\.json") as excinfo:
        checkpoint.read_checkpoint(tmp_path / "empty")
    assert excinfo.value.field == "adapter_path"
    with pytest.raises(NotFoundError):
        Engine().create_run("unused", adapter_path=tmp_path / "nothing")  # refused before any model load


@pytest.fixture(scope="module")
def peft_adapter(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("peft-adapter") / "adapter"
    return peft_saved_adapter(tiny_model_dirs["qwen2"], out, target_modules=["q_proj", "v_proj"])[0]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("peft_type", "IA3", "only LoRA"),
        ("use_dora", True, "DoRA"),
        ("rank_pattern", {"q_proj": 8}, "rank_pattern"),
        ("alpha_pattern", {"q_proj": 32}, "alpha_pattern"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("bias", "lora_only", "bias"),
        ("lora_bias", True, "lora_bias"),
        ("init_lora_weights", "pissa", "pissa"),
        ("r", 8, "rank 4"),
    ],
)
def test_unsupported_peft_features_are_refused(
    key: str, value: object, message: str, peft_adapter: Path, tmp_path: Path
) -> None:
    adapter = Path(shutil.copytree(peft_adapter, tmp_path / "adapter"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config[key] = value
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match=message) as excinfo:
        checkpoint.read_checkpoint(adapter)
    assert excinfo.value.field == "adapter_path"


def test_non_lora_tensors_are_refused(peft_adapter: Path, tmp_path: Path) -> None:
    adapter = Path(shutil.copytree(peft_adapter, tmp_path / "adapter"))
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key.replace(".weight", ".bias")] = torch.zeros(tensors[key].shape[0])
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(InvalidInputError, match="not a plain LoRA weight"):
        checkpoint.read_checkpoint(adapter)


# --- listing and deleting ----------------------------------------------------------------------------


def test_list_and_delete(qwen2_dir: str, tmp_path: Path, peft_adapter: Path) -> None:
    engine = new_engine()
    run_id = engine.create_run(qwen2_dir, {"r": 4}).run_id
    root = tmp_path / "ckpts"
    engine.save_weights(run_id, root / "a-weights")
    train(engine, run_id, range(1))
    engine.save_state(run_id, root / "b-state")
    shutil.copytree(peft_adapter, root / "c-peft")
    (root / "not-a-checkpoint").mkdir()
    (root / ".b-state.eztinker-tmp-0123456789ab").mkdir()

    infos = checkpoint.list_checkpoints(root)
    by_name = {i.path.name: i for i in infos}
    assert set(by_name) == {"a-weights", "b-state", "c-peft"}
    assert (by_name["a-weights"].kind, by_name["a-weights"].step) == ("weights", 0)
    assert (by_name["b-state"].kind, by_name["b-state"].step) == ("state", 1)
    assert by_name["b-state"].optimizer_path == root / "b-state" / "optimizer.safetensors"
    assert (by_name["c-peft"].kind, by_name["c-peft"].step, by_name["c-peft"].optimizer_path) == (
        "weights",
        0,
        None,
    )
    assert by_name["b-state"].base_model == qwen2_dir
    for info in infos:
        assert info.size_bytes == sum(p.stat().st_size for p in info.path.iterdir())
    assert checkpoint.list_checkpoints(tmp_path / "absent") == []

    checkpoint.delete_checkpoint(root / "b-state")
    assert not (root / "b-state").exists()
    assert sorted(i.path.name for i in checkpoint.list_checkpoints(root)) == ["a-weights", "c-peft"]
    assert not any(checkpoint.is_temp_name(p.name) and "del" in p.name for p in root.iterdir())
    with pytest.raises(NotFoundError):
        checkpoint.delete_checkpoint(root / "b-state")
    with pytest.raises(InvalidInputError):
        checkpoint.delete_checkpoint(root / "not-a-checkpoint")
    assert (root / "not-a-checkpoint").is_dir()


def test_legacy_bin_adapter_is_read_with_weights_only(peft_adapter: Path, tmp_path: Path) -> None:
    """PEFT < 0.7 saved adapter_model.bin: it is read with torch.load(weights_only=True), never unpickled freely."""
    adapter = Path(shutil.copytree(peft_adapter, tmp_path / "adapter"))
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")
    loaded = checkpoint.read_checkpoint(adapter)
    expected = checkpoint.read_checkpoint(peft_adapter)
    assert loaded.tensors.keys() == expected.tensors.keys()
    for key, (a, b) in loaded.tensors.items():
        assert torch.equal(a, expected.tensors[key][0]) and torch.equal(b, expected.tensors[key][1])
