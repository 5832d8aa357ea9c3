"""The architectures of Tinker's catalogue: MoE with fused experts, hybrid linear attention, MLA, vision.

For each family (tiny random models built offline, `eztinker.testing.TINY_CATALOGUE_FAMILIES`):
- the engine knows which layers are attention, linear attention, MLP, experts, routers, unembedding;
- loss and gradients equal a PEFT reference (`get_peft_model` with `target_modules` / `target_parameters`);
- two runs of different ranks co-batched in one pass equal each run alone;
- the continuous batcher (rows joining and leaving at every step) samples what a request samples alone,
  with the log-probabilities training computes;
- a saved adapter loads in `peft.PeftModel` with equal log-probabilities, and a PEFT-saved one in the engine.
And Qwen3-VL trains and samples with images, refusing bad ones by name.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from eztinker.engine import Datum, Engine, InvalidInputError, SamplingParams, TrainOp, lora, vision
from eztinker.engine.batcher import ContinuousBatcher
from eztinker.engine.families import DEFAULT_KINDS
from eztinker.engine.lora import ExpertWeight
from eztinker.engine.sampler import SampleRequest
from eztinker.engine.types import ImageChunk
from eztinker.testing import TINY_CATALOGUE_FAMILIES, make_tiny_model

FAMILIES = TINY_CATALOGUE_FAMILIES

KINDS = {
    "qwen3_moe": {"attention", "experts", "unembed"},
    "qwen3_5": {"attention", "linear_attention", "mlp", "unembed"},
    "qwen3_5_moe": {"attention", "linear_attention", "mlp", "experts", "router", "unembed"},
    "gpt_oss": {"attention", "experts", "unembed"},
    "deepseek_v3": {"attention", "mlp", "experts", "unembed"},
    "qwen3_vl": {"attention", "mlp", "unembed"},
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> dict[str, Path]:
    return {
        family: make_tiny_model(
            tmp_path_factory.mktemp(f"tiny-{family}"), family, num_layers=2, tokenizer_dir=tiny_tokenizer_dir
        )
        for family in FAMILIES
    }


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine()


def new_run(engine: Engine, model_dir: Path, r: int, seed: int, **lora) -> str:
    """A run whose B is random (so every gradient is exercised), not zero."""
    run_id = engine.create_run(str(model_dir), {"r": r, "lora_alpha": 2 * r, "seed": seed, **lora}).run_id
    run = engine._run(run_id)
    generator = torch.Generator().manual_seed(seed)
    for path in sorted(run.slots):
        run.slots[path].lora_B.data.normal_(0, 0.1, generator=generator)
    return run_id


def sequences(seed: int, lengths=(12, 7, 16)) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (n,), generator=generator).tolist() for n in lengths]


def token_data(seqs: list[list[int]]) -> list[Datum]:
    return [Datum.from_targets(s[:-1], s[1:]) for s in seqs]


def hf_model(model_dir: Path, family: str) -> torch.nn.Module:
    auto = AutoModelForImageTextToText if family == "qwen3_vl" else AutoModelForCausalLM
    attn = "eager" if family == "gpt_oss" else "sdpa"
    return auto.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).eval()


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).norm() / theirs.norm().clamp(min=1e-12))


def summed_target_logprobs(
    logits: torch.Tensor, seqs: list[list[int]]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Σ log p(target) and per-row log-probs from (B, T, V) logits of right-padded rows s[:-1]."""
    total, rows = logits.new_zeros(()), []
    for b, s in enumerate(seqs):
        lp = torch.log_softmax(logits[b, : len(s) - 1].float(), -1)
        picked = lp.gather(-1, torch.tensor(s[1:])[:, None]).squeeze(-1)
        total = total + picked.sum()
        rows.append(picked.detach())
    return total, rows


def padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) - 1 for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s) - 1] = torch.tensor(s[:-1])
        mask[b, : len(s) - 1] = 1
    return ids, mask


# PEFT (0.21, transformers 5) reads target_modules named gate_proj / up_proj / down_proj on these families as
# transformers-v4 expert names and retargets them onto the fused experts: name those linear layers' weights.
_V4_RENAMED = {
    "deepseek_v3": {"gate_proj", "up_proj", "down_proj"},
    "qwen3_moe": {"gate_proj", "up_proj", "down_proj"},
}


