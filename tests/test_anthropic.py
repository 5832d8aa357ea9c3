"""The Anthropic Messages routes through the official `anthropic` client against a live server."""

from __future__ import annotations

import anthropic
import httpx
import pytest

import eztinker
from eztinker import EZTinkerClient

KEY, OTHER = "tml-anthropic-a", "tml-anthropic-b"
HI = [{"role": "user", "content": "Hi there"}]
# This SDK takes no sampling arguments of its own: they go in the body, as the API reads them.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir) -> str:
    data_dir = tmp_path_factory.mktemp("anthropic-data")
    with eztinker.serve(data_dir=data_dir, models=[str(tiny_model_dir)], api_keys=[KEY, OTHER]) as url:
        yield url


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir)


def _client(server: str, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{server}/anthropic/api", api_key=key, max_retries=0)


@pytest.fixture
def ant(server: str) -> anthropic.Anthropic:
    return _client(server)


def test_a_plain_message_and_its_usage(ant: anthropic.Anthropic, model: str) -> None:
    message = ant.messages.create(model=model, max_tokens=6, messages=HI, extra_body=GREEDY)
    assert message.type == "message" and message.role == "assistant" and message.model == model
    assert [b.type for b in message.content] == ["text"]
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    counted = ant.messages.count_tokens(model=model, messages=HI)
    assert message.usage.input_tokens == counted.input_tokens > 5  # the chat template's wrapping
    assert 1 <= message.usage.output_tokens <= 6


def test_the_api_is_also_at_anthropics_own_path(server: str, ant: anthropic.Anthropic, model: str) -> None:
    """`ANTHROPIC_BASE_URL=http://<server>` (Anthropic's and vLLM's `/v1/messages`) reaches the same route
    as hosted Tinker's `/anthropic/api`: the same answer, the same errors in Anthropic's shape."""
    plain = anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0)
    a = plain.messages.create(model=model, max_tokens=6, messages=HI, extra_body=GREEDY)
    b = ant.messages.create(model=model, max_tokens=6, messages=HI, extra_body=GREEDY)
    assert a.content == b.content and a.usage.input_tokens == b.usage.input_tokens
    assert plain.messages.count_tokens(model=model, messages=HI).input_tokens == a.usage.input_tokens
    with pytest.raises(anthropic.BadRequestError) as refused:
        plain.messages.create(model=model, max_tokens=0, messages=HI)
    assert refused.value.body["type"] == "error" and "max_tokens" in refused.value.body["error"]["message"]


def test_max_tokens_stop(ant: anthropic.Anthropic, model: str) -> None:
    message = ant.messages.create(
        model=model, max_tokens=1, messages=HI, extra_body={"temperature": 1.0, "top_k": 50, "top_p": 0.9}
    )
    if message.stop_reason != "end_turn":  # the tiny model may pick its end token at once
        assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 1


def test_system_prompt_as_string_or_blocks_is_in_the_prompt(ant: anthropic.Anthropic, model: str) -> None:
    bare = ant.messages.count_tokens(model=model, messages=HI).input_tokens
    text = ant.messages.count_tokens(model=model, system="Be brief.", messages=HI).input_tokens
    blocks = ant.messages.count_tokens(
        model=model, system=[{"type": "text", "text": "Be brief."}], messages=HI
    ).input_tokens
    assert text == blocks > bare
    message = ant.messages.create(
        model=model, system="Be brief.", max_tokens=3, messages=HI, extra_body=GREEDY
    )
    assert message.usage.input_tokens == text


def test_count_tokens_is_the_rendered_prompt_length(
    ant: anthropic.Anthropic, model: str, tiny_model_dir
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "system", "content": "S"}, *HI]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    assert ant.messages.count_tokens(model=model, system="S", messages=HI).input_tokens == len(ids)


