"""The Tinker API's finer points through the official SDK and raw HTTP: sampling extras, train_unembed,
seq_id ordering and idempotent retries, external weights, sessions, the older JSON body, and restarts."""

from __future__ import annotations

import math
import time
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import eztinker
from eztinker.api import tinker_public_pb2 as pb

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

TOKENS = [(7 + 13 * i) % 900 + 3 for i in range(12)]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def sdk_env(tmp_path_factory, monkeypatch_module) -> None:
    monkeypatch_module.setenv("TINKER_API_KEY", "tml-test")
    monkeypatch_module.setenv("TINKER_TELEMETRY", "0")
    monkeypatch_module.setenv("HOME", str(tmp_path_factory.mktemp("home")))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, sdk_env) -> str:
    with eztinker.serve(data_dir=tmp_path_factory.mktemp("data"), models=[str(tiny_model_dir)]) as url:
        yield url


@pytest.fixture(scope="module")
def service_client(server: str):
    client = tinker.ServiceClient(base_url=server)
    client.get_server_capabilities()  # the REST holder first (see test_tinker_sdk.py)
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def training(service_client, tiny_model_dir):
    client = service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=0)
    datum = _datum(TOKENS)
    for _ in range(2):  # move away from B = 0 so every layer (the head included) shapes the output
        client.forward_backward([datum], "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    return client


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


# --- sampling extras ---------------------------------------------------------------------------------------


def test_topk_sample_and_prompt_logprobs(training) -> None:
    sampler = training.save_weights_and_get_sampling_client()
    prompt = types.ModelInput.from_ints(TOKENS[:6])
    full = sampler.compute_logprobs(prompt).result()
    out = sampler.sample(
        prompt,
        num_samples=2,
        sampling_params=types.SamplingParams(max_tokens=4, stop=[], seed=7),
        include_prompt_logprobs=True,
        topk_prompt_logprobs=3,
        topk_sample_logprobs=2,
        prompt_logprobs_last_n=2,
    ).result()
    # Only the last 2 prompt positions are scored; they equal compute_logprobs's.
    assert out.prompt_logprobs[:4] == [None] * 4
    assert out.prompt_logprobs[4:] == pytest.approx(full[4:], abs=1e-5)
    assert out.topk_prompt_logprobs[:4] == [None] * 4
    for row in out.topk_prompt_logprobs[4:]:
        assert len(row) == 3 and [lp for _, lp in row] == sorted((lp for _, lp in row), reverse=True)
    for seq in out.sequences:
        assert len(seq.topk_logprobs) == len(seq.tokens) == 4
        for token, logprob, top in zip(seq.tokens, seq.logprobs, seq.topk_logprobs, strict=True):
            assert len(top) == 2 and top[0][1] >= logprob - 1e-5  # nothing beats the top entry
            if token == top[0][0]:
                assert top[0][1] == pytest.approx(logprob, abs=1e-5)


def test_target_prompt_logprobs_dense_and_sparse(training) -> None:
    sampler = training.save_weights_and_get_sampling_client()
    prompt = TOKENS[:5]
    full = sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result()
    targets = [[prompt[i + 1], -1] for i in range(len(prompt) - 1)]  # column 0: the prompt's own tokens
    dense = types.TensorData(data=[t for row in targets for t in row], dtype="int64", shape=[len(targets), 2])
    out = sampler.sample(
        types.ModelInput.from_ints(prompt),
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=1),
        target_prompt_logprobs=dense,
    ).result()
    values = np.asarray(out.target_prompt_logprobs.data).reshape(len(targets), 2)
    assert values[:, 0] == pytest.approx(full[1:], abs=1e-5) and (values[:, 1] == 0.0).all()

    # CSR: only row 1 asks, for two ids; the answer has the same layout.
    sparse = types.TensorData(
        data=[prompt[2], 5],
        dtype="int64",
        shape=[len(targets), 2],
        sparse_crow_indices=[0, 0, 2, 2, 2],
        sparse_col_indices=[0, 1],
    )
    out = sampler.sample(
        types.ModelInput.from_ints(prompt),
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=1),
        target_prompt_logprobs=sparse,
    ).result()
    answer = out.target_prompt_logprobs
    assert answer.sparse_crow_indices == [0, 0, 2, 2, 2] and answer.sparse_col_indices == [0, 1]
    assert float(answer.data[0]) == pytest.approx(full[2], abs=1e-5)


