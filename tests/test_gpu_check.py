"""`bench/gpu_check.py --dry-run`: the GPU kit runs end to end on the CPU and writes every field.

The GPU check is run by hand on a lent H100/H200, rarely; this keeps it from rotting in between. It runs
the script as the GPU box would (a subprocess, offline) with tiny models, and checks that every section
completed and every headline field is a finite number of the right sign. No timing thresholds: the dry
run's speeds say nothing about a GPU's.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"

POSITIVE = [
    "mfu_8b",
    "mfu_0_5b",
    "forward_backward_tokens_per_s_8b",
    "forward_backward_tokens_per_s_0_5b",
    "vs_peft_ratio_8b",
    "vs_peft_ratio_0_5b",
    "cobatch_ratio_8_runs",
    "sample_vs_hf_static",
    "constrained_vs_free",
    "peak_memory_mb",
    "peak_bf16_tflops",
    "measured_matmul_tflops",
    "big_model_layers",
]
SECTIONS = [
    "environment",
    "peak",
    "small.build",
    "small.forward_backward",
    "small.cobatching",
    "small.sampling",
    "small.constrained",
    "small.logprob_agreement",
    "small.resume",
    "big.build",
    "big.forward_backward",
]


def _finite_positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu-check") / "r.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"gpu_check failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return json.loads(out.read_text(encoding="utf-8"))


def test_every_section_completes(dry_run: dict) -> None:
    assert dry_run["schema"] == "eztinker-gpu-check/1"
    assert dry_run["dry_run"] is True
    assert dry_run["errors"] == {}
    assert dry_run["skipped"] == []
    assert dry_run["budget_exhausted"] is False
    for name in SECTIONS:
        assert dry_run["sections"][name]["status"] == "ok", (name, dry_run["sections"].get(name))


def test_headline_fields_are_sane(dry_run: dict) -> None:
    for key in POSITIVE:
        assert _finite_positive(dry_run.get(key)), (key, dry_run.get(key))
    diff = dry_run["bf16_vs_fp32_max_logprob_diff"]
    assert isinstance(diff, float) and math.isfinite(diff) and 0 <= diff < 0.5
    # MFU is the step's model flops over its median time over the peak. On a CPU the peak is itself measured
    # (a bf16 matmul), so the ratio moves with the machine's load; check how it is made, not its size.
    peak = dry_run["peak_bf16_tflops"] * 1e12
    for key, suffix in (("big", "8b"), ("small", "0_5b")):
        fb = dry_run["forward_backward"][key]
        expected = fb["flops_per_step"] / fb["engine"]["forward_backward_s"]["median"] / peak
        assert dry_run[f"mfu_{suffix}"] == pytest.approx(expected, rel=1e-9)
    assert (
        set(dry_run["targets"])
        == set(dry_run["meets_targets"])
        == {
            "mfu_8b",
            "cobatch_ratio_8_runs",
            "sample_vs_hf_static",
            "bf16_vs_fp32_max_logprob_diff",
        }
    )
    for value in dry_run["meets_targets"].values():
        assert isinstance(value, bool)


def test_sections_report_their_details(dry_run: dict) -> None:
    for key in ("small", "big"):
        fb = dry_run["forward_backward"][key]
        assert fb["rounds"] >= 1
        assert all(fb["flops_breakdown"][part] > 0 for part in ("linear", "lora", "attention"))
        assert _finite_positive(fb["engine"]["tokens_per_s"]) and _finite_positive(fb["peft"]["tokens_per_s"])
        # Same weights and batch, B = 0 at the first step: the engine and PEFT compute the same loss.
        assert fb["first_step_loss"]["abs_diff"] < 0.05 * max(1.0, abs(fb["first_step_loss"]["peft"]))
        model = dry_run["models"][key]
        assert model["layers"] == model["layers_full"] == 2
    cob = dry_run["cobatching"]
    assert cob["runs"] == 8 and _finite_positive(cob["engine_direct_ratio"])
    assert cob["mean_jobs_per_pass"]["time-multiplexed"] == 1.0
    assert cob["mean_jobs_per_pass"]["co-batched"] > 1.0
    sampling = dry_run["sampling"]
    assert _finite_positive(sampling["eight_adapters_vs_base"])
    assert 0 <= sampling["sample_vs_forward_max_logprob_diff_bf16"] < 0.5
    # Training resumed from a checkpoint on the device equals training straight through, bit for bit.
    assert dry_run["resume"]["bit_identical"] and dry_run["resume"]["max_abs_weight_diff"] == 0
    for section in dry_run["sections"].values():
        assert section["seconds"] >= 0 and section["peak_memory_mb"] > 0


def test_environment_and_imports(dry_run: dict) -> None:
    env = dry_run["environment"]
    for key in ("torch", "transformers", "peft", "safetensors", "numpy", "python", "device_name"):
        assert env.get(key), key
    assert "cuda" in env  # None on a CPU-only torch
    # The GPU box may have no web stack: the check must drive the engine without importing it.
    assert env["web_stack_modules_loaded"] == []


def test_flops_formula() -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up
    try:
        spec.loader.exec_module(gpu_check)
    finally:
        del sys.modules["gpu_check"]
    shape = gpu_check.QWEN3_8B
    flops = gpu_check.train_flops(shape, n_linear=1_000, n_lora=10, seq_lens=[4, 4])
    assert flops["linear"] == 4 * 1_000 * 8  # 2N forward + 2N input gradients, no base weight gradients
    assert flops["lora"] == 6 * 10 * 8
    assert (
        flops["attention"]
        == 2 * 6 * 16 * shape.num_attention_heads * shape.head_dim * shape.num_hidden_layers
    )
    assert flops["total"] == flops["linear"] + flops["lora"] + flops["attention"]
    assert gpu_check.peak_for("NVIDIA H100 80GB HBM3") == (989.0, "H100")
    assert gpu_check.peak_for("NVIDIA H100 PCIe") == (756.0, "H100 PCIe")
    assert gpu_check.peak_for("NVIDIA H200") == (989.0, "H200")
    assert gpu_check.peak_for("NVIDIA A100-SXM4-80GB") == (312.0, "A100")
    assert gpu_check.peak_for("Some CPU") == (None, None)
