"""OpenAI's Responses API (`/v1/responses`) through the official client: the same answer as the chat route
for the same conversation, whole and streamed alike; function calls out and their outputs back in;
reasoning items; structured output; and errors that name the Responses request's own fields."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

import eztinker
from eztinker.testing import CHATML_TEMPLATE, TOOLS_JSON_TEMPLATE, with_chat_template

QUESTION = "Weather in Paris?"
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "name": "get_weather", "parameters": CITY, "strict": True}
THINKING_TEMPLATE = CHATML_TEMPLATE.replace(
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
    "{# a reasoning model's turn ends its thinking with </think> #}",
)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("responses-templates")
    return {
        "plain": str(tiny_model_dir),
        "tools": str(with_chat_template(tiny_model_dir, root / "tools", TOOLS_JSON_TEMPLATE)),
        "thinking": str(with_chat_template(tiny_model_dir, root / "thinking", THINKING_TEMPLATE)),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, models) -> str:
    with eztinker.serve(
        data_dir=tmp_path_factory.mktemp("responses-data"), models=list(models.values())
    ) as url:
        yield url


@pytest.fixture
def oai(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


GREEDY = {"temperature": 0, "max_output_tokens": 12}


def test_a_response_is_the_chat_routes_answer_as_output_items(oai: openai.OpenAI, models) -> None:
    chat = oai.chat.completions.create(
        model=models["plain"],
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
        max_completion_tokens=12,
        temperature=0,
    )
    response = oai.responses.create(model=models["plain"], instructions="Be brief.", input=QUESTION, **GREEDY)
    assert response.output_text == chat.choices[0].message.content
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens == 12
    items = oai.responses.create(
        model=models["plain"],
        input=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
        ],
        **GREEDY,
    )
    assert items.output_text == response.output_text  # developer is the system turn; parts join


def test_a_streamed_response_builds_the_same_response(oai: openai.OpenAI, models) -> None:
    whole = oai.responses.create(model=models["thinking"], input=QUESTION, **GREEDY)
    events = list(oai.responses.create(model=models["thinking"], input=QUESTION, stream=True, **GREEDY))
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    streamed = events[-1].response  # cut at max_output_tokens: the SDK's helper waits for "completed"
    assert "response.reasoning_text.delta" in kinds
    strip = lambda r: [{k: v for k, v in item.model_dump().items() if k != "id"} for item in r.output]  # noqa: E731
    assert strip(streamed) == strip(whole)
    assert [item.type for item in whole.output] == ["reasoning"]  # the random model never ends its thinking
    assert whole.usage.output_tokens_details.reasoning_tokens > 0


def test_function_calls_go_out_and_their_outputs_come_back_in(oai: openai.OpenAI, models) -> None:
    calling = {
        "model": models["tools"],
        "input": QUESTION,
        "tools": [WEATHER],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "temperature": 0,
        "max_output_tokens": 60,
    }
    forced = oai.responses.create(**calling)
    (call,) = [item for item in forced.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Paris", "Oslo")
    assert forced.status == "completed"
    history = [
        {"role": "user", "content": QUESTION},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"},
    ]
    after = oai.responses.create(model=models["tools"], input=history, tools=[WEATHER], **GREEDY)
    chat = oai.chat.completions.create(
        model=models["tools"],
        messages=[
            {"role": "user", "content": QUESTION},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": "Sunny, 21 C"},
        ],
        tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],
        max_completion_tokens=12,
        temperature=0,
    )
    assert after.usage.input_tokens == chat.usage.prompt_tokens  # the same rendered history
    with oai.responses.stream(**calling) as stream:
        streamed = stream.get_final_response()
    assert [(i.type, getattr(i, "arguments", None)) for i in streamed.output] == [
        (i.type, getattr(i, "arguments", None)) for i in forced.output
    ]


def test_a_streamed_call_is_in_progress_until_its_arguments_are_done(oai: openai.OpenAI, models) -> None:
    calling = {"model": models["tools"], "input": QUESTION, "tools": [WEATHER], "tool_choice": "required"}
    events = list(oai.responses.create(**calling, stream=True, temperature=0, max_output_tokens=60))
    (added,) = [e.item for e in events if e.type == "response.output_item.added"]
    (done,) = [e.item for e in events if e.type == "response.output_item.done"]
    assert (added.type, added.status, added.arguments) == ("function_call", "in_progress", "")
    assert done.status == "completed" and json.loads(done.arguments)["city"] in ("Paris", "Oslo")


LOGPROBS = {"include": ["message.output_text.logprobs"]}


def _logprobs(entries) -> list[tuple[str, float, list[str]]]:
    return [(e.token, round(e.logprob, 4), [t.token for t in e.top_logprobs or ()]) for e in entries]


def test_logprobs_are_the_chat_routes_on_the_output_text_whole_and_streamed(
    oai: openai.OpenAI, models
) -> None:
    chat = oai.chat.completions.create(
        model=models["plain"],
        messages=[{"role": "user", "content": QUESTION}],
        max_completion_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=20,
    )
    asked = {"model": models["plain"], "input": QUESTION, "top_logprobs": 20, **LOGPROBS, **GREEDY}
    whole = oai.responses.create(**asked)
    (part,) = whole.output[0].content
    assert part.logprobs[0].model_dump().keys() == {"token", "logprob", "bytes", "top_logprobs"}
    assert _logprobs(part.logprobs) == _logprobs(chat.choices[0].logprobs.content)
    assert len(part.logprobs) == 12 and all(len(e.top_logprobs) == 20 for e in part.logprobs)
    assert whole.top_logprobs == 20

    events = list(oai.responses.create(**asked, stream=True))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert _logprobs(e for delta in deltas for e in delta.logprobs) == _logprobs(part.logprobs)
    assert _logprobs(done.logprobs) == _logprobs(events[-1].response.output[0].content[0].logprobs)
    assert _logprobs(done.logprobs) == _logprobs(part.logprobs)


def test_logprobs_come_only_when_included(oai: openai.OpenAI, models) -> None:
    """As OpenAI's: `top_logprobs` alone leaves each text's `logprobs` empty; the include alone gives the
    chosen tokens' without alternatives."""
    alone = oai.responses.create(model=models["plain"], input=QUESTION, top_logprobs=5, **GREEDY)
    assert alone.output[0].content[0].logprobs == []
    chosen = oai.responses.create(model=models["plain"], input=QUESTION, **LOGPROBS, **GREEDY)
    entries = chosen.output[0].content[0].logprobs
    assert len(entries) == 12 and all(e.top_logprobs == [] for e in entries)


