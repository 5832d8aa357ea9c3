"""The server through the real client: the user's API as written in the seed, futures, errors, auth."""

from __future__ import annotations

import sqlite3
import sys
import textwrap
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

import eztinker
from eztinker import EZTinkerClient, LossFunctionConfig
from eztinker.api import create_app
from eztinker.exceptions import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    JobFailedError,
    NotFoundError,
    ValidationError,
)
from eztinker.service import Service
from eztinker.settings import Settings


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir) -> str:
    data_dir = tmp_path_factory.mktemp("server-data")
    with eztinker.serve(data_dir=data_dir, models=[str(tiny_model_dir)]) as url:
        yield url


@pytest.fixture
def client(server: str):
    with EZTinkerClient(base_url=server) as client:
        yield client


def ids(n: int, start: int = 7) -> list[int]:
    return [(start + 13 * i) % 900 + 3 for i in range(n)]


# --- the seed's examples, verbatim but for the model ---------------------------------------------------------


def test_the_seed_quick_start_works(client: EZTinkerClient, tiny_model_dir, tiny_model_dirs) -> None:
    health = client.health()
    assert health.status == "ok" and str(tiny_model_dir) in health.loaded_models
    run_id = client.create_run(
        base_model=str(tiny_model_dir),
        lora_config={"r": 1, "lora_alpha": 2, "lora_dropout": 0.05},
    )  # default loss: cross_entropy
    run_id = client.create_run(
        base_model=str(tiny_model_dirs["gpt2"]),
        lora_config={"r": 8},
        loss_config=LossFunctionConfig(loss_type="focal_loss", focal_alpha=0.3, focal_gamma=2.5),
    )
    text = client.sample("Hello world", max_new_tokens=50, temperature=0.8)
    reply = client.sample([{"role": "user", "content": "Hi"}], presence_penalty=0.5)
    runs = client.get_runs()
    assert isinstance(text, str) and isinstance(reply, str)
    focal = next(r for r in runs if r.run_id == run_id)
    assert focal.loss_config.loss_type == "focal_loss"
    assert focal.loss_config.params == {"focal_alpha": 0.3, "focal_gamma": 2.5}


