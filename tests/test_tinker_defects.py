"""Arguments of the official SDK (0.38.0) this server cannot honour are refused naming them, never
ignored: sampling or training a checkpoint on another base model than its own, weights access tokens, and
optimizer state asked of a checkpoint that has none. Listings come newest first, as hosted Tinker's do; a
refused `forward_backward` still takes its turn in its model's `seq_id` order."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

import eztinker
from eztinker.api import create_app
from eztinker.api import tinker_public_pb2 as pb
from eztinker.service import Service
from eztinker.settings import Settings

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

TOKENS = [(7 + 13 * i) % 900 + 3 for i in range(12)]
OTHER_BASE = "Qwen/Qwen3-8B"  # a name the client would load its tokenizer for


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, monkeypatch_module) -> str:
    monkeypatch_module.setenv("TINKER_API_KEY", "tml-test")
    monkeypatch_module.setenv("TINKER_TELEMETRY", "0")
    monkeypatch_module.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    with eztinker.serve(data_dir=tmp_path_factory.mktemp("data"), models=[str(tiny_model_dir)]) as url:
        yield url


@pytest.fixture(scope="module")
def service_client(server: str):
    client = tinker.ServiceClient(base_url=server)
    client.get_server_capabilities()  # the REST holder first (see test_tinker_sdk.py)
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def checkpoints(service_client, tiny_model_dir) -> tuple[str, str]:
    """(a `save_state` path, a `save_weights_for_sampler` path) of a run on the tiny model."""
    training = service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=2).result()
    state = training.save_state("state").result().path
    sampler = training.save_weights_for_sampler("sampler").result().path
    return state, sampler


def test_a_checkpoint_is_sampled_only_on_its_own_base_model(
    service_client, checkpoints, tiny_model_dir
) -> None:
    """The SDK trusts the `base_model` it is given (its tokenizer, `get_base_model()`) and asks the server
    nothing more: a checkpoint sampled while the client believes another base model is refused."""
    _, sampler_path = checkpoints
    with pytest.raises(tinker.UnprocessableEntityError, match="base_model") as refused:
        service_client.create_sampling_client(model_path=sampler_path, base_model=OTHER_BASE).result()
    assert "is not the base model of the checkpoint" in str(refused.value)

    same = service_client.create_sampling_client(
        model_path=sampler_path, base_model=str(tiny_model_dir)
    ).result()
    sampled = same.sample(types.ModelInput.from_ints(TOKENS), 1, types.SamplingParams(max_tokens=2))
    assert len(sampled.result().sequences[0].tokens) == 2


def test_a_checkpoint_is_trained_only_on_its_own_base_model(
    service_client, checkpoints, tiny_model_dir
) -> None:
    """`create_training_client_from_state(path, base_model=...)` overrides the checkpoint's base model on
    hosted Tinker; this server does not, so another base model is refused rather than silently replaced."""
    state_path, _ = checkpoints
    with pytest.raises(
        tinker.RequestFailedError, match="base_model: 'Qwen/Qwen3-8B' is not the checkpoint's"
    ):
        service_client.create_training_client_from_state(state_path, base_model=OTHER_BASE).result()

    same = service_client.create_training_client_from_state(state_path, base_model=str(tiny_model_dir))
    assert same.result().get_info().model_data.model_name == str(tiny_model_dir)


def test_a_weights_access_token_is_refused_not_ignored(service_client, checkpoints) -> None:
    """Access tokens are not served (as `copy_weights` says): a load with one is refused naming it, not run
    as if it had none (another key's private checkpoint would then be answered as missing)."""
    state_path, _ = checkpoints
    with pytest.raises(tinker.RequestFailedError, match="weights_access_token: access tokens are not served"):
        service_client.create_training_client_from_state(state_path, weights_access_token="tok").result()


def test_optimizer_state_is_loaded_only_from_a_checkpoint_that_has_it(service_client, checkpoints) -> None:
    """A `save_weights_for_sampler` checkpoint holds weights only: loading it `_with_optimizer` is refused
    naming the path, not run with a fresh optimizer as if the momentum had been restored."""
    state_path, sampler_path = checkpoints
    with pytest.raises(tinker.RequestFailedError, match="path: .*holds weights only, no optimizer state"):
        service_client.create_training_client_from_state_with_optimizer(sampler_path).result()
    resumed = service_client.create_training_client_from_state_with_optimizer(state_path).result()
    with pytest.raises(tinker.RequestFailedError, match="holds weights only"):
        resumed.load_state_with_optimizer(sampler_path).result()

    resumed.load_state(sampler_path).result()  # the weights alone load
    resumed.load_state_with_optimizer(state_path).result()


def test_runs_and_checkpoints_are_listed_newest_first(service_client, tiny_model_dir) -> None:
    """As hosted Tinker lists them (its docs' `tinker run list --limit 3` and `tinker checkpoint list
    --limit 3` show the latest of over a thousand): a first page holds the newest, not the oldest."""
    first = service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=2).result()
    older = first.save_state("older").result().path
    second = service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=2).result()
    newer = second.save_state("newer").result().path
    rest = service_client.create_rest_client()

    runs = rest.list_training_runs(limit=2).result()
    assert [r.training_run_id for r in runs.training_runs] == [second.model_id, first.model_id]
    assert runs.cursor.total_count >= 2
    checkpoints = rest.list_user_checkpoints(limit=2).result().checkpoints
    assert [c.tinker_path for c in checkpoints] == [newer, older]
    assert rest.list_user_checkpoints(limit=1, offset=1).result().checkpoints[0].tinker_path == older