def test_text_format_json_schema_shapes_the_output(oai: openai.OpenAI, models) -> None:
    response = oai.responses.create(
        model=models["plain"],
        input=QUESTION,
        text={"format": {"type": "json_schema", "name": "place", "schema": CITY, "strict": True}},
        temperature=0,
        max_output_tokens=30,
    )
    assert json.loads(response.output_text)["city"] in ("Paris", "Oslo") and response.status == "completed"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        (  # an image for a model without a vision tower
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
            "input[0].content[0].image_url",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0]",
        ),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "strng"}}}},
            "text.format.schema",
        ),
        ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
        ({"include": ["file_search_call.results"]}, "include[0]"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"min_p": 0.1}, "min_p"),  # vLLM's extras are refused here as on the chat route
        ({"input": []}, "input"),
        ({"input": [{"type": "reasoning", "summary": [{"type": "summary_text", "text": "hm"}]}]}, "input"),
        ({"text": {"format": "json_object"}}, "text.format"),  # a string, not {"type": ...}
        ({"text": {"verbosity": "low"}}, "text.verbosity"),  # as the chat route refuses `verbosity`
        ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice.name"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": ["get_weather"]},
            },
            "tool_choice.tools[0]",
        ),
        (
            {
                "tools": [WEATHER],
                "tool_choice": {
                    "type": "allowed_tools",
                    "tools": [{"type": "function", "name": "get_weather"}],
                },
            },
            "tool_choice.mode",
        ),
        (  # a schema llguidance cannot compile is the tool's, not the tool choice's
            {
                "tools": [
                    {**WEATHER, "parameters": {"type": "object", "properties": {"a": {"type": "bogus"}}}}
                ]
            },
            "tools[0].parameters",
        ),
        ({"top_logprobs": 21}, "top_logprobs"),  # OpenAI's limit
        (  # a call's fields are the item's, not the chat message's `tool_calls[0].id`
            {
                "input": [
                    {"role": "user", "content": "x"},
                    {"type": "function_call", "name": "f", "arguments": "{}"},
                ]
            },
            "input[1].call_id",
        ),
        ({"input": [{"type": "function_call_output", "output": "Sunny"}]}, "input[0].call_id"),
        ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]},
            "input[0].content[0].text",
        ),
        ({"n": 2}, "n"),  # the Responses API has no n: a response is one answer
        ({"n": 2, "stream": True}, "n"),
    ],
)
def test_errors_name_the_responses_field(server: str, models, change: dict, param: str) -> None:
    body = {"model": models["tools"], "input": QUESTION, "max_output_tokens": 4, **change}
    answer = httpx.post(f"{server}/v1/responses", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param, answer.text
    assert '"function": {' not in answer.json()["error"]["message"]  # this API's shapes, not the chat route's


def test_vllms_extras_work_as_on_the_chat_route(oai: openai.OpenAI, models) -> None:
    seeded = {
        "model": models["plain"],
        "input": QUESTION,
        "max_output_tokens": 8,
        "extra_body": {"seed": 5, "n": 1},
    }
    assert oai.responses.create(**seeded).output_text == oai.responses.create(**seeded).output_text
    picked = oai.responses.create(
        model=models["plain"],
        input=QUESTION,
        max_output_tokens=8,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert picked.output_text in ("yes", "no")


def test_metadata_is_echoed_in_the_response(oai: openai.OpenAI, models) -> None:
    tags = {"ticket": "T-1"}
    assert oai.responses.create(model=models["plain"], input="Hi", metadata=tags, **GREEDY).metadata == tags
    streamed = oai.responses.create(
        model=models["plain"],
        input="Hi",
        metadata=tags,
        stream=True,
        stream_options={"include_obfuscation": False},  # a streaming option, never the chat route's
        **GREEDY,
    )
    events = list(streamed)
    assert events[0].response.metadata == events[-1].response.metadata == tags


def test_served_at_hosted_tinkers_prefix_too(server: str, models) -> None:
    oai = openai.OpenAI(base_url=f"{server}/oai/api/v1", api_key="unused", max_retries=0)
    assert oai.responses.create(model=models["plain"], input="Hi", **GREEDY).output_text is not None