def test_prompt_alt_tokens(training) -> None:
    sampler = training.save_weights_and_get_sampling_client()
    prompt = types.ModelInput.from_ints(TOKENS[:5])
    params = types.SamplingParams(max_tokens=2, seed=3)
    plain = sampler.sample(prompt, num_samples=1, sampling_params=params).result()
    out = sampler.sample(prompt, num_samples=1, sampling_params=params, prompt_alt_tokens_k=3).result()
    assert out.sequences[0].tokens == plain.sequences[0].tokens  # the draws never shift the samples
    alt = out.prompt_alt_tokens
    assert alt.tokens.shape == [4, 3] and alt.logprobs.shape == [4, 3]
    assert all(math.isfinite(x) and x < 0 for x in alt.logprobs.data)
    greedy = sampler.sample(
        prompt,
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=1, temperature=0.0),
        prompt_alt_tokens_k=2,
    ).result()
    rows = np.asarray(greedy.prompt_alt_tokens.tokens.data).reshape(4, 2)
    assert (rows[:, 0] == rows[:, 1]).all()  # temperature 0: every draw is the argmax


def test_bad_sampling_extras_fail_cleanly(training) -> None:
    sampler = training.save_weights_and_get_sampling_client()
    wrong = types.TensorData(data=[1, 2], dtype="int64", shape=[2, 1])  # the prompt has 5 tokens: 4 rows
    with pytest.raises(tinker.RequestFailedError, match="target_prompt_logprobs"):
        sampler.sample(
            types.ModelInput.from_ints(TOKENS[:5]),
            num_samples=1,
            sampling_params=types.SamplingParams(max_tokens=1),
            target_prompt_logprobs=wrong,
        ).result(timeout=30)


# --- train_unembed --------------------------------------------------------------------------------------