def test_the_seed_training_loop_and_checkpoint_work(client: EZTinkerClient, tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    run_id = client.create_run(base_model=str(tiny_model_dir), lora_config={"r": 8})
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    input_ids = tokenizer("This is a training example")["input_ids"]
    for step in range(10):
        fb_response = client.forward_backward(run_id, input_ids=input_ids, target_ids=input_ids)
        job_id = fb_response["job_id"]
        optim_response = client.optim_step(run_id, learning_rate=2e-2, weight_decay=0.01)
        assert job_id.startswith("job-") and optim_response["status"] in ("queued", "running", "completed")
    optim_response.result()

    history = client.get_metrics(run_id).history
    assert [m.step for m in history] == list(range(1, 11))
    assert history[-1].loss < history[0].loss
    save_response = client.save_checkpoint(run_id, name="checkpoint_v1")
    assert save_response["status"] == "completed"
    assert save_response["adapter_path"].endswith(f"checkpoints/{run_id}/checkpoint_v1")
    assert save_response["optimizer_path"].startswith(save_response["adapter_path"])
    assert [c.name for c in client.get_checkpoints(run_id)] == ["checkpoint_v1"]


def test_the_seed_custom_loss_works_in_process(client: EZTinkerClient, tiny_model_dir) -> None:
    from eztinker.engine import get_loss_function, register_loss_function

    def my_custom_loss(logits, labels, weights=None, *, temperature: float = 1.0, **kwargs) -> torch.Tensor:
        shift_logits = logits[:, :-1, :].contiguous() / temperature
        shift_labels = labels[:, 1:].contiguous()
        return torch.nn.functional.cross_entropy(
            shift_logits.view(-1, shift_logits.size(-1)),
            shift_labels.view(-1),
            ignore_index=kwargs.get("ignore_index", -100),
        )

    register_loss_function("temperature_scaled", my_custom_loss)
    assert get_loss_function("temperature_scaled") is my_custom_loss
    run_id = client.create_run(
        base_model=str(tiny_model_dir),
        loss_config=LossFunctionConfig(loss_type="temperature_scaled", temperature=2.0),
    )
    out = client.forward_backward(run_id, input_ids=ids(12), target_ids=ids(12)).result()
    assert out["loss"] > 0


# --- futures -------------------------------------------------------------------------------------------------


def test_ops_answer_at_once_and_run_in_submission_order(client: EZTinkerClient, tiny_model_dir) -> None:
    run_id = client.create_run(base_model=str(tiny_model_dir), lora_config={"r": 2})
    futures = []
    for _ in range(5):
        futures.append(client.forward_backward(run_id, input_ids=[ids(20), ids(9, 3)]))
        futures.append(client.optim_step(run_id, learning_rate=1e-2))
    results = [f.result(timeout=60) for f in futures]
    steps = [r["step"] for r in results[1::2]]
    assert steps == [1, 2, 3, 4, 5]
    jobs = [client.get_job(f.job_id) for f in futures]
    assert all(j.status == "completed" for j in jobs)
    starts = [j.started_at for j in jobs]
    assert starts == sorted(starts)


def test_a_failed_job_reports_its_message_and_the_run_keeps_working(
    client: EZTinkerClient, tiny_model_dir
) -> None:
    from eztinker.engine import register_loss_function

    def explodes(logits, labels, weights=None, **kwargs):
        raise ValueError("this loss always fails")

    register_loss_function("explodes", explodes)
    run_id = client.create_run(base_model=str(tiny_model_dir), lora_config={"r": 2})
    client.forward_backward(run_id, input_ids=ids(8)).result()
    failing = client.forward_backward(
        run_id, input_ids=ids(8), loss_config=LossFunctionConfig(loss_type="explodes")
    )
    with pytest.raises(JobFailedError, match="this loss always fails") as info:
        failing.result()
    assert info.value.job.error_category == "server" and failing["status"] == "failed"
    assert client.optim_step(run_id, learning_rate=1e-3).result()["step"] == 1


# --- errors name the field -----------------------------------------------------------------------------------


def test_bad_requests_get_a_4xx_naming_the_field(client: EZTinkerClient, server: str, tiny_model_dir) -> None:
    run_id = client.create_run(base_model=str(tiny_model_dir), lora_config={"r": 2}, run_id="errors-run")
    with pytest.raises(ValidationError) as info:
        client.forward_backward(run_id, input_ids=[1, 2, 5000])
    assert "data[0]" in str(info.value) and "vocabulary" in str(info.value)
    with pytest.raises(InvalidRequestError, match="lora_config.r"):  # refused before sending
        client.create_run(base_model=str(tiny_model_dir), lora_config={"r": 0})
    with pytest.raises(ValidationError, match="cross_entropy.*register_loss_function|register_loss_function"):
        client.create_run(base_model=str(tiny_model_dir), loss_config=LossFunctionConfig(loss_type="nope"))
    with pytest.raises(NotFoundError):
        client.get_run("no-such-run")
    with pytest.raises(NotFoundError):
        client.forward_backward("no-such-run", input_ids=[1, 2])
    with pytest.raises(ConflictError, match="errors-run"):
        client.create_run(base_model=str(tiny_model_dir), run_id="errors-run")
    client.save_checkpoint(run_id, "dup")
    with pytest.raises(ConflictError, match="dup"):
        client.save_checkpoint(run_id, "dup")
    with pytest.raises(InvalidRequestError, match="learning_rate"):
        client.optim_step(run_id, learning_rate=-1.0)
    raw = httpx.post(f"{server}/v1/runs/{run_id}/optim_step", json={"learning_rate": -1})  # and by the server
    assert raw.status_code == 422 and raw.json()["field"] == "learning_rate"
    with pytest.raises(ValidationError) as info:
        client.forward_backward(run_id, input_ids=[1, 2, 3], target_ids=[1, 2])
    assert info.value.field == "data[0].target_ids"
    # Malformed JSON and wrong types are 422s with a field, never 500s.
    raw = httpx.post(f"{server}/v1/runs/{run_id}/forward_backward", content=b"{not json")
    assert raw.status_code == 422
    raw = httpx.post(f"{server}/v1/runs/{run_id}/forward_backward", json={"data": [{"input_ids": "abc"}]})
    assert raw.status_code == 422 and raw.json()["field"].startswith("data")
    raw = httpx.post(f"{server}/v1/runs/{run_id}/sample", json={"prompt": "x", "temperature": -1})
    assert raw.status_code == 422 and raw.json()["field"] == "temperature"


# --- server surface ------------------------------------------------------------------------------------------


def test_health_metrics_and_docs(server: str, client: EZTinkerClient) -> None:
    health = httpx.get(f"{server}/health").json()
    assert set(health) >= {"status", "version", "device", "loaded_models", "queue_depth"}
    metrics = httpx.get(f"{server}/metrics").text
    assert "eztinker_ops_total" in metrics and "eztinker_queue_depth" in metrics
    assert httpx.get(f"{server}/docs").status_code == 200
    assert "/v1/runs/{run_id}/forward_backward" in httpx.get(f"{server}/openapi.json").json()["paths"]


def test_checkpoints_load_delete_and_download(client: EZTinkerClient, tiny_model_dir, tmp_path) -> None:
    run_id = client.create_run(base_model=str(tiny_model_dir), lora_config={"r": 4})
    client.forward_backward(run_id, input_ids=ids(16))
    client.optim_step(run_id, learning_rate=5e-2).result()
    client.save_checkpoint(run_id, "after-1")
    before = client.forward(run_id, input_ids=ids(16)).result()["loss"]
    client.forward_backward(run_id, input_ids=ids(16))
    client.optim_step(run_id, learning_rate=5e-2).result()
    assert client.forward(run_id, input_ids=ids(16)).result()["loss"] != before
    run = client.load_checkpoint(run_id, "after-1")
    assert run.step == 1
    assert client.forward(run_id, input_ids=ids(16)).result()["loss"] == before
    # Another run can start from it.
    copy = client.create_run(
        base_model=str(tiny_model_dir), from_checkpoint={"run_id": run_id, "name": "after-1"}
    )
    assert client.forward(copy, input_ids=ids(16)).result()["loss"] == before
    out = client.download_checkpoint(run_id, "after-1", tmp_path / "export")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    client.delete_checkpoint(run_id, "after-1")
    assert client.get_checkpoints(run_id) == []
    client.delete_run(copy)
    with pytest.raises(NotFoundError):
        client.get_run(copy)


def test_forward_backward_custom_sends_the_loss_gradient(client: EZTinkerClient, tiny_model_dir) -> None:
    run_id = client.create_run(base_model=str(tiny_model_dir), lora_config={"r": 2})
    tokens = ids(10)
    data = [{"tokens": tokens[:-1], "loss_inputs": {"target_tokens": tokens[1:]}}]

    def squared_logprob_loss(data, logprobs):
        loss = sum((lp**2).sum() for lp in logprobs)
        return loss, {"sq:sum": loss.item()}

    result = client.forward_backward_custom(run_id, data, squared_logprob_loss).result()
    assert result["loss"] > 0 and "sq:sum" in result["metrics"]
    assert client.optim_step(run_id, learning_rate=1e-2).result()["grad_norm"] > 0


# --- plugins and API keys ------------------------------------------------------------------------------------


def test_a_plugin_registers_losses_for_a_remote_style_server(tmp_path, tiny_model_dir, monkeypatch) -> None:
    (tmp_path / "my_losses.py").write_text(
        textwrap.dedent(
            """
            import torch
            from eztinker.engine import register_loss_function

            def doubled(logits, labels, weights=None, *, factor=2.0, **kwargs):
                shift = logits[:, :-1].reshape(-1, logits.size(-1))
                return factor * torch.nn.functional.cross_entropy(shift, labels[:, 1:].reshape(-1), ignore_index=-100)

            register_loss_function("doubled_ce", doubled)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with (
        eztinker.serve(data_dir=tmp_path / "data", plugins=["my_losses"]) as url,
        EZTinkerClient(base_url=url) as c,
    ):
        plain = c.create_run(str(tiny_model_dir), lora_config={"r": 2, "seed": 1})
        doubled = c.create_run(
            str(tiny_model_dir),
            lora_config={"r": 2, "seed": 1},
            loss_config=LossFunctionConfig(loss_type="doubled_ce", factor=3.0),
        )
        a = c.forward(plain, input_ids=ids(12)).result()["loss"]
        b = c.forward(doubled, input_ids=ids(12)).result()["loss"]
        assert b == pytest.approx(3 * a, rel=1e-5)
    sys.modules.pop("my_losses", None)


def test_api_keys_isolate_owners_and_are_stored_hashed(tmp_path, tiny_model_dir) -> None:
    keys = ["alice-secret-key", "bob-secret-key"]
    with eztinker.serve(data_dir=tmp_path, api_keys=keys) as url:
        assert httpx.get(f"{url}/health").status_code == 200  # health needs no key
        with pytest.raises(AuthenticationError):
            EZTinkerClient(base_url=url, api_key=None).get_runs()
        with pytest.raises(AuthenticationError):
            EZTinkerClient(base_url=url, api_key="wrong").get_runs()
        alice = EZTinkerClient(base_url=url, api_key=keys[0])
        bob = EZTinkerClient(base_url=url, api_key=keys[1])
        run_id = alice.create_run(str(tiny_model_dir), lora_config={"r": 2})
        alice.save_checkpoint(run_id, "mine")
        assert [r.run_id for r in alice.get_runs()] == [run_id]
        assert bob.get_runs() == []
        with pytest.raises(NotFoundError):
            bob.get_run(run_id)
        with pytest.raises(NotFoundError):
            bob.forward_backward(run_id, input_ids=ids(5))
        with pytest.raises(NotFoundError):
            bob.get_checkpoints(run_id)
        bearer = httpx.get(f"{url}/v1/runs", headers={"Authorization": f"Bearer {keys[0]}"})
        assert [r["run_id"] for r in bearer.json()] == [run_id]
        alice.close()
        bob.close()
    db = sqlite3.connect(tmp_path / "eztinker.db")
    dump = "\n".join(db.iterdump())
    assert keys[0] not in dump and keys[1] not in dump


def test_the_server_never_blocks_health_while_training(
    client: EZTinkerClient, server: str, tiny_model_dir
) -> None:
    run_id = client.create_run(base_model=str(tiny_model_dir), lora_config={"r": 8})
    futures = [client.forward_backward(run_id, input_ids=[ids(200, s) for s in range(8)]) for _ in range(5)]
    start = time.perf_counter()
    assert httpx.get(f"{server}/health").status_code == 200
    assert time.perf_counter() - start < 2.0
    for f in futures:
        f.result(timeout=120)


def test_a_bug_of_ours_is_still_answered_as_json(tmp_path, monkeypatch) -> None:
    """An exception no error class names (a server bug) is a 500 in the native error shape, category
    server, saying what went wrong — not Starlette's plain-text page that no client can parse."""
    service = Service(Settings(data_dir=tmp_path))

    def broken(*args, **kwargs):
        raise RuntimeError("the views broke")

    monkeypatch.setattr(service.views, "health", broken)
    with TestClient(create_app(service=service), raise_server_exceptions=False) as http:
        answer = http.get("/health")
    assert answer.status_code == 500
    assert answer.json() == {"error": "internal error: RuntimeError: the views broke", "category": "server"}