def peft_reference(engine: Engine, run_id: str, model_dir: Path, family: str) -> torch.nn.Module:
    """A PEFT model adapting the run's layers (target_modules for linear layers, target_parameters for
    fused expert weights), with the run's A and B copied in by walking PEFT's own modules."""
    run = engine._run(run_id)
    layers = run.base.lora_layers
    experts = sorted(p for p in run.slots if isinstance(layers[p], ExpertWeight))
    linear = sorted(p for p in run.slots if p not in experts)
    renamed = [p for p in linear if p.rsplit(".", 1)[-1] in _V4_RENAMED.get(family, set())]
    config = LoraConfig(
        r=run.lora_config.r,
        lora_alpha=run.lora_config.lora_alpha,
        target_modules=[p for p in linear if p not in renamed] or None,
        target_parameters=experts + [f"{p}.weight" for p in renamed],
    )
    model = get_peft_model(hf_model(model_dir, family), config)
    copied = set()
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        path = name.removeprefix("base_model.model.").replace(".base_layer", "")
        parameter = getattr(module, "parameter_name", None)
        slot_path = path if parameter in (None, "weight") else f"{path}.{parameter}"
        slot = run.slots[slot_path]
        module.lora_A["default"].weight.data.copy_(slot.lora_A.data)
        module.lora_B["default"].weight.data.copy_(slot.lora_B.data)
        copied.add(slot_path)
    assert copied == set(run.slots)
    return model


def peft_grads(model: torch.nn.Module, run) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    grads = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            path = name.removeprefix("base_model.model.").replace(".base_layer", "")
            parameter = getattr(module, "parameter_name", None)
            slot_path = path if parameter in (None, "weight") else f"{path}.{parameter}"
            grads[slot_path] = (module.lora_A["default"].weight.grad, module.lora_B["default"].weight.grad)
    return grads


# --- structure ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_kinds_and_defaults(family: str, family_dirs, engine: Engine) -> None:
    kinds = engine.layer_kinds(str(family_dirs[family]))
    assert set(kinds.values()) == KINDS[family]
    assert not any("visual" in path for path in kinds)  # a vision tower is never adapted
    defaults = engine.default_targets(str(family_dirs[family]))
    assert defaults == sorted(p for p, k in kinds.items() if k in DEFAULT_KINDS)
    if "experts" in KINDS[family]:  # MoE runs train the experts, not attention only
        assert any(kinds[p] == "experts" for p in defaults)


@pytest.mark.parametrize("family", FAMILIES)
def test_tinker_flags_choose_layer_kinds(family: str, family_dirs, engine: Engine) -> None:
    name = str(family_dirs[family])
    wanted = {
        (True, False, False): {"attention", "linear_attention"},
        (False, True, False): {"mlp", "experts"},
        (False, False, True): {"unembed"},
        (True, True, True): {"attention", "linear_attention", "mlp", "experts", "unembed"},
    }
    for (attn, mlp, unembed), expected in wanted.items():
        targets = engine.lora_target_modules(name, train_attn=attn, train_mlp=mlp, train_unembed=unembed)
        run_id = engine.create_run(name, {"r": 2, "target_modules": targets}).run_id
        run = engine._run(run_id)
        kinds = set(run.base.layer_kinds(sorted(run.slots)).values())
        assert kinds == expected & KINDS[family]
        assert engine.tinker_lora_flags(run_id) == {
            "train_attn": attn,
            "train_mlp": mlp,
            "train_unembed": unembed,
        }
        engine.delete_run(run_id)
    assert engine.lora_target_modules(name) is None  # attention + MLP, no head: the family default
    with pytest.raises(InvalidInputError):
        engine.lora_target_modules(name, train_attn=False, train_mlp=False, train_unembed=False)


def test_expert_lora_takes_no_dropout(family_dirs, engine: Engine) -> None:
    with pytest.raises(InvalidInputError, match="lora_dropout"):
        engine.create_run(str(family_dirs["qwen3_moe"]), {"r": 2, "lora_dropout": 0.1})
    info = engine.create_run(
        str(family_dirs["qwen3_moe"]), {"r": 2, "lora_dropout": 0.1, "target_modules": ["q_proj"]}
    )
    engine.delete_run(info.run_id)


