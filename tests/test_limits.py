"""Limits and paths: every limit is configurable and answered with a clear 413 / 422 / 429; no traversal."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from eztinker.api import create_app
from eztinker.service import Service
from eztinker.settings import Settings

KEY_A, KEY_B = {"X-API-Key": "key-a"}, {"X-API-Key": "key-b"}
TOKENS = [(7 + 13 * i) % 900 + 3 for i in range(12)]


@pytest.fixture
def limited(tmp_path, tiny_model_dir):
    settings = Settings(
        data_dir=tmp_path,
        models=[str(tiny_model_dir)],
        api_keys=["key-a", "key-b"],
        max_body_bytes=4096,
        max_tokens_per_op=40,
        max_runs_per_key=2,
        max_jobs_per_key=2,
        max_sequence_tokens=32,
        max_samples=2,
    )
    service = Service(settings)
    with TestClient(create_app(service=service)) as http:
        yield http, service, str(tiny_model_dir)


def create_run(http: TestClient, model: str, headers: dict) -> str:
    response = http.post("/v1/runs", json={"base_model": model, "lora_config": {"r": 2}}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()["run_id"]


def test_a_body_over_the_limit_gets_413_before_it_is_read(limited) -> None:
    http, _, model = limited
    run_id = create_run(http, model, KEY_A)
    big = {"data": [{"input_ids": list(range(3, 2000))}]}
    response = http.post(f"/v1/runs/{run_id}/forward_backward", json=big, headers=KEY_A)
    assert response.status_code == 413
    assert "at most 4096 bytes" in response.json()["error"] and response.json()["field"] == "body"

    def chunks():  # no Content-Length: counted as it streams
        yield b'{"data": [{"input_ids": ['
        for _ in range(2000):
            yield b"5, "
        yield b"5]}]}"

    streamed = http.post(
        f"/v1/runs/{run_id}/forward_backward",
        content=chunks(),
        headers={**KEY_A, "content-type": "application/json"},
    )
    assert streamed.status_code == 413
    # On the OpenAI and Anthropic routes the 413 is those APIs' error object, so their SDKs read it.
    long_chat = {"model": model, "messages": [{"role": "user", "content": "x" * 5000}]}
    openai_413 = http.post("/v1/chat/completions", json=long_chat, headers=KEY_A)
    assert openai_413.status_code == 413 and "at most 4096 bytes" in openai_413.json()["error"]["message"]
    anthropic_413 = http.post(
        "/anthropic/api/v1/messages", json={**long_chat, "max_tokens": 1}, headers=KEY_A
    )
    assert anthropic_413.status_code == 413 and anthropic_413.json()["error"]["type"] == "request_too_large"


def test_too_many_tokens_in_one_op_gets_422_naming_data(limited) -> None:
    http, _, model = limited
    run_id = create_run(http, model, KEY_A)
    response = http.post(
        f"/v1/runs/{run_id}/forward_backward", json={"data": [{"input_ids": TOKENS}] * 4}, headers=KEY_A
    )
    assert response.status_code == 422
    assert response.json()["field"] == "data" and "at most 40" in response.json()["error"]


def test_a_sequence_over_the_limit_gets_422_naming_it(limited) -> None:
    http, _, model = limited
    run_id = create_run(http, model, KEY_A)
    long = list(range(3, 38))  # 35 tokens
    response = http.post(
        f"/v1/runs/{run_id}/forward_backward",
        json={"data": [{"input_ids": TOKENS}, {"input_ids": long}]},
        headers=KEY_A,
    )
    assert response.status_code == 422
    assert response.json()["field"] == "data[1].input_ids" and "at most 32" in response.json()["error"]

    sample = {"base_model": model, "prompt_tokens": long[:20], "max_new_tokens": 20}
    response = http.post("/v1/sample", json=sample, headers=KEY_A)
    assert response.status_code == 422
    assert response.json()["field"] == "prompt" and "make 40" in response.json()["error"]

    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}
    response = http.post("/v1/chat/completions", json=chat, headers=KEY_A)
    assert 400 <= response.status_code < 500
    assert (
        response.json()["error"]["param"] == "messages"
        and "at most 32" in response.json()["error"]["message"]
    )


def test_more_samples_than_the_limit_get_422_naming_n(limited) -> None:
    http, _, model = limited
    response = http.post(
        "/v1/sample", json={"base_model": model, "prompt_tokens": TOKENS, "n": 3}, headers=KEY_A
    )
    assert response.status_code == 422
    assert response.json()["field"] == "n" and "at most 2" in response.json()["error"]

    completion = {"model": model, "prompt": "hi", "max_tokens": 4, "n": 3}
    response = http.post("/v1/completions", json=completion, headers=KEY_A)
    assert 400 <= response.status_code < 500 and response.json()["error"]["param"] == "n"
    completion["n"] = 2
    assert http.post("/v1/completions", json=completion, headers=KEY_A).status_code == 200
    # Checked before anything is made per sample: a huge count is refused at once, not after building it.
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "n": 2**40}
    response = http.post("/v1/chat/completions", json=chat, headers=KEY_A)
    assert 400 <= response.status_code < 500 and response.json()["error"]["param"] == "n"
    session = http.post("/api/v1/create_session", json={}, headers=KEY_A).json()["session_id"]
    sampler = http.post(
        "/api/v1/create_sampling_session", json={"session_id": session, "base_model": model}, headers=KEY_A
    ).json()["sampling_session_id"]
    prompt = {"chunks": [{"type": "encoded_text", "tokens": TOKENS}]}
    body = {"sampling_session_id": sampler, "num_samples": 10**12, "prompt": prompt}
    response = http.post("/api/v1/asample", json=body, headers=KEY_A)
    assert response.status_code == 422 and response.json()["field"] == "num_samples"


def test_a_key_may_hold_only_so_many_live_runs(limited) -> None:
    http, _, model = limited
    first = create_run(http, model, KEY_A)
    create_run(http, model, KEY_A)
    refused = http.post("/v1/runs", json={"base_model": model}, headers=KEY_A)
    assert refused.status_code == 429
    assert "2 live runs" in refused.json()["error"]
    create_run(http, model, KEY_B)  # another key is not affected
    assert http.delete(f"/v1/runs/{first}", headers=KEY_A).status_code == 204
    create_run(http, model, KEY_A)  # deleting one frees a place


def test_a_key_may_have_only_so_many_jobs_in_flight(limited) -> None:
    http, service, model = limited
    run_a, run_b = create_run(http, model, KEY_A), create_run(http, model, KEY_B)
    release = threading.Event()
    service.submit("hold", None, lambda: release.wait(10) and {}, None)
    body = {"data": [{"input_ids": TOKENS}]}
    accepted = [http.post(f"/v1/runs/{run_a}/forward_backward", json=body, headers=KEY_A) for _ in range(2)]
    refused = http.post(f"/v1/runs/{run_a}/forward_backward", json=body, headers=KEY_A)
    other_key = http.post(f"/v1/runs/{run_b}/forward_backward", json=body, headers=KEY_B)
    release.set()
    assert [r.status_code for r in accepted] == [202, 202]
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert "2 jobs queued or running" in refused.json()["error"]
    assert other_key.status_code == 202
    for response in accepted:
        job = http.get(f"/v1/jobs/{response.json()['job_id']}?wait=10", headers=KEY_A).json()
        assert job["status"] == "completed"
    again = http.post(f"/v1/runs/{run_a}/forward_backward", json=body, headers=KEY_A)
    assert again.status_code == 202  # finished jobs free their places


@pytest.mark.parametrize(
    "path",
    [
        "/v1/runs/..%2F..%2Fetc/checkpoints",
        "/v1/runs/../../etc/checkpoints",
        "/v1/runs/%2E%2E/checkpoints/%2E%2E%2F%2E%2E%2Feztinker.db/archive",
        "/v1/runs/x/checkpoints/..%2F..%2F..%2Fetc%2Fpasswd/archive",
    ],
)
def test_paths_never_reach_outside_the_data_dir(limited, path: str) -> None:
    http, _, _ = limited
    response = http.get(path, headers=KEY_A)
    assert response.status_code in (404, 422)
    assert "root:" not in response.text


def test_run_ids_and_checkpoint_names_are_validated(limited) -> None:
    http, _, model = limited
    bad_run = http.post("/v1/runs", json={"base_model": model, "run_id": "../escape"}, headers=KEY_A)
    assert bad_run.status_code == 422 and bad_run.json()["field"] == "run_id"
    run_id = create_run(http, model, KEY_A)
    bad_name = http.post(f"/v1/runs/{run_id}/save", json={"name": "../../evil"}, headers=KEY_A)
    assert bad_name.status_code == 422 and bad_name.json()["field"] == "name"


def test_text_that_is_not_unicode_is_refused_naming_its_field_on_every_route(limited) -> None:
    """A lone UTF-16 surrogate is valid JSON but no character (no tokenizer takes it): a 4xx in the
    route's own error shape, naming the field; an escaped emoji (a surrogate pair) is text as usual."""
    http, _, model = limited
    lone = '"\\ud800"'
    cases = {
        "/v1/chat/completions": (
            f'{{"model": "{model}", "max_tokens": 1, "messages": [{{"role": "user", "content": {lone}}}]}}',
            "messages[0].content",
        ),
        "/v1/completions": (f'{{"model": "{model}", "max_tokens": 1, "prompt": {lone}}}', "prompt"),
        "/anthropic/api/v1/messages": (
            f'{{"model": "{model}", "max_tokens": 1, "messages": [{{"role": "user", "content": {lone}}}]}}',
            "messages[0].content",
        ),
        "/v1/runs": (f'{{"base_model": "{model}", "name": {lone}}}', "name"),
    }
    headers = {**KEY_A, "content-type": "application/json"}
    for path, (body, field) in cases.items():
        response = http.post(path, content=body, headers=headers)
        assert 400 <= response.status_code < 500 and field in response.text, (path, response.text)
        assert "surrogate" in response.text
    emoji = f'{{"model": "{model}", "max_tokens": 1, "prompt": "\\ud83d\\ude00"}}'
    assert http.post("/v1/completions", content=emoji, headers=headers).status_code == 200