def test_train_unembed_adapts_the_head_and_loads_in_peft(
    server, service_client, training, tiny_model_dir
) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    rest = service_client.create_rest_client()
    saved = training.save_state("with-head").result().path
    assert rest.get_weights_info_by_tinker_path(saved).result().train_unembed is True
    with eztinker.EZTinkerClient(base_url=server) as native:
        checkpoint = next(c for c in native.get_checkpoints(training.model_id) if c.name == "with-head")
    adapter = Path(checkpoint.adapter_path)
    from safetensors.torch import load_file

    keys = load_file(adapter / "adapter_model.safetensors").keys()
    assert "base_model.model.lm_head.lora_B.weight" in keys

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([TOKENS[:-1]])).logits[0]
    peft_lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(TOKENS[1:])[:, None]).squeeze(-1)
    ours = training.forward([_datum(TOKENS)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
    assert peft_lp.tolist() == pytest.approx(ours, abs=1e-4)

    without = service_client.create_lora_training_client(
        base_model=str(tiny_model_dir), rank=4, train_unembed=False
    )
    path = without.save_state("no-head").result().path
    assert rest.get_weights_info_by_tinker_path(path).result().train_unembed is False


def test_lora_flags_select_layers_and_round_trip_through_weights_info(service_client, tiny_model_dir) -> None:
    """The flags choose layers by the engine's family knowledge; weights_info reports what was adapted."""
    rest = service_client.create_rest_client()
    mlp_only = service_client.create_lora_training_client(
        base_model=str(tiny_model_dir), rank=4, train_attn=False, train_unembed=False
    )
    info = rest.get_weights_info_by_tinker_path(mlp_only.save_state("mlp-only").result().path).result()
    assert (info.train_attn, info.train_mlp, info.train_unembed) == (False, True, False)


# --- ordering and retries (raw HTTP) ------------------------------------------------------------------------


def _fb_body(model_id: str, seq_id: int, tokens: list[int]) -> bytes:
    request = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy")
    datum = request.data.add()
    datum.model_input.add().encoded_text.tokens = np.asarray(tokens[:-1], dtype="<i4").tobytes()
    for name, values, dtype, np_dtype in (
        ("target_tokens", tokens[1:], pb.DTYPE_INT64, "<i8"),
        ("weights", [1.0] * (len(tokens) - 1), pb.DTYPE_FLOAT32, "<f4"),
    ):
        tensor = datum.loss_fn_inputs[name]
        tensor.dense, tensor.dtype = np.asarray(values, dtype=np_dtype).tobytes(), dtype
        tensor.shape.append(len(values))
    return request.SerializeToString()


def _result(http: httpx.Client, request_id: str, proto: bool = False) -> httpx.Response:
    headers = {"accept": "application/x-protobuf"} if proto else {}
    return http.post("/api/v1/retrieve_future", json={"request_id": request_id}, headers=headers, timeout=60)


@pytest.fixture
def raw_model(server, tiny_model_dir):
    """A model made over raw HTTP: (client, model id); its first op is seq_id 1."""
    http = httpx.Client(base_url=server, headers={"x-api-key": "tml-test"}, timeout=60)
    session = http.post("/api/v1/create_session", json={"tags": []}).json()["session_id"]
    body = {
        "session_id": session,
        "model_seq_id": 0,
        "base_model": str(tiny_model_dir),
        "lora_config": {"rank": 4},
    }
    created = http.post("/api/v1/create_model", json=body).json()
    again = http.post("/api/v1/create_model", json=body).json()  # an HTTP-layer retry
    assert again["request_id"] == created["request_id"]
    assert _result(http, created["request_id"]).json()["model_id"] == created["model_id"]
    yield http, created["model_id"]
    http.close()


def test_ops_apply_in_seq_id_order_not_arrival_order(raw_model) -> None:
    http, model_id = raw_model
    adam = {"learning_rate": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}
    # optim_step (seq 2) arrives first; it must wait for forward_backward (seq 1) and apply its gradients.
    step = http.post(
        "/api/v1/optim_step", json={"model_id": model_id, "seq_id": 2, "adam_params": adam}
    ).json()
    fb = http.post(
        "/api/v1/forward_backward",
        content=_fb_body(model_id, 1, TOKENS),
        headers={"content-type": "application/x-protobuf"},
    ).json()
    retried = http.post(
        "/api/v1/forward_backward",
        content=_fb_body(model_id, 1, TOKENS),
        headers={"content-type": "application/x-protobuf"},
    ).json()
    assert retried["request_id"] == fb["request_id"]  # idempotent: the same future, run once
    assert _result(http, fb["request_id"], proto=True).status_code == 200
    metrics = _result(http, step["request_id"]).json()["metrics"]
    assert metrics["grad_norm:mean"] > 0 and metrics["step:max"] == 1.0


def test_a_gap_in_seq_ids_is_waited_for_a_bounded_time(raw_model) -> None:
    http, model_id = raw_model
    adam = {"learning_rate": 1e-2}
    start = time.monotonic()
    step = http.post(
        "/api/v1/optim_step", json={"model_id": model_id, "seq_id": 3, "adam_params": adam}
    ).json()
    answer = _result(http, step["request_id"]).json()  # seq 1 and 2 never come
    assert "metrics" in answer and time.monotonic() - start < 10


def test_older_json_forward_backward_body(raw_model) -> None:
    http, model_id = raw_model
    datum = {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": TOKENS[:-1]}]},
        "loss_fn_inputs": {
            "target_tokens": {"data": TOKENS[1:], "dtype": "int64", "shape": [len(TOKENS) - 1]},
            "weights": {"data": [1.0] * (len(TOKENS) - 1), "dtype": "float32", "shape": [len(TOKENS) - 1]},
        },
    }
    body = {
        "model_id": model_id,
        "seq_id": 1,
        "forward_backward_input": {"data": [datum], "loss_fn": "cross_entropy"},
    }
    future = http.post("/api/v1/forward_backward", json=body).json()
    answer = _result(http, future["request_id"]).json()  # no protobuf Accept: the JSON result of SDK <= 0.24
    assert answer["loss_fn_outputs"][0]["logprobs"]["shape"] == [len(TOKENS) - 1]
    assert answer["metrics"]["loss:sum"] > 0
    proto = pb.ForwardBackwardOutput()
    proto.ParseFromString(_result(http, future["request_id"], proto=True).content)
    assert proto.metrics["loss:sum"] == pytest.approx(answer["metrics"]["loss:sum"])
    forward = http.post(
        "/api/v1/forward",
        json={"model_id": model_id, "seq_id": 2, "forward_input": body["forward_backward_input"]},
    )
    assert "loss:sum" in _result(http, forward.json()["request_id"]).json()["metrics"]


# --- external weights and sessions ------------------------------------------------------------------------


def test_save_weights_external_and_download_urls(service_client, training) -> None:
    saved = training.save_weights_external("export-1").result()
    assert saved.path == f"tinker://{training.model_id}/external_weights/export-1"
    rest = service_client.create_rest_client()
    urls = rest.get_external_weights_urls(saved.path).result()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(urls.urls)
    with urllib.request.urlopen(urls.urls["adapter_config.json"]) as answer:  # plain GET, no API key
        assert b"lora" in answer.read().lower()
    listed = rest.list_checkpoints(training.model_id).result().checkpoints
    assert any(c.checkpoint_type == "external" and c.tinker_path == saved.path for c in listed)
    forged = urls.urls["adapter_config.json"].replace("token=", "token=0")
    assert httpx.get(forged).status_code == 404


def test_list_and_get_sessions(service_client, training) -> None:
    rest = service_client.create_rest_client()
    session_id = training.model_id.split(":train:")[0]
    assert session_id in rest.list_sessions(limit=100).result().sessions
    session = rest.get_session(session_id).result()
    assert training.model_id in session.training_run_ids
    training.save_weights_and_get_sampling_client()
    assert rest.get_session(session_id).result().sampler_ids


# --- restarts -------------------------------------------------------------------------------------------


def test_state_survives_a_restart(tmp_path, tiny_model_dir, sdk_env) -> None:
    """Sessions, finished futures, checkpoint metadata and checkpoint sampling sessions outlive the process."""
    with eztinker.serve(data_dir=tmp_path, models=[str(tiny_model_dir)]) as url:
        client = tinker.ServiceClient(base_url=url)
        client.get_server_capabilities()
        training = client.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=0)
        session_id = training.model_id.split(":train:")[0]
        saved = training.save_weights_for_sampler("before").result().path
        sampler = client.create_sampling_client(model_path=saved)
        prompt = types.ModelInput.from_ints(TOKENS[:4])
        before = sampler.compute_logprobs(prompt).result()
        http = httpx.Client(base_url=url, headers={"x-api-key": "tml-test"}, timeout=60)
        fb = http.post(
            "/api/v1/forward_backward",
            content=_fb_body(training.model_id, 2, TOKENS),
            headers={"content-type": "application/x-protobuf"},
        ).json()["request_id"]
        assert _result(http, fb, proto=True).status_code == 200
        rest = client.create_rest_client()
        rest.publish_checkpoint_from_tinker_path(saved).result()
        (sampler_id,) = rest.get_session(session_id).result().sampler_ids
        client.close("success").result()

    with eztinker.serve(data_dir=tmp_path, models=[str(tiny_model_dir)]) as url:
        http = httpx.Client(base_url=url, headers={"x-api-key": "tml-test"}, timeout=60)
        answer = _result(http, fb, proto=True)  # a future from before the restart: its result, not a 410
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/x-protobuf"
        sessions = http.get("/api/v1/sessions", params={"limit": 100}).json()["sessions"]
        assert session_id in sessions
        checkpoints = http.get(f"/api/v1/training_runs/{training.model_id}/checkpoints").json()["checkpoints"]
        assert next(c for c in checkpoints if c["tinker_path"] == saved)["public"] is True
        sample = {
            "sampling_session_id": sampler_id,
            "seq_id": 99,
            "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": TOKENS[:4]}]},
            "sampling_params": {"max_tokens": 1},
            "prompt_logprobs": True,
        }
        future = http.post("/api/v1/asample", json=sample).json()["request_id"]
        response = pb.SampleResponse()
        response.ParseFromString(_result(http, future, proto=True).content)
        after = np.frombuffer(response.prompt_logprobs, dtype="<f4")
        assert after[1:].tolist() == pytest.approx(before[1:], abs=1e-5)


