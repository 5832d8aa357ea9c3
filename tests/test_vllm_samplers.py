"""Held sampler snapshots on the vLLM sampling backend: an RL loop's replaced snapshots and a model's old
inflight targets are unloaded from vLLM and deleted (`VllmBackend.delete_sampler`), so neither vLLM's
adapters nor the engine's snapshots grow, and ending the session frees the rest. Uses `test_vllm`'s one
vLLM server fixture (skipped without the `.venv-vllm` environment)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from eztinker.backend.vllm import VllmBackend
from eztinker.service import Service
from test_vllm import PROMPT, monkeypatch_module, needs_vllm, service, url, vllm_model_dir  # noqa: F401


def _eventually(check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@needs_vllm
def test_replaced_snapshots_and_inflight_targets_leave_vllm(
    url: str,  # noqa: F811
    service: Service,  # noqa: F811
    vllm_model_dir: Path,  # noqa: F811
) -> None:
    tinker = pytest.importorskip("tinker")
    from tinker import types

    backend = service.backend
    assert isinstance(backend, VllmBackend)
    vllm = backend.pool.running()[str(vllm_model_dir)]

    def held() -> tuple[set[str], set[str]]:
        """(the engine's snapshots, the adapters vLLM has loaded)"""
        return {i.sampler_id for i in backend.list_samplers()}, set(vllm.loaded_adapters)

    service.sampling.superseded_grace = 0.0
    client = tinker.ServiceClient(base_url=url)
    client.get_server_capabilities()
    try:
        training = client.create_lora_training_client(
            base_model=str(vllm_model_dir), rank=8, seed=0, train_unembed=False
        )
        tokens = [*PROMPT, 13, 14, 15, 16]
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
        )
        engine_before, vllm_before = held()
        for _ in range(6):
            sampling = training.save_weights_and_get_sampling_client().result()
            before = backend.routes["vllm"]
            out = sampling.sample(
                types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=3)
            ).result()
            assert len(out.sequences) == 1 and backend.routes["vllm"] == before + 1
            training.forward_backward([datum], "cross_entropy").result()
            training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
            _eventually(lambda: len(held()[0] - engine_before) <= 1 and len(held()[1] - vllm_before) <= 1)
        # Inflight: both sessions sample the newest target on vLLM; the old target is unloaded.
        first = training.save_weights_and_get_sampling_client(kind="inflight").result()
        training.forward_backward([datum], "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=2e-1)).result()
        second = training.save_weights_and_get_sampling_client(kind="inflight").result()
        scored = [
            s.compute_logprobs(types.ModelInput.from_ints(tokens)).result()[1:] for s in (first, second)
        ]
        assert scored[0] == pytest.approx(scored[1], abs=1e-3)
        prefix = f"{training.model_id}:inflight:"
        _eventually(lambda: len([a for a in held()[0] if a.startswith(prefix)]) == 1)
        engine_mid, vllm_mid = held()
        assert len(engine_mid - engine_before) <= 2 and len(vllm_mid - vllm_before) <= 2
    finally:
        client.close("success").result()
        service.sampling.superseded_grace = 120.0
    _eventually(lambda: held()[0] <= engine_before and held()[1] <= vllm_before)
    assert not [p for p in backend.pool.adapter_root.iterdir() if "inflight" in p.name]
