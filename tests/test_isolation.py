"""Isolation between API keys: key B can neither see nor touch key A's runs and checkpoints, on any route.

Alice trains through the official Tinker SDK; Bob then tries everything through the native API, the
Tinker SDK, the OpenAI routes and the dashboard's API. Every attempt must fail as "not found" (no hint
that the run exists), and Alice's run must be exactly as she left it.
"""

from __future__ import annotations

import httpx
import pytest

import eztinker
from eztinker import EZTinkerClient
from eztinker.exceptions import NotFoundError

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

ALICE, BOB = "tml-alice-key", "tml-bob-key"
TOKENS = [(7 + 13 * i) % 900 + 3 for i in range(12)]


@pytest.fixture(scope="module")
def alice_world(tmp_path_factory, tiny_model_dir):
    """A server with two keys; Alice's run trained one step, with a state and a sampler checkpoint."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINKER_TELEMETRY", "0")
        mp.setenv("HOME", str(home))
        data_dir = tmp_path_factory.mktemp("isolation")
        with eztinker.serve(data_dir=data_dir, models=[str(tiny_model_dir)], api_keys=[ALICE, BOB]) as url:
            client = tinker.ServiceClient(base_url=url, api_key=ALICE)
            client.get_server_capabilities()
            training = client.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=0)
            datum = types.Datum(
                model_input=types.ModelInput.from_ints(TOKENS[:-1]),
                loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)},
            )
            training.forward_backward([datum], "cross_entropy").result()
            training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            state = training.save_state("alice-state").result().path
            sampler = training.save_weights_for_sampler("alice-sampler").result().path
            run_id = training.get_info().model_id
            yield url, str(tiny_model_dir), run_id, state, sampler
            client.close("success").result()


def test_bob_cannot_see_or_touch_alices_run_through_the_native_api(alice_world) -> None:
    url, model, run_id, _, _ = alice_world
    with EZTinkerClient(base_url=url, api_key=BOB) as bob:
        assert run_id not in [r.run_id for r in bob.get_runs()]
        attempts = {
            "get_run": lambda: bob.get_run(run_id),
            "forward_backward": lambda: bob.forward_backward(run_id, input_ids=TOKENS),
            "optim_step": lambda: bob.optim_step(run_id),
            "sample": lambda: bob.generate(TOKENS[:4], run_id=run_id, max_new_tokens=2),
            "checkpoints": lambda: bob.get_checkpoints(run_id),
            "save": lambda: bob.save_checkpoint(run_id, name="stolen"),
            "load": lambda: bob.load_checkpoint(run_id, "alice-state"),
            "metrics": lambda: bob.get_metrics(run_id),
            "delete_run": lambda: bob.delete_run(run_id),
        }
        for name, attempt in attempts.items():
            with pytest.raises(NotFoundError):
                attempt()
                pytest.fail(f"{name} succeeded")
        mine = bob.create_run(base_model=model, lora_config={"r": 2})
        with pytest.raises(NotFoundError):  # loading Alice's checkpoint into Bob's own run
            bob.load_checkpoint(mine, "alice-state", source_run_id=run_id)
    headers = {"X-API-Key": BOB}
    for path in (
        f"/v1/runs/{run_id}/checkpoints/alice-state/archive",
        f"/v1/runs/{run_id}/checkpoints",
    ):
        assert httpx.get(f"{url}{path}", headers=headers).status_code == 404
    assert httpx.delete(f"{url}/v1/runs/{run_id}/checkpoints/alice-state", headers=headers).status_code == 404
    with EZTinkerClient(base_url=url, api_key=ALICE) as alice:  # and nothing of Alice's changed
        assert alice.get_run(run_id).step == 1
        assert "alice-state" in {c.name for c in alice.get_checkpoints(run_id)}


def test_bob_cannot_use_alices_checkpoints_through_the_tinker_sdk(alice_world) -> None:
    url, _, run_id, state, sampler = alice_world
    bob = tinker.ServiceClient(base_url=url, api_key=BOB)
    try:
        rest = bob.create_rest_client()
        assert run_id not in [
            r.training_run_id for r in rest.list_training_runs(limit=100).result().training_runs
        ]
        with pytest.raises(Exception, match="(?i)not found|no run|no checkpoint|404"):
            rest.get_training_run(run_id).result()
        with pytest.raises(Exception, match="(?i)not found|no run|no checkpoint|404"):
            bob.create_training_client_from_state(state).result()
        with pytest.raises(Exception, match="(?i)not found|no run|no checkpoint|404"):
            bob.create_sampling_client(model_path=sampler).sample(
                types.ModelInput.from_ints(TOKENS[:4]), 1, types.SamplingParams(max_tokens=2)
            ).result()
    finally:
        bob.close("success").result()


def test_bob_cannot_sample_alices_run_through_the_openai_api_or_list_it_on_the_dashboard(alice_world) -> None:
    url, _, run_id, _, _ = alice_world
    headers = {"Authorization": f"Bearer {BOB}"}
    models = httpx.get(f"{url}/v1/models", headers=headers)
    if models.status_code == 404:
        pytest.skip("no OpenAI routes in this build")
    assert run_id not in [m["id"] for m in models.json()["data"]]
    completion = httpx.post(
        f"{url}/v1/completions", json={"model": run_id, "prompt": "hi", "max_tokens": 2}, headers=headers
    )
    assert completion.status_code == 404 and "error" in completion.json()
    runs = httpx.get(f"{url}/dashboard/api/runs", headers={"X-API-Key": BOB})
    assert runs.status_code == 200
    assert run_id not in str(runs.json())