def test_user_metadata_is_kept_on_runs_and_checkpoints(server, service_client, tiny_model_dir) -> None:
    """`user_metadata` of create_model, save_state and save_weights_for_sampler comes back from
    get_training_run, the checkpoint listings and weights_info (the cookbook keeps its renderer there)."""
    run_meta = {"renderer_name": "qwen3", "wandb_link": "https://example.invalid/run"}
    client = service_client.create_lora_training_client(
        base_model=str(tiny_model_dir), rank=2, user_metadata=run_meta
    )
    state = client.save_state("meta-state", user_metadata={"step": "0", "note": "first"}).result().path
    sampler = client.save_weights_for_sampler("meta-sampler", user_metadata={"kind": "eval"}).result().path
    rest = service_client.create_rest_client()
    run_id = client.get_info().model_id
    assert rest.get_training_run(run_id).result().user_metadata == run_meta
    assert rest.get_training_run_by_tinker_path(state).result().user_metadata == run_meta
    listed = {c.tinker_path: c.user_metadata for c in rest.list_checkpoints(run_id).result().checkpoints}
    assert listed == {state: {"step": "0", "note": "first"}, sampler: {"kind": "eval"}}
    everything = rest.list_user_checkpoints(limit=1000).result().checkpoints
    assert {c.tinker_path: c.user_metadata for c in everything}[state] == {"step": "0", "note": "first"}
    info = httpx.post(
        f"{server}/api/v1/weights_info", json={"tinker_path": state}, headers={"X-API-Key": "tml-test"}
    )
    assert info.json()["user_metadata"] == {"step": "0", "note": "first"}
