"""Checkpoint lifecycle through the official SDK with two keys: `save_state(overwrite=True)` replaces,
`publish_checkpoint` makes a checkpoint readable (never writable) by other keys, and `copy_weights` puts a
checkpoint into a new run of the caller's project, sharing the files."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

import eztinker

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

ALICE, BOB = "tml-alice-lifecycle", "tml-bob-lifecycle"
TOKENS = [(5 + 11 * i) % 900 + 3 for i in range(12)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINKER_TELEMETRY", "0")
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        mp.delenv("TINKER_PROJECT_ID", raising=False)
        data_dir = tmp_path_factory.mktemp("lifecycle")
        with eztinker.serve(data_dir=data_dir, models=[str(tiny_model_dir)], api_keys=[ALICE, BOB]) as url:
            yield url


def _client(server: str, key: str, **kwargs):
    client = tinker.ServiceClient(base_url=server, api_key=key, **kwargs)
    client.get_server_capabilities()
    return client


@pytest.fixture(scope="module")
def alice(server):
    client = _client(server, ALICE)
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def bob(server):
    client = _client(server, BOB)
    yield client
    client.close("success").result()


def _datum() -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)},
    )


def _train(client, steps: int = 1) -> None:
    for _ in range(steps):
        client.forward_backward([_datum()], "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=5e-2)).result()


def _logprobs(client) -> torch.Tensor:
    out = client.forward([_datum()], "cross_entropy").result()
    return torch.tensor(out.loss_fn_outputs[0]["logprobs"].tolist())


@pytest.fixture(scope="module")
def trained(alice, tiny_model_dir):
    client = alice.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=0)
    _train(client)
    return client


# --- overwrite ---------------------------------------------------------------------------------------------


def test_a_name_in_use_is_refused_with_the_path_the_sdk_knows(trained) -> None:
    sampler = trained.save_weights_for_sampler("lifecycle-taken").result().path
    with pytest.raises(Exception, match=f"{sampler} already exists: choose another name"):
        trained.save_weights_for_sampler("lifecycle-taken").result()


def test_save_state_overwrite_replaces_weights_and_metadata(alice, trained) -> None:
    first = trained.save_state("lifecycle-x", user_metadata={"v": "1"}).result().path
    with pytest.raises(
        Exception, match=f"{first} already exists: choose another name, or save with overwrite"
    ):
        trained.save_state("lifecycle-x").result()  # without overwrite, a name is never replaced
    _train(trained)
    now = _logprobs(trained)
    second = trained.save_state("lifecycle-x", overwrite=True, user_metadata={"v": "2"}).result().path
    assert second == first

    rest = alice.create_rest_client()
    listed = [
        c
        for c in rest.list_checkpoints(trained.model_id).result().checkpoints
        if "lifecycle-x" in c.tinker_path
    ]
    assert len(listed) == 1 and listed[0].user_metadata == {"v": "2"}

    restored = alice.create_training_client_from_state_with_optimizer(second).result()
    assert torch.equal(_logprobs(restored), now)  # the new weights, not the old ones

    trained.save_state("lifecycle-x", overwrite=True).result()  # no user_metadata: the old is dropped
    listed = [
        c
        for c in rest.list_checkpoints(trained.model_id).result().checkpoints
        if "lifecycle-x" in c.tinker_path
    ]
    assert len(listed) == 1 and listed[0].user_metadata is None


# --- public checkpoints --------------------------------------------------------------------------------------


def test_a_published_checkpoint_is_readable_by_other_keys_and_private_again_when_unpublished(
    server, alice, bob, trained
) -> None:
    sampler_path = trained.save_weights_for_sampler("lifecycle-pub").result().path
    state_path = trained.save_state("lifecycle-pub-state").result().path
    rest_a, rest_b = alice.create_rest_client(), bob.create_rest_client()
    prompt = types.ModelInput.from_ints(TOKENS[:4])
    params = types.SamplingParams(max_tokens=3, temperature=0.0)

    with pytest.raises(Exception, match="no run|no checkpoint|not found"):  # private: missing to Bob
        bob.create_sampling_client(model_path=sampler_path).sample(prompt, 1, params).result()
    with pytest.raises(Exception, match="no run|no checkpoint|not found"):
        rest_b.publish_checkpoint_from_tinker_path(sampler_path).result()  # never Bob's to publish

    for path in (sampler_path, state_path):
        rest_a.publish_checkpoint_from_tinker_path(path).result()
    assert any(c.public for c in rest_a.list_checkpoints(trained.model_id).result().checkpoints)

    ours = alice.create_sampling_client(model_path=sampler_path).sample(prompt, 1, params).result()
    theirs = bob.create_sampling_client(model_path=sampler_path).sample(prompt, 1, params).result()
    assert theirs.sequences[0].tokens == ours.sequences[0].tokens  # the same weights

    bobs_run = bob.create_training_client_from_state(state_path).result()  # trains from Alice's weights
    assert torch.equal(_logprobs(bobs_run), _logprobs(trained))
    assert rest_b.get_weights_info_by_tinker_path(state_path).result().base_model
    run_id, checkpoint_id = state_path.removeprefix("tinker://").split("/", 1)
    archive = httpx.get(
        f"{server}/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}/archive",
        headers={"X-API-Key": BOB},
        timeout=30,
    ).json()
    download = httpx.get(archive["url"], headers={"X-API-Key": BOB}, timeout=60)
    assert download.status_code == 200 and download.content[:2] == b"\x1f\x8b"  # a .tar.gz
    with pytest.raises(Exception, match="no run|no checkpoint|not found"):  # read-only to Bob
        rest_b.delete_checkpoint_from_tinker_path(state_path).result()

    rest_a.unpublish_checkpoint_from_tinker_path(state_path).result()
    with pytest.raises(Exception, match="no run|no checkpoint|not found"):
        bob.create_training_client_from_state(state_path).result()


# --- copy_weights --------------------------------------------------------------------------------------------


def test_copy_weights_makes_a_run_in_the_destination_project_sharing_the_files(
    server, tmp_path_factory, alice, bob, trained
) -> None:
    path = trained.save_state("lifecycle-copy", user_metadata={"renderer": "qwen3"}).result().path
    archive = _client(server, ALICE, project_id="proj-archive")
    try:
        copied = archive.copy_weights(path, ttl_seconds=7200).result()
    finally:
        archive.close("success").result()
    assert copied.startswith("tinker://") and copied != path and copied.endswith("/weights/lifecycle-copy")

    rest = alice.create_rest_client()
    in_project = rest.list_training_runs(project_id="proj-archive").result().training_runs
    copy_run = copied.removeprefix("tinker://").split("/")[0]
    assert [r.training_run_id for r in in_project] == [copy_run]
    assert trained.model_id not in {r.training_run_id for r in in_project}
    (checkpoint,) = rest.list_checkpoints(copy_run).result().checkpoints
    assert checkpoint.user_metadata == {"renderer": "qwen3"} and checkpoint.expires_at is not None

    # The copy trains from like the source, and its files are the source's bytes, hard-linked.
    restored = alice.create_training_client_from_state_with_optimizer(copied).result()
    assert torch.equal(_logprobs(restored), _logprobs(trained))
    source_files = sorted(_checkpoint_dir(server, trained.model_id, "lifecycle-copy").rglob("*.safetensors"))
    copy_files = sorted(_checkpoint_dir(server, copy_run, "lifecycle-copy").rglob("*.safetensors"))
    assert source_files and [f.name for f in source_files] == [f.name for f in copy_files]
    assert all(a.stat().st_ino == b.stat().st_ino for a, b in zip(source_files, copy_files, strict=True))

    # The copy's run holds weights only: it is never trained.
    for op, body in (("load", {"name": "lifecycle-copy"}), ("optim_step", {"learning_rate": 1e-3})):
        refused = httpx.post(f"{server}/v1/runs/{copy_run}/{op}", json=body, headers={"X-API-Key": ALICE})
        assert refused.status_code == 409 and "cannot be trained" in refused.text, (op, refused.text)

    with pytest.raises(Exception, match="no run|no checkpoint|not found"):  # a private checkpoint of Alice's
        bob_archive = _client(server, BOB, project_id="bob-archive")
        try:
            bob_archive.copy_weights(path).result()
        finally:
            bob_archive.close("success").result()


def _checkpoint_dir(server: str, run_id: str, name: str) -> Path:
    """Where the server keeps checkpoint `name` of Alice's run `run_id` (the native API says)."""
    listed = httpx.get(f"{server}/v1/runs/{run_id}/checkpoints", headers={"X-API-Key": ALICE}, timeout=30)
    (checkpoint,) = [c for c in listed.json() if c["name"] == name]
    return Path(checkpoint["adapter_path"])
