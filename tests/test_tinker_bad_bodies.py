"""Every JSON Tinker route answers a wrong type, a NaN or an out-of-range value with a 4xx (or a future
that fails as a user error) naming the field — never a 5xx, which the SDK retries for minutes — and the
run is exactly as before.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest

import eztinker

KEY = "tml-bad-bodies"
HEADERS = {"X-API-Key": KEY, "content-type": "application/json"}
NAN = math.nan
TOKENS = [5, 9, 14, 3, 7, 11]


def _send(url: str, method: str, path: str, body: Any) -> httpx.Response:
    content = json.dumps(body)  # json.dumps writes NaN as the SDK's encoder does; httpx refuses to
    return httpx.request(method, f"{url}{path}", content=content, headers=HEADERS, timeout=60)


def _outcome(url: str, response: httpx.Response) -> tuple[int, str]:
    """(status, error text): a future's status is its settled answer's (200 + error -> 400)."""
    if response.status_code == 200 and "request_id" in response.json():
        request_id = response.json()["request_id"]
        for _ in range(40):
            answer = _send(url, "POST", "/api/v1/retrieve_future", {"request_id": request_id})
            if answer.status_code >= 500:
                return answer.status_code, answer.text
            settled = answer.json()
            if settled.get("type") != "try_again":
                break
        if "error" in settled:
            return (400 if settled["category"] == "user" else 500), settled["error"]
        return 200, ""
    return response.status_code, response.text


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    with eztinker.serve(
        data_dir=tmp_path_factory.mktemp("bad-bodies"), models=[str(tiny_model_dir)], api_keys=[KEY]
    ) as url:
        session_id = _send(url, "POST", "/api/v1/create_session", {"tags": []}).json()["session_id"]
        created = _send(
            url,
            "POST",
            "/api/v1/create_model",
            {
                "session_id": session_id,
                "model_seq_id": 0,
                "base_model": str(tiny_model_dir),
                "lora_config": {"rank": 2},
            },
        )
        assert _outcome(url, created)[0] == 200
        model_id = created.json()["model_id"]
        kept = {"model_id": model_id, "path": "kept"}  # a checkpoint to copy (into a taken model id)
        assert _outcome(url, _send(url, "POST", "/api/v1/save_weights", kept))[0] == 200
        made = {"session_id": session_id, "base_model": str(tiny_model_dir)}
        sampler = _send(url, "POST", "/api/v1/create_sampling_session", made).json()["sampling_session_id"]
        yield url, str(tiny_model_dir), session_id, model_id, sampler


def _bad_bodies(model: str, session_id: str, model_id: str, sampler: str) -> list[tuple[str, str, Any, str]]:
    """(method, path, body, the field the answer must name)."""
    prompt = {"chunks": [{"type": "encoded_text", "tokens": TOKENS}]}
    seq = iter(range(1, 100))  # each its own request: a resend (same seq_id) would get the first's answer

    def sample() -> dict[str, Any]:
        return {"sampling_session_id": sampler, "seq_id": next(seq), "sampling_params": {"max_tokens": 1}}

    rows = len(TOKENS) - 1
    targets = {"shape": [rows, 1], "dtype": "int64"}
    sparse_k = {
        "shape": [rows, 10**13],
        "data": [1],
        "sparse_crow_indices": [0] + [1] * rows,
        "sparse_col_indices": [0],
    }
    return [
        *[
            (
                "POST",
                "/api/v1/asample",
                {**sample(), "prompt": {"chunks": [{"tokens": t}]}},
                "prompt.chunks[0].tokens",
            )
            for t in (None, ["abc"], [[1]], [1.5], [2**70])
        ],
        *[
            (
                "POST",
                "/api/v1/asample",
                {**sample(), "prompt": prompt, "target_prompt_logprobs": t},
                "target_prompt_logprobs",
            )
            for t in (
                "x",
                [1, 2],
                {**targets, "shape": ["a", "b"]},
                {**targets, "data": ["x"] * rows},
                {**targets, "data": [2**70] * rows},
                {**targets, "shape": [rows + 1, 1], "data": [1] * (rows + 1)},  # a row too many
                sparse_k,  # K beyond the top-k bound: never made dense
                {**targets, "data": [1], "sparse_crow_indices": "ab", "sparse_col_indices": [0]},
                {
                    **targets,
                    "data": [1],
                    "sparse_crow_indices": [0, 1, 1],
                    "sparse_col_indices": [0],
                },  # rows wrong
            )
        ],
        ("POST", "/api/v1/create_session", {"tags": "not-a-list"}, "tags"),
        ("POST", "/api/v1/create_session", {"user_metadata": [1, 2]}, "user_metadata"),
        ("POST", f"/api/v1/sessions/{session_id}/finish", {"reason": "done"}, "reason"),
        ("PUT", f"/api/v1/sessions/{session_id}/project", {"project_id": {"a": 1}}, "project_id"),
        (
            "POST",
            "/api/v1/create_model",
            {"session_id": session_id, "base_model": model, "model_seq_id": "x"},
            "model_seq_id",
        ),
        (
            "POST",
            "/api/v1/create_model",
            {"session_id": session_id, "base_model": model, "model_seq_id": -1},
            "model_seq_id",
        ),
        (
            "POST",
            "/api/v1/create_model",
            {"session_id": session_id, "base_model": model, "lora_config": {"rank": 0}},
            "rank",
        ),
        (
            "POST",
            "/api/v1/create_model",
            {"session_id": session_id, "base_model": model, "lora_config": {"rank": "big"}},
            "rank",
        ),
        ("POST", "/api/v1/create_model", {"session_id": session_id, "model_seq_id": 9}, "base_model"),
        ("POST", "/api/v1/get_info", {"model_id": ["x"]}, "model_id"),
        (
            "POST",
            "/api/v1/optim_step",
            {"model_id": model_id, "adam_params": {"learning_rate": NAN}},
            "learning_rate",
        ),
        (
            "POST",
            "/api/v1/optim_step",
            {"model_id": model_id, "adam_params": {"learning_rate": -1.0}},
            "learning_rate",
        ),
        (
            "POST",
            "/api/v1/optim_step",
            {"model_id": model_id, "adam_params": {"beta1": 1.5}},
            "beta1",
        ),
        (
            "POST",
            "/api/v1/optim_step",
            {"model_id": model_id, "adam_params": {"eps": "tiny"}},
            "eps",
        ),
        (
            "POST",
            "/api/v1/optim_step",
            {"model_id": model_id, "seq_id": "first", "adam_params": {}},
            "seq_id",
        ),
        (
            "POST",
            "/api/v1/save_weights",
            {"model_id": model_id, "path": "a", "ttl_seconds": "soon"},
            "ttl_seconds",
        ),
        (
            "POST",
            "/api/v1/save_weights",
            {"model_id": model_id, "path": "a", "ttl_seconds": 5},
            "ttl_seconds",
        ),
        (
            "POST",
            "/api/v1/save_weights_for_sampler",
            {"model_id": model_id, "sampling_session_seq_id": -3},
            "sampling_session_seq_id",
        ),
        (
            "POST",
            "/api/v1/save_weights_for_sampler",
            {"model_id": model_id, "kind": "forever"},
            "kind",
        ),
        (
            "POST",
            "/api/v1/save_weights_external",
            {"model_id": model_id, "path": "e", "age_encryption_recipients": "age1"},
            "age_encryption_recipients",
        ),
        (  # beyond what a torch generator takes: was an "internal error" of category "server"
            "POST",
            "/api/v1/create_model",
            {
                "session_id": session_id,
                "model_seq_id": 7,
                "base_model": model,
                "lora_config": {"seed": 10**30},
            },
            "lora_config.seed",
        ),
        ("POST", "/api/v1/load_weights", {"model_id": model_id, "path": 7}, "path"),
        ("POST", "/api/v1/load_weights", {"model_id": model_id, "seq_id": 1}, "path"),
        (
            "POST",
            "/api/v1/load_weights",
            {"session_id": session_id, "model_seq_id": "one", "path": "tinker://x/weights/y"},
            "model_seq_id",
        ),
        (
            "POST",
            "/api/v1/create_sampling_session",
            {"session_id": session_id, "sampling_session_seq_id": "z"},
            "sampling_session_seq_id",
        ),
        (
            "POST",
            "/api/v1/asample",
            {"sampling_session_id": "s", "prompt": prompt, "num_samples": 0},
            "num_samples",
        ),
        (
            "POST",
            "/api/v1/asample",
            {"sampling_session_id": "s", "prompt": prompt, "sampling_params": {"temperature": NAN}},
            "temperature",
        ),
        (
            "POST",
            "/api/v1/asample",
            {"sampling_session_id": "s", "prompt": prompt, "sampling_params": {"top_p": 2}},
            "top_p",
        ),
        (
            "POST",
            "/api/v1/asample",
            {"sampling_session_id": "s", "prompt": prompt, "sampling_params": {"max_tokens": -5}},
            "max_tokens",
        ),
        ("POST", "/api/v1/asample", {"sampling_session_id": "s", "prompt": "hello"}, "prompt"),
        ("POST", "/api/v1/weights_info", {"tinker_path": None}, "tinker_path"),
        ("POST", "/api/v1/retrieve_future", {"request_id": {"id": 1}}, "request_id"),
        ("POST", "/api/v1/retrieve_future", {}, "request_id"),
        # Valid on the wire, but not served yet: refused naming the field, never done another way.
        ("POST", "/api/v1/save_weights", {"model_id": model_id, "path": "b", "overwrite": [1]}, "overwrite"),
        ("POST", "/api/v1/copy_weights", {"source_path": "tinker://x/weights/a"}, "destination_project_id"),
        ("POST", "/api/v1/copy_weights", {"source_path": 5, "destination_project_id": "p"}, "source_path"),
        (  # a taken model id is for good: not a 409, which the SDK retries for minutes
            "POST",
            "/api/v1/copy_weights",
            {"source_path": f"tinker://{model_id}/weights/kept", "session_id": session_id, "model_seq_id": 0},
            "model_seq_id",
        ),
    ]


def test_each_bad_body_is_a_4xx_naming_the_field(world) -> None:
    url, model, session_id, model_id, sampler = world
    wrong = []
    for method, path, body, field in _bad_bodies(model, session_id, model_id, sampler):
        status, error = _outcome(url, _send(url, method, path, body))
        if not (400 <= status < 500 and field in error):
            wrong.append(f"{method} {path} {json.dumps(body)[:120]} -> {status} {error[:160]}")
    assert not wrong, "\n".join(wrong)


def test_the_run_is_unchanged_and_still_trains(world) -> None:
    url, _, _, model_id, _ = world
    run = httpx.get(f"{url}/v1/runs/{model_id}", headers=HEADERS, timeout=30).json()
    assert run["step"] == 0 and run["status"] == "active"
    step = {"model_id": model_id, "adam_params": {"learning_rate": 1e-3}}
    assert _outcome(url, _send(url, "POST", "/api/v1/optim_step", step))[0] == 200
    assert httpx.get(f"{url}/v1/runs/{model_id}", headers=HEADERS, timeout=30).json()["step"] == 1