def _settled(http: TestClient, request_id: str) -> dict[str, Any]:
    while (answer := http.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()).get(
        "type"
    ) == "try_again":
        pass
    return answer


def test_a_forward_backward_refused_for_its_content_still_takes_its_turn(tmp_path, tiny_model_dir) -> None:
    """A body that names its model and `seq_id` but holds what is not served (a dmel chunk) fails its
    future, in its turn: the model's next op runs at once, not after the wait for a gap in `seq_id`s."""
    service = Service(Settings(data_dir=tmp_path, models=[str(tiny_model_dir)]))
    with TestClient(create_app(service=service)) as http:
        session = http.post("/api/v1/create_session", json={"tags": []}).json()["session_id"]
        model = {"session_id": session, "base_model": str(tiny_model_dir), "lora_config": {"rank": 2}}
        model_id = _settled(http, http.post("/api/v1/create_model", json=model).json()["request_id"])[
            "model_id"
        ]
        refused = pb.ForwardBackwardRequest(model_id=model_id, seq_id=1, loss_fn="cross_entropy")
        refused.data.add().model_input.add().dmel.dmel = b"not served"
        headers = {"content-type": "application/x-protobuf"}

        fb = http.post(
            "/api/v1/forward_backward", content=refused.SerializeToString(), headers=headers
        ).json()
        step = {"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 1e-3}}
        stepped = http.post("/api/v1/optim_step", json=step).json()

        assert http.app.state.tinker.futures[stepped["request_id"]].submitted.done()  # not held for seq 1
        assert "dmel chunks are not supported" in _settled(http, fb["request_id"])["error"]
        assert _settled(http, stepped["request_id"])["metrics"]["step:max"] == 1.0


def test_a_checkpoint_that_does_not_fit_is_refused_without_the_servers_paths(
    service_client, checkpoints, tiny_model_dir
) -> None:
    """A rank-2 checkpoint loaded into a rank-4 run is refused naming `path` and the shapes; the message
    says nothing of where the server keeps its files (the caller named the checkpoint by its tinker path)."""
    state_path, _ = checkpoints
    wider = service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=4).result()
    with pytest.raises(
        tinker.RequestFailedError, match=r"path: the checkpoint does not fit run .*r=2, run r=4"
    ) as refused:
        wider.load_state(state_path).result()
    assert "checkpoints/" not in str(refused.value) and "/tmp" not in str(refused.value)