def test_a_final_assistant_message_is_a_prefill_the_answer_continues(
    ant: anthropic.Anthropic, model: str, tiny_model_dir
) -> None:
    """As Anthropic's: the answer continues the final assistant text (its turn left open, not closed
    and followed by a new one); an empty one opens the turn afresh; trailing whitespace is refused."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prefilled = [*HI, {"role": "assistant", "content": "The answer is"}]
    ids = tokenizer.apply_chat_template(prefilled, continue_final_message=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    assert ant.messages.count_tokens(model=model, messages=prefilled).input_tokens == len(ids)
    as_blocks = [*HI, {"role": "assistant", "content": [{"type": "text", "text": "The answer is"}]}]
    message = ant.messages.create(model=model, max_tokens=2, messages=as_blocks, extra_body=GREEDY)
    assert message.usage.input_tokens == len(ids)
    empty = [*HI, {"role": "assistant", "content": ""}]
    bare = ant.messages.count_tokens(model=model, messages=HI).input_tokens
    assert ant.messages.count_tokens(model=model, messages=empty).input_tokens == bare
    trailing = [*HI, {"role": "assistant", "content": "The answer is "}]
    with pytest.raises(anthropic.BadRequestError, match=r"messages\[1\]\.content: .*trailing whitespace"):
        ant.messages.create(model=model, max_tokens=2, messages=trailing)
    silent = [*HI, {"role": "assistant", "content": []}, *HI]
    with pytest.raises(anthropic.BadRequestError, match=r"messages\[1\]\.content: is empty"):
        ant.messages.create(model=model, max_tokens=2, messages=silent)


def test_stop_sequences(ant: anthropic.Anthropic, model: str) -> None:
    whole = ant.messages.create(model=model, max_tokens=24, messages=HI, extra_body=GREEDY)
    text = whole.content[0].text
    assert len(text) >= 3, text
    stop = text[1:3]
    cut = ant.messages.create(
        model=model, max_tokens=24, messages=HI, extra_body=GREEDY, stop_sequences=[stop]
    )
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.find(stop)]


def test_streaming_accumulates_to_the_whole(ant: anthropic.Anthropic, model: str) -> None:
    whole = ant.messages.create(model=model, max_tokens=16, messages=HI, extra_body=GREEDY)
    with ant.messages.stream(model=model, max_tokens=16, messages=HI, extra_body=GREEDY) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-1] == "message_stop"
    assert "content_block_stop" in kinds and "message_delta" in kinds
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_a_bad_body_names_the_field(server: str, model: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        body = {"max_tokens": "many"}  # the SDK reads max_tokens itself: the wrong type goes in the body
        _client(server).messages.create(model=model, max_tokens=4, messages=HI, extra_body=body)
    assert info.value.status_code == 400 and "max_tokens" in info.value.message
    body = info.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    raw = httpx.post(
        f"{server}/anthropic/api/v1/messages",
        json={"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": 7}]},
        headers={"x-api-key": KEY},
        timeout=60,
    )
    assert raw.status_code == 400 and "messages" in raw.json()["error"]["message"]


def test_a_user_turn_with_no_content_is_refused(server: str, model: str) -> None:
    """As Anthropic's: a user message says something (an empty one would render an empty turn)."""
    for content in ([], ""):
        for route, extra in (("messages", {"max_tokens": 2}), ("messages/count_tokens", {})):
            body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
            raw = httpx.post(
                f"{server}/anthropic/api/v1/{route}", json=body, headers={"x-api-key": KEY}, timeout=60
            )
            assert raw.status_code == 400, raw.text
            assert raw.json()["error"]["message"].startswith("messages[0].content: is empty")


