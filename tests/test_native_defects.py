"""The native API and the dashboard's views under a demanding user: bad input is a 4xx naming the field
the caller sent, and another key's job is missing at once, exactly as an unknown id is."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

import eztinker
from eztinker import EZTinkerClient
from eztinker.scheduler import Job

ALICE, BOB = "alice-key", "bob-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("native-defects")
    with eztinker.serve(data_dir=data_dir, models=[str(tiny_model_dir)], api_keys=[ALICE, BOB]) as url:
        yield url


@pytest.fixture(scope="module")
def alice(server: str) -> Iterator[EZTinkerClient]:
    with EZTinkerClient(base_url=server, api_key=ALICE) as client:
        yield client


@pytest.fixture(scope="module")
def run_id(alice: EZTinkerClient, tiny_model_dir) -> str:
    return alice.create_run(str(tiny_model_dir), lora_config={"r": 2})


def post(server: str, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{server}{path}", headers={"X-API-Key": ALICE}, timeout=60, **kwargs)


def post_raw(server: str, path: str, content: bytes) -> httpx.Response:
    """A body sent as it is: Python's JSON reader takes `Infinity`, which httpx would never write."""
    headers = {"X-API-Key": ALICE, "Content-Type": "application/json"}
    return httpx.post(f"{server}{path}", content=content, headers=headers, timeout=60)


# --- jobs --------------------------------------------------------------------------------------------


def test_a_long_poll_of_another_keys_job_is_a_404_without_waiting_on_it(
    server: str, alice: EZTinkerClient, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    waited: list[str] = []
    original = Job.wait

    async def recording_wait(self: Job, timeout: float | None) -> bool:
        waited.append(self.job_id)
        return await original(self, timeout)

    monkeypatch.setattr(Job, "wait", recording_wait)
    job_id = alice.forward_backward(run_id, input_ids=[5, 6, 7, 8])["job_id"]
    answer = httpx.get(f"{server}/v1/jobs/{job_id}", params={"wait": 30}, headers={"X-API-Key": BOB})
    missing = httpx.get(f"{server}/v1/jobs/job-missing", params={"wait": 30}, headers={"X-API-Key": BOB})
    assert answer.status_code == missing.status_code == 404
    assert answer.json()["error"] == f"no job {job_id!r}"
    assert job_id not in waited  # its owner's poll may wait on it; another key's never does
    assert alice.get_job(job_id, wait=30).status == "completed"


# --- create_run --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 2**70])
def test_a_lora_seed_torch_cannot_take_is_a_422_naming_it(server: str, tiny_model_dir, seed: int) -> None:
    body = {"base_model": str(tiny_model_dir), "lora_config": {"r": 2, "seed": seed}}
    answer = post(server, "/v1/runs", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == "lora_config.seed"


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63)])
def test_a_lora_seed_torch_takes_is_kept(alice: EZTinkerClient, tiny_model_dir, seed: int) -> None:
    run = alice.get_run(alice.create_run(str(tiny_model_dir), lora_config={"r": 2, "seed": seed}))
    assert run.lora_config.seed == seed


# --- bodies ------------------------------------------------------------------------------------------


def test_a_body_that_is_not_json_is_named_as_the_body(server: str, run_id: str) -> None:
    answer = post_raw(server, f"/v1/runs/{run_id}/optim_step", b'{"learning_rate": ')
    assert answer.status_code == 422
    assert answer.json()["field"] == "body"
    assert answer.json()["error"].startswith("body: ")


def test_an_optim_step_setting_is_named_as_the_caller_sent_it(server: str, run_id: str) -> None:
    for raw, field in (
        (b'{"learning_rate": Infinity}', "learning_rate"),
        (b'{"grad_clip_norm": Infinity}', "grad_clip_norm"),
    ):
        answer = post_raw(server, f"/v1/runs/{run_id}/optim_step", raw)
        assert answer.status_code == 422, answer.text
        assert answer.json()["field"] == field  # not the Tinker wire's `adam_params.learning_rate`


# --- sampling ----------------------------------------------------------------------------------------


def test_a_run_sample_refuses_a_sampler_id_it_would_not_sample(server: str, run_id: str) -> None:
    answer = post(server, f"/v1/runs/{run_id}/sample", json={"prompt": "Hi", "sampler_id": "snap-1"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == "sampler_id"


def test_a_run_sample_refuses_another_base_model_but_takes_its_own(
    server: str, run_id: str, tiny_model_dir
) -> None:
    other = post(server, f"/v1/runs/{run_id}/sample", json={"prompt": "Hi", "base_model": "gpt2"})
    assert other.status_code == 422, other.text
    assert other.json()["field"] == "base_model"
    same = {"prompt": "Hi", "base_model": str(tiny_model_dir), "max_new_tokens": 2}
    assert post(server, f"/v1/runs/{run_id}/sample", json=same).status_code == 202


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt_tokens": [99999]}, "prompt"),  # the prompt, in whichever form it came
        ({"prompt_tokens": [-3]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "Hi", "stop": [""]}, "stop"),
        ({"prompt": "Hi", "stop": [-1]}, "stop"),
        ({"prompt": "Hi", "logit_bias": {"99999": 5.0}}, "logit_bias"),
        ({"prompt": "Hi", "logit_bias": {"5": 500.0}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": "Hi"}], "logit_bias": {"-5": 1.0}}, "logit_bias"),
    ],
)
def test_a_bad_sample_on_a_loaded_model_is_a_422_naming_the_field_sent(
    server: str, run_id: str, body: dict, field: str
) -> None:
    """Refused before it is queued, named as the native body names it (not a failed job that names the
    engine's `sampling_params.stop`)."""
    for path in (f"/v1/runs/{run_id}/sample", "/v1/sample"):
        answer = post(server, path, json=body)
        assert answer.status_code == 422, (path, answer.text)
        assert answer.json()["field"] == field


def test_a_good_text_sample_on_a_loaded_model_still_runs(alice: EZTinkerClient, run_id: str) -> None:
    out = alice.generate("Hello", max_new_tokens=3, run_id=run_id, n=2, prompt_logprobs=True)
    assert len(out.samples) == 2 and all(len(s.tokens) <= 3 for s in out.samples)
    assert out.prompt_tokens and out.prompt_logprobs is not None


# --- the dashboard's token view ---------------------------------------------------------------------


@pytest.mark.parametrize("token", [-1, 2**31, 2**70])
def test_dashboard_tokens_refuses_an_id_no_tokenizer_takes(server: str, tiny_model_dir, token: int) -> None:
    body = {"base_model": str(tiny_model_dir), "tokens": [5, token]}
    answer = post(server, "/dashboard/api/tokens", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == "tokens[1]"


def test_dashboard_tokens_names_an_unknown_field(server: str, tiny_model_dir) -> None:
    body = {"base_model": str(tiny_model_dir), "tokens": [5], "token": [6]}
    answer = post(server, "/dashboard/api/tokens", json=body)
    assert answer.status_code == 422
    assert answer.json()["field"] == "token"


def test_dashboard_tokens_decodes_ids_past_the_tokenizer_as_empty(server: str, tiny_model_dir) -> None:
    """A model's embedding may be padded past its tokenizer: whatever it sampled is shown, never refused."""
    answer = post(
        server, "/dashboard/api/tokens", json={"base_model": str(tiny_model_dir), "tokens": [2**31 - 1]}
    )
    assert answer.status_code == 200
    assert answer.json() == {"texts": [""]}