# --- training: PEFT parity and co-batching ----------------------------------------------------------------


MOE = [f for f in FAMILIES if "experts" in KINDS[f]]
# Expert deltas go one of two equal ways (formed delta weights, or low-rank matmuls): test both everywhere.
PATHS = [
    pytest.param(f, path, id=f"{f}-{path}")
    for f in FAMILIES
    for path in (["low-rank", "merged"] if f in MOE else ["-"])
]


@pytest.fixture
def expert_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    path = request.node.callspec.params.get("path", "-")
    if path != "-":
        monkeypatch.setattr(lora.experts, "MERGE_EXPERTS_BELOW", 0.0 if path == "low-rank" else float("inf"))


@pytest.mark.parametrize(("family", "path"), PATHS)
def test_loss_and_gradients_equal_peft(
    family: str, path: str, expert_path, family_dirs, engine: Engine
) -> None:
    model_dir = family_dirs[family]
    run_id = new_run(
        engine,
        model_dir,
        r=4,
        seed=1,
        target_modules=engine.lora_target_modules(
            str(model_dir), train_attn=True, train_mlp=True, train_unembed=True
        ),
    )
    seqs = sequences(0)
    result = engine.forward_backward(run_id, token_data(seqs), "cross_entropy")

    reference = peft_reference(engine, run_id, model_dir, family)
    ids, mask = padded(seqs)
    total, rows = summed_target_logprobs(reference(input_ids=ids, attention_mask=mask).logits, seqs)
    (-total).backward()
    assert result.loss == pytest.approx(-total.item(), rel=1e-5)
    for ours, theirs in zip(result.logprobs, rows, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    run = engine._run(run_id)
    theirs = peft_grads(reference, run)
    for path, slot in run.slots.items():
        assert slot.lora_A.grad is not None and slot.lora_B.grad is not None
        assert relative_error(slot.lora_A.grad, theirs[path][0]) < 1e-5, path
        assert relative_error(slot.lora_B.grad, theirs[path][1]) < 1e-5, path
    engine.delete_run(run_id)


@pytest.mark.parametrize(("family", "path"), PATHS)
def test_cobatched_runs_of_different_ranks_equal_alone(
    family: str, path: str, expert_path, family_dirs, engine: Engine
) -> None:
    model_dir = family_dirs[family]
    together = [new_run(engine, model_dir, r=4, seed=2), new_run(engine, model_dir, r=8, seed=3)]
    alone = [new_run(engine, model_dir, r=4, seed=2), new_run(engine, model_dir, r=8, seed=3)]
    data = [token_data(sequences(4, (10, 6))), token_data(sequences(5, (13, 9, 4)))]
    shared = engine.forward_backward_many(
        [TrainOp(run_id, d, "cross_entropy") for run_id, d in zip(together, data, strict=True)]
    )
    for run_id, d, got in zip(alone, data, shared, strict=True):
        assert not isinstance(got, Exception)
        solo = engine.forward_backward(run_id, d, "cross_entropy")
        assert got.loss == pytest.approx(solo.loss, rel=1e-5)
        for a, b in zip(got.logprobs, solo.logprobs, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a_id, b_id in zip(together, alone, strict=True):
        a_run, b_run = engine._run(a_id), engine._run(b_id)
        for path in a_run.slots:
            for which in ("lora_A", "lora_B"):
                mine = getattr(a_run.slots[path], which).grad
                solo_grad = getattr(b_run.slots[path], which).grad
                assert relative_error(mine, solo_grad) < 1e-5, (path, which)
    for run_id in together + alone:
        engine.delete_run(run_id)


# --- sampling ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "path"), PATHS)
def test_continuous_batching_samples_as_alone_with_training_logprobs(
    family: str, path: str, expert_path, family_dirs, engine: Engine
) -> None:
    model_dir = family_dirs[family]
    runs = [new_run(engine, model_dir, r=4, seed=6), new_run(engine, model_dir, r=8, seed=7)]
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=11, stop=[])
    requests = [
        SampleRequest(prompt=list(range(10, 15)), params=params, num_samples=2, adapter=runs[0]),
        SampleRequest(prompt=list(range(40, 49)), params=params, adapter=runs[1]),
        SampleRequest(prompt=[7, 8, 9], params=params),  # the bare base model
        SampleRequest(prompt=list(range(60, 74)), params=params, num_samples=2, adapter=runs[0]),
    ]
    alone = [engine.sample_many(str(model_dir), [request])[0] for request in requests]
    base = engine.base_model(str(model_dir))
    batcher = ContinuousBatcher(base)
    results: dict[int, list] = {}
    most_running = 0
    with base.lock:  # requests join a batch that is running, one every two steps
        for i, request in enumerate(requests):
            batcher.add([request], lambda outcome, i=i: results.__setitem__(i, outcome))
            for _ in range(2):
                batcher.step()
                most_running = max(most_running, batcher.running_rows)
        while batcher.has_work:
            batcher.step()
    assert most_running > 3  # rows of several requests decoded together (linear-attention states merged)
    for request, solo, (joined,) in zip(
        requests, alone, [results[i] for i in range(len(requests))], strict=True
    ):
        for seq_alone, seq in zip(solo.sequences, joined.sequences, strict=True):
            assert seq.tokens == seq_alone.tokens
            torch.testing.assert_close(
                torch.tensor(seq.logprobs), torch.tensor(seq_alone.logprobs), atol=1e-5, rtol=0
            )
            full = request.prompt + seq.tokens
            if request.adapter is None:
                trained = engine.compute_logprobs(full, base_model=str(model_dir))[len(request.prompt) :]
            else:
                forward = engine.forward(
                    request.adapter, [Datum.from_targets(full[:-1], full[1:])], "cross_entropy"
                )
                trained = forward.logprobs[0][len(request.prompt) - 1 :].tolist()
            assert max(abs(a - b) for a, b in zip(trained, seq.logprobs, strict=True)) < 1e-4
    for run_id in runs:
        engine.delete_run(run_id)


# --- checkpoints -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_adapter_loads_in_peft_with_equal_logprobs(
    family: str, family_dirs, engine: Engine, tmp_path: Path
) -> None:
    model_dir = family_dirs[family]
    run_id = new_run(engine, model_dir, r=4, seed=8)
    engine.save_weights(run_id, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    if "experts" in KINDS[family]:
        assert config["target_parameters"] and config["lora_dropout"] == 0
    peft_model = PeftModel.from_pretrained(hf_model(model_dir, family), str(tmp_path / "adapter"))
    seqs = sequences(9)
    ids, mask = padded(seqs)
    with torch.no_grad():
        _, theirs = summed_target_logprobs(peft_model(input_ids=ids, attention_mask=mask).logits, seqs)
    ours = engine.forward(run_id, token_data(seqs), "cross_entropy").logprobs
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    adapted = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }
    assert len(adapted) == len(engine._run(run_id).slots)  # no layer more, none fewer

    # A training checkpoint restores into a new run: same log-probabilities, same optimizer state.
    engine.forward_backward(run_id, token_data(seqs), "cross_entropy")
    engine.optim_step(run_id)
    engine.save_state(run_id, tmp_path / "state")
    restored = engine.create_run(str(model_dir), adapter_path=tmp_path / "state").run_id
    for a, b in zip(
        engine.forward(run_id, token_data(seqs), "cross_entropy").logprobs,
        engine.forward(restored, token_data(seqs), "cross_entropy").logprobs,
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    original, copy = engine._run(run_id), engine._run(restored)
    for p, q in zip(original.params, copy.params, strict=True):
        for stat in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(original.optimizer.state[p][stat], copy.optimizer.state[q][stat])
    engine.delete_run(run_id)
    engine.delete_run(restored)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "qwen3_5_moe"])