def test_a_wrong_key_is_an_authentication_error(server: str, model: str) -> None:
    with pytest.raises(anthropic.AuthenticationError) as info:
        _client(server, "tml-nobody").messages.create(model=model, max_tokens=2, messages=HI)
    assert info.value.status_code == 401 and info.value.body["error"]["type"] == "authentication_error"
    bearer = httpx.post(
        f"{server}/anthropic/api/v1/messages/count_tokens",
        json={"model": model, "messages": HI},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert bearer.status_code == 200 and bearer.json()["input_tokens"] > 0


def test_another_keys_run_is_answered_as_a_missing_one(server: str, model: str) -> None:
    with EZTinkerClient(base_url=server, api_key=KEY) as client:
        run_id = client.create_run(base_model=model, lora_config={"r": 2})
    assert _client(server).messages.create(model=run_id, max_tokens=2, messages=HI).type == "message"
    answers = []
    for name in (run_id, "run-does-not-exist"):
        with pytest.raises(anthropic.NotFoundError) as info:
            _client(server, OTHER).messages.create(model=name, max_tokens=2, messages=HI)
        assert info.value.body["error"]["type"] == "not_found_error"
        answers.append(info.value.body["error"]["message"].replace(name, "ID"))
    assert answers[0] == answers[1]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mcp_servers", [{"type": "url", "url": "https://example.com/sse", "name": "x"}]),
        ("container", "container_011"),
    ],
)
def test_mcp_servers_and_containers_are_refused_naming_the_field(
    server: str, model: str, field: str, value
) -> None:
    """MCP servers and code-execution containers are not served: a 400 naming the field, never a reply
    that ignored them; count_tokens refuses them too. (Tool use: `test_tool_use.py`; forced calls and
    `output_format`: `test_structured_output.py`; thinking: `test_reasoning.py`.)"""
    for route, extra in (("messages", {"max_tokens": 4}), ("messages/count_tokens", {})):
        body = {"model": model, "messages": HI, field: value, **extra}
        raw = httpx.post(
            f"{server}/anthropic/api/v1/{route}", json=body, headers={"x-api-key": KEY}, timeout=60
        )
        assert raw.status_code == 400, raw.text
        error = raw.json()["error"]
        assert (
            error["type"] == "invalid_request_error"
            and field in error["message"]
            and "not served" in error["message"]
        )
    off = {"mcp_servers": [], "container": None}[field]
    fine = {"model": model, "messages": HI, "max_tokens": 2, field: off}
    assert (
        httpx.post(
            f"{server}/anthropic/api/v1/messages", json=fine, headers={"x-api-key": KEY}, timeout=60
        ).status_code
        == 200
    )


def test_a_content_block_not_served_is_refused_naming_it(server: str, model: str) -> None:
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    for block, message in (
        (document, "messages[0].content[1]: 'document' blocks are not served"),
        (image, "messages[0].content[1]"),  # an image for a model without a vision tower
    ):
        messages = [{"role": "user", "content": [{"type": "text", "text": "look"}, block]}]
        raw = httpx.post(
            f"{server}/anthropic/api/v1/messages",
            json={"model": model, "max_tokens": 2, "messages": messages},
            headers={"x-api-key": KEY},
            timeout=60,
        )
        assert raw.status_code == 400
        assert raw.json()["error"]["message"].startswith(message)


def test_a_sampling_error_names_the_routes_own_field(server: str, model: str) -> None:
    body = {"model": model, "max_tokens": 100_000, "messages": HI}
    raw = httpx.post(f"{server}/anthropic/api/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60)
    assert raw.status_code == 400
    assert raw.json()["error"]["message"].startswith("max_tokens: prompt (")


def test_context_editing_is_served_only_where_it_changes_nothing(server: str, model: str) -> None:
    """Clearing thinking (which Claude Code asks for) is a no-op here, since no history holds thinking;
    clearing tool results would change what the model sees: refused naming the edit."""
    url = f"{server}/anthropic/api/v1/messages/count_tokens"
    keep = {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}
    body = {"model": model, "messages": HI}
    plain = httpx.post(url, json=body, headers={"x-api-key": KEY}, timeout=60).json()["input_tokens"]
    kept = httpx.post(url, json={**body, "context_management": keep}, headers={"x-api-key": KEY}, timeout=60)
    assert kept.status_code == 200 and kept.json()["input_tokens"] == plain
    clear = {"edits": [keep["edits"][0], {"type": "clear_tool_uses_20250919"}]}
    refused = httpx.post(
        url, json={**body, "context_management": clear}, headers={"x-api-key": KEY}, timeout=60
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["message"].startswith(
        "context_management.edits[1]: 'clear_tool_uses_20250919'"
    )
