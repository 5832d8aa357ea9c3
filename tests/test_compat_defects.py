"""Where a demanding client of the OpenAI-compatible routes met an answer OpenAI would not give: each test
is the behaviour OpenAI defines (or a clear 400 where this server cannot match it)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

import eztinker
from eztinker import EZTinkerClient

HI = [{"role": "user", "content": "Hi"}]
KEY, OTHER = "tml-compat-a", "tml-compat-b"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir) -> str:
    data_dir = tmp_path_factory.mktemp("compat-data")
    with eztinker.serve(data_dir=data_dir, models=[str(tiny_model_dir)], api_keys=[KEY, OTHER]) as url:
        yield url


def _oai(server: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir)


def _chat(server: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}/v1/chat/completions", json=body, headers=AUTH, timeout=60)


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([{"role": "user", "content": []}], "messages[0].content"),
        ([{"role": "system", "content": None}, *HI], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text"),
        ([*HI, {"role": "assistant", "content": None}], "messages[1].content"),
    ],
)
def test_a_message_with_no_content_is_a_400_naming_it(server: str, model: str, messages, param) -> None:
    """As OpenAI's: only an assistant's tool calls stand without content; a part's text is a string.
    Never rendered as an empty turn the client did not send."""
    answer = _chat(server, {"model": model, "messages": messages, "max_tokens": 2})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


def _chunks(server: str, body: dict) -> list[dict]:
    with httpx.stream(
        "POST", f"{server}/v1/chat/completions", json=body, headers=AUTH, timeout=60
    ) as response:
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_with_include_usage_every_chunk_has_a_usage_null_until_the_last(server: str, model: str) -> None:
    body = {"model": model, "messages": HI, "max_tokens": 3, "n": 2, "stream": True}
    chunks = _chunks(server, {**body, "stream_options": {"include_usage": True}})
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and 2 <= chunks[-1]["usage"]["completion_tokens"] <= 6
    assert all("usage" not in c for c in _chunks(server, body))


def test_stream_options_without_stream_is_a_400(server: str, model: str) -> None:
    """As OpenAI (and vLLM) answer it: the options would change nothing, silently."""
    body = {"model": model, "max_tokens": 2, "stream_options": {"include_usage": True}}
    for path, prompt in (("chat/completions", {"messages": HI}), ("completions", {"prompt": "Hi"})):
        answer = httpx.post(f"{server}/v1/{path}", json={**body, **prompt}, headers=AUTH, timeout=60)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == "stream_options"


def test_a_model_is_retrieved_by_id_and_another_keys_run_is_missing(server: str, model: str) -> None:
    """OpenAI's `models.retrieve`: an entry of the caller's listing (a base model's id may be a path);
    another key's run is a 404 as a missing model is."""
    with EZTinkerClient(base_url=server, api_key=KEY) as client:
        run_id = client.create_run(base_model=model, lora_config={"r": 2})
    oai = _oai(server)
    listed = {m.id: m for m in oai.models.list().data}
    assert oai.models.retrieve(model) == listed[model]
    assert oai.models.retrieve(run_id) == listed[run_id] and listed[run_id].model_extra["kind"] == "run"
    for key, name in ((OTHER, run_id), (KEY, "gpt-4o")):
        with pytest.raises(openai.NotFoundError) as missing:
            _oai(server, key).models.retrieve(name)
        assert missing.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": 5}], "max_tokens": 2},
            "messages[0].content",
        ),
        ("/v1/responses", {"input": 5}, "input"),
        ("/anthropic/api/v1/messages", {"system": 5, "messages": HI, "max_tokens": 2}, "system"),
    ],
)
def test_a_value_of_no_accepted_type_names_the_field_not_a_type(
    server: str, model: str, route, body, param
) -> None:
    """A field that takes a string or a list, sent as neither, is named as the caller sent it: never with
    the union member's type appended (`messages[0].content.str`)."""
    answer = httpx.post(f"{server}{route}", json={"model": model, **body}, headers=AUTH, timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    named = error.get("param") or error["message"]
    assert named == param or error["message"].startswith(f"{param}:"), answer.text