def test_peft_saved_expert_adapter_runs_in_the_engine(
    family: str, family_dirs, engine: Engine, tmp_path: Path
) -> None:
    model_dir = family_dirs[family]
    torch.manual_seed(0)
    model = get_peft_model(
        hf_model(model_dir, family),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        ),
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, 0, 0.1)
    model.save_pretrained(tmp_path / "peft")
    seqs = sequences(10)
    ids, mask = padded(seqs)
    with torch.no_grad():
        _, theirs = summed_target_logprobs(model(input_ids=ids, attention_mask=mask).logits, seqs)
    run_id = engine.create_run(str(model_dir), adapter_path=tmp_path / "peft").run_id
    assert sorted(engine.run_info(run_id).target_modules) == ["down_proj", "gate_up_proj", "q_proj", "v_proj"]
    for a, b in zip(engine.forward(run_id, token_data(seqs), "cross_entropy").logprobs, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    engine.delete_run(run_id)


# --- vision ------------------------------------------------------------------------------------------------


def png(width: int, height: int, color=(200, 30, 60)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def image_prompt(engine: Engine, model_dir: Path, *parts) -> tuple[list[int], tuple[ImageChunk, ...]]:
    base = engine.base_model(str(model_dir))
    v = vision.vision_of(base)
    assert v is not None
    chunks: list = []
    for part in parts:
        chunks += (
            [[v.vision_start_token_id], part, [v.vision_end_token_id]]
            if isinstance(part, ImageChunk)
            else [part]
        )
    return vision.expand_chunks(base, chunks)


def test_vision_training_equals_peft_and_sampling_matches_training(
    family_dirs, engine: Engine, tmp_path: Path
) -> None:
    model_dir = family_dirs["qwen3_vl"]
    run_id = new_run(engine, model_dir, r=4, seed=12)
    red, green = (
        ImageChunk(png(32, 32), "png"),
        ImageChunk(png(48, 32, (10, 220, 40)), "PNG", expected_tokens=6),
    )
    tokens_a, images_a = image_prompt(engine, model_dir, [5, 6], red, [7, 8, 9, 10])
    tokens_b, images_b = image_prompt(engine, model_dir, [11], green, [12], red, [13, 14])
    assert images_b == (green, red) and len(tokens_b) == 1 + 8 + 1 + 6 + 2
    data = [
        Datum(tokens_a[:-1], {"target_tokens": tokens_a[1:]}, images=images_a),
        Datum(tokens_b[:-1], {"target_tokens": tokens_b[1:]}, images=images_b),
    ]
    result = engine.forward_backward(run_id, data, "cross_entropy")

    engine.save_weights(run_id, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(hf_model(model_dir, "qwen3_vl"), str(tmp_path / "adapter"))
    base = engine.base_model(str(model_dir))
    seqs = [tokens_a, tokens_b]
    ids, mask = padded(seqs)
    inputs = vision.model_inputs(base, [images_a, images_b], ids)
    with torch.no_grad():
        logits = peft_model(input_ids=ids, attention_mask=mask, **inputs).logits
    total, rows = summed_target_logprobs(logits, seqs)
    assert result.loss == pytest.approx(-total.item(), rel=1e-5)
    for ours, theirs in zip(result.logprobs, rows, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # The images matter: the same tokens without them are refused, other pixels give other log-probs.
    with pytest.raises(InvalidInputError, match=r"data\[0\]\.tokens"):
        engine.forward(run_id, [Datum(tokens_a[:-1], {"target_tokens": tokens_a[1:]})], "cross_entropy")
    blue = ImageChunk(png(32, 32, (0, 0, 255)), "png")
    other = engine.forward(
        run_id, [Datum(tokens_a[:-1], {"target_tokens": tokens_a[1:]}, images=(blue,))], "cross_entropy"
    )
    assert not torch.allclose(other.logprobs[0], result.logprobs[0])

    params = SamplingParams(max_tokens=6, temperature=1.0, seed=4, stop=[])
    requests = [
        SampleRequest(prompt=tokens_a, params=params, adapter=run_id, images=images_a, num_samples=2),
        SampleRequest(prompt=tokens_b, params=params, adapter=run_id, images=images_b),
        SampleRequest(
            prompt=tokens_a, params=params, adapter=run_id, images=(blue,)
        ),  # same tokens, other image
        SampleRequest(prompt=[4, 5, 6], params=params, adapter=run_id),
    ]
    together = engine.sample_many(str(model_dir), requests)
    for request, got in zip(requests, together, strict=True):
        solo = engine.sample_many(str(model_dir), [request])[0]
        seq = got.sequences[0]
        assert seq.tokens == solo.sequences[0].tokens
        full = request.prompt + seq.tokens
        forward = engine.forward(
            run_id, [Datum(full[:-1], {"target_tokens": full[1:]}, images=request.images)], "cross_entropy"
        )
        trained = forward.logprobs[0][len(request.prompt) - 1 :].tolist()
        assert max(abs(a - b) for a, b in zip(trained, seq.logprobs, strict=True)) < 1e-4
    engine.delete_run(run_id)


def test_bad_images_are_refused_naming_the_chunk(family_dirs, engine: Engine) -> None:
    model_dir = family_dirs["qwen3_vl"]
    base = engine.base_model(str(model_dir))
    bad = {
        ImageChunk(b"not an image", "png"): r"chunks\[1\]\.data.*does not decode",
        ImageChunk(png(32, 32), "jpeg"): r"chunks\[1\]\.data.*PNG image, not jpeg",
        ImageChunk(png(32, 32), "bmp"): r"chunks\[1\]\.format",
        ImageChunk(b"", "png"): r"chunks\[1\]\.data.*empty",
        ImageChunk(png(32, 32), "png", expected_tokens=5): r"chunks\[1\]\.expected_tokens",
        ImageChunk(png(6001, 6000), "png"): r"chunks\[1\]\.data.*pixels",
    }
    for chunk, message in bad.items():
        with pytest.raises(InvalidInputError, match=message):
            vision.expand_chunks(base, [[1, 2], chunk])
    tokens, images = image_prompt(engine, model_dir, [5], ImageChunk(png(32, 32), "png"), [6])
    run_id = engine.create_run(str(model_dir), {"r": 2}).run_id
    with pytest.raises(InvalidInputError, match=r"data\[1\]\.images"):  # two images for one placeholder run
        engine.forward(
            run_id,
            [
                Datum([1, 2], {"target_tokens": [2, 3]}),
                Datum(tokens, {"target_tokens": tokens}, images=images * 2),
            ],
            "cross_entropy",
        )
    with pytest.raises(InvalidInputError, match=r"^images\[0\]\.data: does not decode"):
        engine.sample_many(
            str(model_dir),
            [
                SampleRequest(
                    prompt=tokens, params=SamplingParams(max_tokens=2), images=(ImageChunk(b"x", "png"),)
                )
            ],
        )
    text_only = engine.base_model(str(family_dirs["qwen3_moe"]))
    with pytest.raises(InvalidInputError, match="takes no images"):
        vision.expand_chunks(text_only, [[1], ImageChunk(png(32, 32), "png")])
    engine.delete_run(run_id)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_merged_expert_adapter_computes_what_the_run_computes(
    family: str, family_dirs, engine: Engine, tmp_path: Path
) -> None:
    from eztinker.engine.checkpoint import merge_into_base

    model_dir = family_dirs[family]
    run_id = new_run(engine, model_dir, r=4, seed=13)
    engine.save_weights(run_id, tmp_path / "adapter")
    merged = hf_model(merge_into_base(tmp_path / "adapter", str(model_dir), tmp_path / "merged"), family)
    seqs = sequences(14)
    ids, mask = padded(seqs)
    with torch.no_grad():
        _, theirs = summed_target_logprobs(merged(input_ids=ids, attention_mask=mask).logits, seqs)
    for a, b in zip(engine.forward(run_id, token_data(seqs), "cross_entropy").logprobs, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    engine.delete_run(run_id)


def test_a_merged_vision_model_takes_images_as_the_adapted_one(
    family_dirs, engine: Engine, tmp_path: Path
) -> None:
    from eztinker.engine.checkpoint import merge_into_base

    model_dir = family_dirs["qwen3_vl"]
    run_id = new_run(engine, model_dir, r=4, seed=15)
    engine.save_weights(run_id, tmp_path / "adapter")
    merged = merge_into_base(tmp_path / "adapter", str(model_dir), tmp_path / "merged")
    tokens, images = image_prompt(engine, model_dir, [5, 6], ImageChunk(png(32, 32), "png"), [7, 8, 9])
    data = [Datum(tokens[:-1], {"target_tokens": tokens[1:]}, images=images)]
    ours = engine.forward(run_id, data, "cross_entropy").logprobs[0]
    # The merged directory carries the image processor, so it serves images as a base model of its own.
    plain = engine.create_run(str(merged), {"r": 1}).run_id  # B = 0: the merged weights alone
    torch.testing.assert_close(
        engine.forward(plain, data, "cross_entropy").logprobs[0], ours, atol=1e-5, rtol=0
    )
    engine.delete_run(run_id)
    engine.delete_run(plain)
